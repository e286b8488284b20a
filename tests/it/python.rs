//! The Python example (examples/python/submit.py, nats-py only) against a real hive.

use std::process::Command;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_submits_a_job_without_any_rbee_code() {
    let broker = Broker::start();
    let _hive = Hive::start(&broker.url(), HiveOpts::default()).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/submit.py");
    let pythonpath = std::env::var("RBEE_TEST_PYTHONPATH").unwrap_or_default();
    let url = broker.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--url", &url, "--max-tokens", "12", "--seed", "3", "Write a haiku about bees"])
            .env("PYTHONPATH", pythonpath)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}\n(nats-py missing? scripts/test.sh installs it)");
    assert!(stdout.trim().len() > 5, "{stdout:?}");
    assert!(stderr.contains("[done: ") && stderr.contains("cold start"), "{stderr}");
    let client = broker.client().await;
    assert_queue_drains(&client).await;
}
