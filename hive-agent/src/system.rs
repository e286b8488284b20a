//! What the machine has: memory (from /proc/meminfo on Linux) and the memory
//! a model is estimated to need.

use rbee_schemas::worker::MAX_CONTEXT;

use crate::catalog::ModelEntry;

/// (total, available) memory in bytes; (0, 0) where it cannot be read.
pub fn memory() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return (0, 0) };
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Memory a worker for `model` running up to `slots` jobs at once is
/// estimated to need: the weights (loaded into memory; with `widened`, a
/// CPU worker, at the size the fast engine holds them,
/// [`ModelEntry::weight_bytes`], where that is more than the file; candle on
/// a GPU keeps the file's blocks), a tenth more for
/// activations, 64 MiB for the process, and the KV cache of every slot
/// filled to the longest context a worker gives a job. That is the worst
/// case: a worker's caches grow with its jobs' actual lengths. A model whose
/// KV size is unknown gets a fifth of its weights for activations and KV.
pub fn model_memory(model: &ModelEntry, slots: u32, widened: bool) -> u64 {
    let weights = if widened { model.size.max(model.weight_bytes) } else { model.size };
    let process = 64 * 1024 * 1024;
    if model.kv_bytes_per_token == 0 {
        return weights + weights / 5 + process;
    }
    let context = if model.context_length == 0 { MAX_CONTEXT } else { (model.context_length as usize).min(MAX_CONTEXT) };
    let kv = u64::from(slots.max(1)) * context as u64 * model.kv_bytes_per_token;
    weights + weights / 10 + process + kv
}

/// GPU memory a CUDA worker takes besides its model and the 64 MiB that
/// [`model_memory`] counts for any process: the CUDA context, cuBLAS and
/// candle's kernels. On an H200 (CUDA 13), the demo model's worker held
/// 810 MiB once loaded, of which ~94 MiB were its weights.
pub const CUDA_RUNTIME: u64 = 704 * 1024 * 1024;

/// What a worker on `backend` needs on top of [`model_memory`].
fn backend_memory(backend: &str) -> u64 {
    if backend == "cuda" {
        CUDA_RUNTIME
    } else {
        0
    }
}

/// A worker's whole estimate: its model with `slots` KV caches, on `backend`
/// with `engine` (its `--engine`: only the fast engine, on a CPU, widens
/// weights).
pub fn worker_memory(model: &ModelEntry, slots: u32, backend: &str, engine: &str) -> u64 {
    model_memory(model, slots, backend == "cpu" && engine != "candle") + backend_memory(backend)
}

/// Bytes for people, in the binary units `rbee hives` and `--memory-limit`
/// use: "93.8 MiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_and_estimates_count_every_slots_kv_cache() {
        let (total, free) = memory();
        if cfg!(target_os = "linux") {
            assert!(total > 0 && free > 0 && free <= total);
        }
        let mut m = crate::catalog::KNOWN_MODELS[0];
        let entry = |k: &crate::catalog::KnownModel| k.entry(k.file.into(), 0);
        // The demo model: 98 MB of weights, 4,096 tokens (the cap, below its
        // 8,192) of 23,040 bytes per slot.
        let one = model_memory(&entry(&m), 1, true);
        assert_eq!(one, 98_362_432 + 9_836_243 + (64 << 20) + 4096 * 23_040);
        assert_eq!(model_memory(&entry(&m), 4, true) - one, 3 * 4096 * 23_040);
        // A short-context model is sized by its own context.
        m.context_length = 1024;
        assert_eq!(model_memory(&entry(&m), 2, true), 98_362_432 + 9_836_243 + (64 << 20) + 2 * 1024 * 23_040);
        // Unknown KV size: the old allowance, whatever the slots.
        m.kv_bytes_per_token = 0;
        assert_eq!(model_memory(&entry(&m), 8, true), 98_362_432 + 98_362_432 / 5 + (64 << 20));
        // Weights a worker widens (e.g. Q5_K) count at their loaded size.
        let widened = ModelEntry { weight_bytes: 150_000_000, ..entry(&m) };
        assert_eq!(model_memory(&widened, 8, true), 150_000_000 + 150_000_000 / 5 + (64 << 20));
        // Not on a GPU, where candle keeps the file's blocks.
        assert_eq!(model_memory(&widened, 8, false), 98_362_432 + 98_362_432 / 5 + (64 << 20));
        assert_eq!(worker_memory(&widened, 8, "cuda", "auto"), model_memory(&widened, 8, false) + CUDA_RUNTIME);
        // Nor on a CPU with the candle engine.
        assert_eq!(worker_memory(&widened, 8, "cpu", "candle"), model_memory(&widened, 8, false));
        assert_eq!(worker_memory(&widened, 8, "cpu", "auto"), model_memory(&widened, 8, true));
        // A CUDA worker also holds its context: the demo model's measured 810 MiB
        // (one slot's KV cache unfilled) is within its estimate.
        assert_eq!(backend_memory("cpu"), 0);
        assert!(one + backend_memory("cuda") >= 810 << 20);
        assert_eq!(human(98_362_432), "93.8 MiB");
        assert_eq!(human(8 << 30), "8.0 GiB");
        assert_eq!(human(12), "12 B");
    }
}
