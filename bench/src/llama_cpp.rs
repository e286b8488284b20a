//! llama.cpp's `llama-bench` as the reference: one repetition per call, so
//! its runs interleave with rbee's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Where `scripts/build-llama-cpp.sh` puts `llama-bench`.
pub fn default_path() -> PathBuf {
    let dir = std::env::var_os("RBEE_LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("rbee/llama.cpp")))
        .unwrap_or_else(|| PathBuf::from(".cache/rbee/llama.cpp"));
    dir.join("bin/llama-bench")
}

/// Tokens per second of one `pp` and one `tg` run (`-r 1`).
pub fn run_once(bin: &Path, model: &Path, threads: usize, prompt: usize, gen: usize) -> Result<(f64, f64)> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-t", &threads.to_string(), "-p", &prompt.to_string(), "-n", &gen.to_string()])
        .args(["-r", "1", "-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        // `status` names the signal of a crash, which leaves stderr empty.
        bail!("{} failed ({}): {}", bin.display(), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).context("llama-bench printed no JSON")?;
    let (mut pp, mut tg) = (None, None);
    for r in runs.as_array().context("llama-bench's JSON is not a list")? {
        let ts = r["avg_ts"].as_f64().context("llama-bench's JSON has no avg_ts")?;
        if r["n_prompt"].as_u64().unwrap_or(0) > 0 {
            pp = Some(ts);
        } else {
            tg = Some(ts);
        }
    }
    Ok((pp.context("no pp result from llama-bench")?, tg.context("no tg result from llama-bench")?))
}
