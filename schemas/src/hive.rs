//! The hive heartbeat record, kept under the hive's id in the `rbee-hives` KV
//! bucket. The bucket's TTL removes a hive that stops heartbeating.

use serde::{Deserialize, Serialize};

/// Seconds between heartbeats.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 5;
/// The `rbee-hives` bucket's TTL: a hive that misses three heartbeats disappears.
pub const HIVE_TTL_SECS: u64 = 15;

/// What a hive says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveInfo {
    #[serde(default = "crate::default_version")]
    pub v: u32,
    pub hive_id: String,
    /// rbee version of the hive binary.
    pub version: String,
    /// Protocol version the hive speaks.
    pub protocol: u32,
    pub hostname: String,
    pub pid: u32,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// Jobs the hive runs at once.
    pub slots: u32,
    /// Jobs running now.
    pub busy: u32,
    /// Compute backends this build supports: `cpu`, `cuda`, `metal`.
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub workers: Vec<WorkerSummary>,
}

/// A worker as its hive reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSummary {
    pub id: String,
    pub model: String,
    /// `starting`, `ready`, `busy`, `stopping`.
    pub state: String,
    pub pid: u32,
    #[serde(default)]
    pub jobs_served: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    #[test]
    fn hive_info_round_trips() {
        let info = HiveInfo {
            v: 1,
            hive_id: "h1".into(),
            version: "0.1.0".into(),
            protocol: 1,
            hostname: "box".into(),
            pid: 42,
            started_at_ms: 1,
            updated_at_ms: 2,
            slots: 1,
            busy: 0,
            backends: vec!["cpu".into()],
            workers: vec![WorkerSummary { id: "w1".into(), model: "m".into(), state: "ready".into(), pid: 7, jobs_served: 3 }],
        };
        for enc in [Encoding::Json, Encoding::Msgpack] {
            assert_eq!(enc.decode::<HiveInfo>(&enc.encode(&info)).unwrap(), info);
        }
    }
}
