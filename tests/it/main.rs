//! rbee's integration tests: one binary, a module per area. Every test runs
//! against a real nats-server (started on a port it picks, with a temp store)
//! and real `rbee-hive` / `rbee-worker` processes on the demo model.
//!
//! Needs: nats-server on PATH (or RBEE_NATS_SERVER), the workspace binaries
//! built in the same profile, and the demo model (scripts/fetch-demo-model.sh;
//! RBEE_TEST_MODELS_DIR overrides where it is looked for).

mod cli;
mod downloads;
mod engine;
mod faults;
mod fleet;
mod harness;
mod hub;
mod infer;
mod jobs;
mod memory;
mod python;
