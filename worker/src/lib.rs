//! `rbee-worker`: the inference process. One process serves one loaded model.
//!
//! A hive agent starts it with the model's path and drives it over a pipe (see
//! [`rbee_schemas::worker`]): `Generate` frames in on stdin, `Token`,
//! `Finished` and `Failed` frames out on the protocol pipe. The worker never
//! talks to NATS; its hive publishes the events, so each job's event sequence
//! has exactly one writer.
//!
//! Engines: the fast CPU path ([`fast`]) for the llama, qwen2, qwen3, phi3,
//! gemma2 and gemma3 GGUFs it supports on AVX2 CPUs, else candle's quantized models of the
//! first four (`--engine auto|fast|candle`, see [`backend`]).
//!
//! Threads: the main thread loads the model and then runs the job loop
//! ([`batch`]: up to `--slots` jobs at once, stepped through the model
//! together; generation is synchronous); a reader thread decodes frames from
//! stdin, hands jobs over a channel and flips cancel flags. When stdin closes
//! (the hive exited or was killed) the worker exits at once, so a worker never
//! outlives its hive.

pub mod backend;
pub mod batch;
pub mod chat;
pub mod engine;
pub mod fast;
pub mod generation;
pub mod gguf;
pub mod noop;
pub mod process;
pub mod sampler;
pub mod stream;
pub mod tokenizer;

pub use backend::{EngineChoice, EngineKind};
pub use engine::Engine;

#[cfg(test)]
mod tests;
