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
    /// Compute backends this hive runs workers on: `cpu`, `cuda`, `metal`.
    #[serde(default)]
    pub backends: Vec<String>,
    /// Devices, e.g. `cpu`, `cuda:0`.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Memory of the machine, bytes.
    #[serde(default)]
    pub ram_total: u64,
    /// Memory available now (MemAvailable), bytes.
    #[serde(default)]
    pub ram_free: u64,
    /// The hive's own memory budget for workers (`--memory-limit`), bytes; 0 = none.
    #[serde(default)]
    pub memory_limit: u64,
    /// Memory its workers' models are estimated to take, bytes.
    #[serde(default)]
    pub memory_used: u64,
    /// The part of `memory_used` that `ram_free`/`vram_free` do not show
    /// yet: workers still loading, and room set aside for ones about to
    /// start, bytes. Other hives subtract it, so they do not leave a job for
    /// room a load in progress is about to take.
    #[serde(default)]
    pub memory_pending: u64,
    /// The model of the GPU its workers run on, as its driver names it
    /// (`NVIDIA H200`); empty for CPU hives and where it cannot be read.
    #[serde(default)]
    pub gpu_name: String,
    /// Memory of the GPU its workers run on (`devices`), bytes; 0 where
    /// there is none or it cannot be read. A hive that knows it places
    /// models by it instead of RAM.
    #[serde(default)]
    pub vram_total: u64,
    #[serde(default)]
    pub vram_free: u64,
    /// Space available on the filesystem of its models directory, bytes;
    /// 0 where it cannot be read.
    #[serde(default)]
    pub disk_free: u64,
    /// Free space its downloads must leave there (`--disk-reserve`), bytes;
    /// 0 from hives older than this field.
    #[serde(default)]
    pub disk_reserve: u64,
    #[serde(default)]
    pub workers: Vec<WorkerSummary>,
    /// The models in the hive's catalog.
    #[serde(default)]
    pub models: Vec<ModelSummary>,
}

impl HiveInfo {
    /// Bytes a download could still write here: free disk above the reserve.
    pub fn disk_room(&self) -> u64 {
        self.disk_free.saturating_sub(self.disk_reserve)
    }

    /// Memory this hive could still give a new worker, bytes.
    pub fn memory_available(&self) -> u64 {
        let vram = (self.vram_total > 0).then_some(self.vram_free);
        memory_available(self.ram_free, vram, self.memory_limit, self.memory_used, self.memory_pending)
    }
}

/// Memory a new worker could still take on a hive, bytes: the free memory
/// of its GPU where it runs workers on one it can read (`vram_free`), else
/// the machine's available RAM (0: unknown, so only the limit counts),
/// less what loads in progress are about to take (`pending`); within the
/// hive's `--memory-limit` (0: none) less what its workers are estimated
/// to take (`used`, `pending` included). Every hive decides by this, for
/// itself and for the others it might leave a job to.
pub fn memory_available(ram_free: u64, vram_free: Option<u64>, limit: u64, used: u64, pending: u64) -> u64 {
    let by_limit = if limit > 0 { limit.saturating_sub(used) } else { u64::MAX };
    match vram_free {
        Some(free) => free.saturating_sub(pending).min(by_limit),
        // RAM that loads in progress take up is none left, not "unknown" (0).
        None if ram_free > 0 => ram_free.saturating_sub(pending).min(by_limit),
        None => by_limit,
    }
}

/// A model in a hive's catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Catalog key: alias, or full reference.
    pub key: String,
    pub source: String,
    pub format: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub quantization: String,
    pub size: u64,
    /// The file's sha256 (hex), as the catalog recorded it ("" from hives
    /// before this field).
    #[serde(default)]
    pub sha256: String,
    /// False when the catalog entry's file has vanished.
    #[serde(default = "yes")]
    pub present: bool,
    /// Memory a worker for it is estimated to need on this hive, as the
    /// hive's placement counts it: the weights as its workers hold them,
    /// and a KV cache per slot at the longest context. 0: not known (a hive
    /// from before this field).
    #[serde(default)]
    pub memory: u64,
}

impl ModelSummary {
    /// Whether `model` (`key`, its canonical spelling) names this one: the
    /// catalog key, or the source it was registered from
    /// ([`ModelRef::matches_source`](crate::model::ModelRef::matches_source)), as the hive's own catalog finds it.
    pub fn is_named_by(&self, model: &crate::model::ModelRef, key: &str) -> bool {
        self.key == key || model.matches_source(&self.source)
    }

    /// [`Self::is_named_by`], and its file is there.
    pub fn is_present(&self, model: &crate::model::ModelRef, key: &str) -> bool {
        self.present && self.is_named_by(model, key)
    }
}

fn yes() -> bool {
    true
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
            devices: vec!["cpu".into()],
            gpu_name: String::new(),
            ram_total: 8 << 30,
            ram_free: 4 << 30,
            memory_limit: 2 << 30,
            memory_used: 1 << 30,
            memory_pending: 0,
            vram_total: 0,
            vram_free: 0,
            disk_free: 100 << 30,
            disk_reserve: 1 << 30,
            workers: vec![WorkerSummary { id: "w1".into(), model: "m".into(), state: "ready".into(), pid: 7, jobs_served: 3 }],
            models: vec![ModelSummary {
                key: "m".into(),
                source: "hf:a/b:c.gguf".into(),
                format: "gguf".into(),
                architecture: "llama".into(),
                quantization: "q4_1".into(),
                size: 5,
                sha256: "ab".repeat(32),
                present: true,
                memory: 9,
            }],
        };
        assert_eq!(info.memory_available(), 1 << 30);
        assert_eq!(info.disk_room(), 99 << 30, "free disk above the reserve");
        assert_eq!(HiveInfo { disk_free: 1 << 20, ..info.clone() }.disk_room(), 0, "below the reserve: no room, not negative");
        // A GPU hive: its VRAM decides, not its RAM.
        let gpu = HiveInfo { gpu_name: "NVIDIA H200".into(), vram_total: 80 << 30, vram_free: 60 << 30, memory_limit: 0, ..info.clone() };
        assert_eq!(Encoding::Json.decode::<HiveInfo>(&Encoding::Json.encode(&gpu)).unwrap(), gpu);
        assert_eq!(gpu.memory_available(), 60 << 30);
        let full_gpu = HiveInfo { vram_free: 1 << 20, ..gpu.clone() };
        assert_eq!(full_gpu.memory_available(), 1 << 20);
        assert_eq!(memory_available(0, None, 0, 0, 0), u64::MAX, "nothing known, no limit: no bound");
        assert_eq!(memory_available(0, None, 4 << 30, 1 << 30, 0), 3 << 30);
        assert_eq!(memory_available(8 << 30, Some(2 << 30), 4 << 30, 3 << 30, 0), 1 << 30);
        // A load in progress: the free reading does not show it yet.
        let loading = HiveInfo { memory_limit: 0, memory_pending: 3 << 30, ..info.clone() };
        assert_eq!(loading.memory_available(), 1 << 30);
        assert_eq!(memory_available(1 << 30, None, 0, 2 << 30, 2 << 30), 0, "all of the RAM pending: none left, not unknown");
        assert_eq!(memory_available(0, None, 4 << 30, 3 << 30, 1 << 30), 1 << 30, "RAM unknown: the limit alone");
        assert_eq!(memory_available(8 << 30, Some(2 << 30), 0, 3 << 30, 1 << 30), 1 << 30, "GPU memory less what is loading");
        for enc in [Encoding::Json, Encoding::Msgpack] {
            assert_eq!(enc.decode::<HiveInfo>(&enc.encode(&info)).unwrap(), info);
        }
        // A model as a hive before `memory` listed it: not known.
        let old = r#"{"key":"m","source":"s","format":"gguf","size":5}"#;
        let m = Encoding::Json.decode::<ModelSummary>(old.as_bytes()).unwrap();
        assert_eq!((m.memory, m.present, m.sha256.as_str()), (0, true, ""));
    }

    #[test]
    fn worker_info_round_trips_and_reads_older_hives_entries() {
        // As a hive before `draining` wrote it.
        let old = r#"{"v":1,"id":"h-w0","hive":"h","model":"m","state":"busy","pid":7,"backend":"cpu","device":"cpu",
            "started_at_ms":1,"jobs_served":2,"last_activity_ms":3,"keep_alive_ms":-1,"memory":5,"slots":4}"#;
        let info: WorkerInfo = Encoding::Json.decode(old.as_bytes()).unwrap();
        assert_eq!((info.state, info.keep_alive_ms, info.slots, info.draining), (WorkerState::Busy, -1, 4, false));
        let draining = WorkerInfo { draining: true, ..info };
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let back: WorkerInfo = enc.decode(&enc.encode(&draining)).unwrap();
            assert_eq!((back.id.as_str(), back.state, back.draining), ("h-w0", WorkerState::Busy, true));
        }
        // A state a later hive may add reads as unknown, not as an error.
        let later = old.replace("\"busy\"", "\"hibernating\"");
        assert_eq!(Encoding::Json.decode::<WorkerInfo>(later.as_bytes()).unwrap().state, WorkerState::Unknown);
    }
}

/// A worker in the `rbee-workers` registry (key = worker id). Written by its
/// hive on every state change and with every heartbeat; the bucket's TTL
/// removes the workers of a hive that died.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    #[serde(default = "crate::default_version")]
    pub v: u32,
    pub id: String,
    pub hive: String,
    /// Catalog key of its model.
    pub model: String,
    pub state: WorkerState,
    pub pid: u32,
    pub backend: String,
    pub device: String,
    pub started_at_ms: u64,
    pub jobs_served: u64,
    pub last_activity_ms: u64,
    /// Idle time after which it exits, ms; negative = never.
    #[serde(default)]
    pub keep_alive_ms: i64,
    /// Estimated memory of its model, bytes.
    #[serde(default)]
    pub memory: u64,
    /// Jobs it runs at once (see `ModelInfo::slots`); 0 while it loads, or
    /// from hives that do not say.
    #[serde(default)]
    pub slots: u32,
    /// Takes no new jobs: a job for another model waits for the memory it
    /// holds. It finishes the jobs it runs, then stops.
    #[serde(default)]
    pub draining: bool,
}

/// A worker's life: starting → loading → ready ⇄ busy → stopping → gone
/// (gone = removed from the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Starting,
    Loading,
    Ready,
    Busy,
    Stopping,
    #[serde(other)]
    Unknown,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Loading => "loading",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Stopping => "stopping",
            WorkerState::Unknown => "unknown",
        }
    }
}
