//! Lifecycle jobs: model download/import/delete and worker spawn/stop.
//!
//! They follow the inference jobs' contract (job id, events on
//! `rbee.events.<job id>` and `reply_to`, `progress` events, exactly one
//! terminal event: `done` with stop reason `completed` and a `result`, or
//! `error`). They are published to `rbee.jobs.ctl.<hive id>` for one hive, or
//! to `rbee.jobs.ctl.any` for whichever hive takes it (and fits).

use serde::{Deserialize, Serialize};

use crate::error::JobError;

/// Prefix of lifecycle job subjects; the last token is a hive id or `any`.
pub const CTL_PREFIX: &str = "rbee.jobs.ctl";
/// The target meaning "whichever hive fits". No hive may be called this.
pub const ANY_HIVE: &str = "any";
/// The consumer every hive claims `rbee.jobs.ctl.any` jobs from.
pub const CTL_ANY_CONSUMER: &str = "rbee-ctl-any";

/// Where a lifecycle job for `target` (a hive id or [`ANY_HIVE`]) goes.
pub fn ctl_subject(target: &str) -> String {
    format!("{CTL_PREFIX}.{target}")
}

/// The consumer a hive claims its own lifecycle jobs from.
pub fn ctl_consumer(hive_id: &str) -> String {
    format!("rbee-ctl-{hive_id}")
}

/// A lifecycle job's body. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum CtlRequest {
    /// Download a model (an `hf:` reference or a known alias) into the hive's catalog.
    #[serde(rename = "model.download")]
    ModelDownload {
        #[serde(default = "crate::default_version")]
        v: u32,
        model: String,
        /// Register it under this alias (default: the reference itself, or the known alias).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        alias: Option<String>,
    },
    /// Register a GGUF file that is already on the hive's machine (used in place).
    #[serde(rename = "model.import")]
    ModelImport {
        #[serde(default = "crate::default_version")]
        v: u32,
        path: String,
        alias: String,
    },
    /// Remove a model from the catalog (and its file, if rbee downloaded it).
    #[serde(rename = "model.delete")]
    ModelDelete {
        #[serde(default = "crate::default_version")]
        v: u32,
        model: String,
        /// Stop the workers that use it instead of refusing.
        #[serde(default)]
        force: bool,
    },
    /// Start (pre-warm) a worker for a model.
    #[serde(rename = "worker.spawn")]
    WorkerSpawn {
        #[serde(default = "crate::default_version")]
        v: u32,
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<usize>,
        /// How long it may sit idle before it exits, ms (negative: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep_alive_ms: Option<i64>,
    },
    /// Stop a worker (it finishes its current job first).
    #[serde(rename = "worker.stop")]
    WorkerStop {
        #[serde(default = "crate::default_version")]
        v: u32,
        worker: String,
    },
}

impl CtlRequest {
    /// The operation's wire name.
    pub fn op(&self) -> &'static str {
        match self {
            CtlRequest::ModelDownload { .. } => "model.download",
            CtlRequest::ModelImport { .. } => "model.import",
            CtlRequest::ModelDelete { .. } => "model.delete",
            CtlRequest::WorkerSpawn { .. } => "worker.spawn",
            CtlRequest::WorkerStop { .. } => "worker.stop",
        }
    }

    /// The protocol version it was written for.
    pub fn version(&self) -> u32 {
        match self {
            CtlRequest::ModelDownload { v, .. }
            | CtlRequest::ModelImport { v, .. }
            | CtlRequest::ModelDelete { v, .. }
            | CtlRequest::WorkerSpawn { v, .. }
            | CtlRequest::WorkerStop { v, .. } => *v,
        }
    }

    /// Checks what can be checked without the hive.
    pub fn validate(&self) -> Result<(), JobError> {
        match self {
            CtlRequest::ModelDownload { model, alias, .. } => {
                crate::model::ModelRef::parse(model).map_err(|e| JobError::invalid(e.to_string()))?;
                if let Some(a) = alias {
                    if !crate::model::is_valid_alias(a) {
                        return Err(JobError::invalid(format!("alias {a:?} must be [a-z0-9][a-z0-9_-]*, at most 64 bytes")));
                    }
                }
            }
            CtlRequest::ModelImport { path, alias, .. } => {
                if path.is_empty() {
                    return Err(JobError::invalid("path is empty"));
                }
                if !crate::model::is_valid_alias(alias) {
                    return Err(JobError::invalid(format!("alias {alias:?} must be [a-z0-9][a-z0-9_-]*, at most 64 bytes")));
                }
            }
            CtlRequest::ModelDelete { model, .. } | CtlRequest::WorkerSpawn { model, .. } => {
                crate::model::ModelRef::parse(model).map_err(|e| JobError::invalid(e.to_string()))?;
            }
            CtlRequest::WorkerStop { worker, .. } => {
                if worker.is_empty() {
                    return Err(JobError::invalid("worker is empty"));
                }
            }
        }
        if let CtlRequest::WorkerSpawn { backend: Some(b), .. } = self {
            if !matches!(b.as_str(), "cpu" | "cuda" | "metal") {
                return Err(JobError::invalid(format!("backend {b:?}: use cpu, cuda or metal")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    #[test]
    fn lifecycle_requests_round_trip_and_reject_unknown_fields() {
        let reqs = vec![
            CtlRequest::ModelDownload { v: 1, model: "hf:a/b:c.gguf".into(), alias: Some("c".into()) },
            CtlRequest::ModelImport { v: 1, path: "/m/x.gguf".into(), alias: "x".into() },
            CtlRequest::ModelDelete { v: 1, model: "x".into(), force: true },
            CtlRequest::WorkerSpawn { v: 1, model: "x".into(), backend: Some("cpu".into()), device: None, keep_alive_ms: Some(1000) },
            CtlRequest::WorkerStop { v: 1, worker: "h-w1".into() },
        ];
        for r in reqs {
            for enc in [Encoding::Json, Encoding::Msgpack] {
                assert_eq!(enc.decode::<CtlRequest>(&enc.encode(&r)).unwrap(), r);
            }
            r.validate().unwrap();
        }
        let v: CtlRequest = Encoding::Json.decode(br#"{"op":"model.download","model":"smollm2-135m"}"#).unwrap();
        assert_eq!(v.version(), 1);
        let e = Encoding::Json.decode::<CtlRequest>(br#"{"op":"model.delete","model":"x","froce":true}"#).unwrap_err();
        assert!(e.contains("froce"), "{e}");
        let e = Encoding::Json.decode::<CtlRequest>(br#"{"op":"model.explode"}"#).unwrap_err();
        assert!(e.contains("model.explode"), "{e}");
        assert!(CtlRequest::ModelImport { v: 1, path: "p".into(), alias: "Bad".into() }.validate().is_err());
        assert_eq!(ctl_subject("h1"), "rbee.jobs.ctl.h1");
    }
}
