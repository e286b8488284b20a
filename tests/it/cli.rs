//! The `rbee` binary as a user runs it: the embedded default (the README's
//! first command), exit codes, and `rbee up` / `rbee down`.

use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

fn rbee(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("rbee"))
        .args(args)
        .env("RBEE_HOME", home)
        .env("RBEE_MODELS_DIR", models_dir())
        .env_remove("RBEE_NATS_URL")
        .output()
        .expect("run rbee")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbee_infer_on_the_embedded_default_answers_and_leaves_nothing_running() {
    let home = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let home = home.path().to_path_buf();
        move || rbee(&home, &["infer", "--verbose", "--max-tokens", "24", "Write a haiku about bees"])
    })
    .await
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.trim().len() > 10, "an answer on stdout: {stdout:?}");
    assert!(stderr.contains("[done: "), "stats with --verbose: {stderr}");
    assert!(stderr.contains("24 generated tokens") || stderr.contains("end of text"), "{stderr}");
    eventually(Duration::from_secs(10), "the embedded broker, hive and worker to be gone", || {
        processes_using_home(home.path()).is_empty()
    })
    .await;
    assert!(!home.path().join("run").join("nats").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_what_happened() {
    let broker = Broker::start();
    let _hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let home = tempfile::tempdir().unwrap();
    let url = broker.url();
    let h = home.path().to_path_buf();
    let (usage, typo, failed, ok) = tokio::task::spawn_blocking(move || {
        (
            rbee(&h, &["--nats-url", &url, "infer", "--max-tokens", "0", "hi"]),
            rbee(&h, &["--nats-url", &url, "infer", "--max-tokenz", "3", "hi"]),
            rbee(&h, &["--nats-url", &url, "infer", "--model", "no-such-model", "hi"]),
            rbee(&h, &["--nats-url", &url, "infer", "--json", "--max-tokens", "3", "--raw", "hi"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage.stderr));
    assert!(text(&usage.stderr).contains("max_tokens must be between 1 and 8192"));
    assert_eq!(typo.status.code(), Some(2), "{}", text(&typo.stderr));
    assert_eq!(failed.status.code(), Some(1));
    assert!(text(&failed.stderr).contains("error: UNKNOWN_MODEL: no model \"no-such-model\""), "{}", text(&failed.stderr));
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let lines: Vec<serde_json::Value> = text(&ok.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.first().unwrap()["type"], "started");
    assert_eq!(lines.last().unwrap()["type"], "done");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbee_up_keeps_a_stack_for_later_commands_and_rbee_down_stops_it() {
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let h = home.path().to_path_buf();
    let (up, again, job, bare, bare_json) = tokio::task::spawn_blocking(move || {
        let up = rbee(&h, &["up", "--port", &port.to_string()]);
        let again = rbee(&h, &["up", "--port", &port.to_string()]);
        let job = rbee(&h, &["infer", "--verbose", "--max-tokens", "3", "hi"]);
        // A group command alone lists, as its `list` does.
        let bare = ["workers", "hives", "models", "jobs"].map(|c| rbee(&h, &[c]));
        let bare_json = rbee(&h, &["workers", "--json"]);
        (up, again, job, bare, bare_json)
    })
    .await
    .unwrap();
    let running = processes_using_home(home.path());
    let h = home.path().to_path_buf();
    let down = tokio::task::spawn_blocking(move || rbee(&h, &["down"])).await.unwrap();
    assert_eq!(up.status.code(), Some(0), "{}{}", text(&up.stdout), text(&up.stderr));
    assert!(text(&up.stdout).contains(&format!("nats://127.0.0.1:{port}")));
    assert!(text(&again.stdout).contains("already up"));
    assert_eq!(job.status.code(), Some(0), "{}", text(&job.stderr));
    assert!(!text(&job.stderr).contains("embedded"), "used the running stack: {}", text(&job.stderr));
    for (out, shows) in bare.iter().zip(["smollm2-135m", "VERSION", "smollm2-135m", "done"]) {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(shows), "{shows:?} in {}", text(&out.stdout));
    }
    let workers: serde_json::Value = serde_json::from_slice(&bare_json.stdout).expect("rbee workers --json prints JSON");
    assert_eq!(workers[0]["model"], "smollm2-135m", "{workers}");
    assert!(running.len() >= 3, "nats-server, hive and worker were running: {running:?}");
    assert_eq!(down.status.code(), Some(0));
    assert!(text(&down.stdout).contains("rbee is down"));
    eventually(Duration::from_secs(10), "the stack to be gone", || processes_using_home(home.path()).is_empty()).await;
}

/// The broker rbee starts shares the machine with the workers: its Go
/// scheduler gets a quarter of the cores (at least one), or whatever
/// `GOMAXPROCS` the user set.
#[test]
fn the_broker_rbee_starts_leaves_the_cores_to_the_workers() {
    let broker = Broker::start();
    let pid = broker.server.pid().expect("the broker runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the broker's environment");
    let procs = environ.split(|&b| b == 0).find_map(|kv| kv.strip_prefix(b"GOMAXPROCS=")).map(text);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let expected = std::env::var("GOMAXPROCS").unwrap_or_else(|_| (cores / 4).max(1).to_string());
    assert_eq!(procs.as_deref(), Some(expected.as_str()), "GOMAXPROCS of the broker on {cores} cores");
}
