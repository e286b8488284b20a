//! Log lines hives publish on `rbee.logs.<hive id>` (kept an hour in
//! `RBEE_LOGS`), for `rbee logs`. JSON, one line per message.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Unix time, ms.
    pub ts_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`.
    pub level: String,
    pub hive: String,
    /// The worker the line comes from (its stderr), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields, as the hive prints them.
    pub message: String,
}
