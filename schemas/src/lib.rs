//! rbee's wire contract: the public, versioned shape of everything that crosses NATS.
//!
//! This crate is pure data. It owns
//! - the subject, stream, consumer and bucket names ([`subjects`]),
//! - inference jobs and their validation limits ([`job`]),
//! - the events a job streams back ([`event`]) and the stable error codes ([`error`]),
//! - model references and their subject-safe keys ([`model`]),
//! - the two encodings, JSON and MessagePack ([`codec`]),
//! - lifecycle jobs: model download/import/delete, worker spawn/stop ([`ctl`]),
//! - the hive heartbeat and worker registry records ([`hive`]) and the job record ([`record`]),
//! - the hive <-> worker pipe protocol ([`worker`]), which is internal, not public.
//!
//! Nothing here does I/O, spawns tasks or holds channels. Every message carries
//! [`PROTOCOL_VERSION`] in a `v` field; new fields are added with `#[serde(default)]`
//! so older readers keep working, and a breaking change bumps the version.

pub mod codec;
pub mod ctl;
pub mod error;
pub mod event;
pub mod hive;
pub mod job;
pub mod log;
pub mod model;
pub mod record;
pub mod subjects;
pub mod worker;

#[cfg(test)]
mod json_schema;

/// The protocol version this build speaks. A message without `v` is version 1.
pub const PROTOCOL_VERSION: u32 = 1;

/// The version of the rbee binaries, for heartbeats and `started` events.
pub const RBEE_VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) fn default_version() -> u32 {
    1
}
