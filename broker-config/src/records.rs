//! Job records in the `rbee-jobs` bucket, changed only by compare-and-set.
//!
//! [`Records::transition`] is the one primitive: read the record (with its
//! revision), let the caller decide, write with `create` (no record yet) or
//! `update` (same revision), and retry on a conflict. Because every party
//! (hives, cancellers, the deadline sweeper) moves jobs through it, exactly
//! one of them wins each state change, and only the winner of a move into a
//! terminal state publishes the terminal event.

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use rbee_schemas::codec::Encoding;
use rbee_schemas::record::JobRecord;

/// A record and the revision it was read at.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

/// What a transition decides.
// Built and matched once per record write; boxing the record would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decision<T> {
    /// Write this record (create or compare-and-set), then return `T`.
    Write(JobRecord, T),
    /// Leave the record as it is and return `T`.
    Keep(T),
}

#[derive(Debug, thiserror::Error)]
#[error("job records ({op}): {source}")]
pub struct RecordError {
    pub op: &'static str,
    pub source: async_nats::Error,
}

fn err(op: &'static str) -> impl FnOnce(async_nats::Error) -> RecordError {
    move |source| RecordError { op, source }
}

/// Handle on the `rbee-jobs` bucket.
#[derive(Debug, Clone)]
pub struct Records {
    kv: kv::Store,
}

impl Records {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<Versioned>, RecordError> {
        let entry = self.kv.entry(job_id).await.map_err(|e| err("read")(e.into()))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = Encoding::Json
            .decode(&entry.value)
            .map_err(|e| err("decode")(format!("record {job_id}: {e}").into()))?;
        Ok(Some(Versioned { record, revision: entry.revision }))
    }

    /// Creates the record; `None` if one exists already.
    pub async fn create(&self, rec: &JobRecord) -> Result<Option<u64>, RecordError> {
        match self.kv.create(&rec.job_id, Encoding::Json.encode(rec).into()).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(err("create")(e.into())),
        }
    }

    /// Replaces the record if it is still at `revision`; `None` if it moved on.
    pub async fn update(&self, rec: &JobRecord, revision: u64) -> Result<Option<u64>, RecordError> {
        match self.kv.update(&rec.job_id, Encoding::Json.encode(rec).into(), revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(err("update")(e.into())),
        }
    }

    /// Writes the record whatever is there.
    pub async fn put(&self, rec: &JobRecord) -> Result<u64, RecordError> {
        self.kv.put(&rec.job_id, Encoding::Json.encode(rec).into()).await.map_err(|e| err("put")(e.into()))
    }

    /// Read, decide, compare-and-set; repeated while others change the record.
    pub async fn transition<T>(
        &self,
        job_id: &str,
        decide: impl FnMut(Option<&Versioned>) -> Decision<T>,
    ) -> Result<(T, Option<Versioned>), RecordError> {
        self.transition_from(job_id, None, decide).await
    }

    /// [`transition`](Self::transition) starting from a version the caller
    /// believes current (the one it wrote last), saving the read: if someone
    /// changed the record since, the compare-and-set fails and the record is
    /// read as usual.
    pub async fn transition_from<T>(
        &self,
        job_id: &str,
        mut guess: Option<Versioned>,
        mut decide: impl FnMut(Option<&Versioned>) -> Decision<T>,
    ) -> Result<(T, Option<Versioned>), RecordError> {
        for _ in 0..32 {
            let current = match guess.take() {
                Some(v) => Some(v),
                None => self.get(job_id).await?,
            };
            match decide(current.as_ref()) {
                Decision::Keep(t) => return Ok((t, current)),
                Decision::Write(rec, t) => {
                    let written = match &current {
                        None => self.create(&rec).await?,
                        Some(v) => self.update(&rec, v.revision).await?,
                    };
                    if let Some(revision) = written {
                        return Ok((t, Some(Versioned { record: rec, revision })));
                    }
                }
            }
        }
        Err(err("transition")(format!("record {job_id} kept changing under 32 attempts").into()))
    }

    /// Every record (for `rbee jobs list`).
    pub async fn list(&self) -> Result<Vec<JobRecord>, RecordError> {
        let ids = crate::kv_keys(&self.kv).await.map_err(err("list"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self.get(&id).await? {
                out.push(v.record);
            }
        }
        Ok(out)
    }
}
