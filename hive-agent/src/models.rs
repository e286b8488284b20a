//! Getting models into the catalog and out of it: downloads from the Hugging
//! Face hub (hf-hub), imports of local GGUF files, deletes.
//!
//! Downloads go into `<models dir>/hf`, hf-hub's cache layout
//! (`models--org--repo/blobs/<etag>`, `snapshots/<commit>/<file>`). hf-hub
//! downloads in 10 MB chunks into `<blob>.sync.part` and records how far it
//! got, so an interrupted download resumes where it stopped: this module
//! retries a download that made progress (a dropped connection) a few times,
//! and a later `model.download` of the same file resumes too. Before a model
//! is registered its size is checked against the hub's and its sha256 against
//! the hub's LFS etag (and against the known hash of a known model); a file
//! that fails is deleted and never registered. A `.sync.part` file is never
//! registered: only a completed, verified blob is.
//!
//! Each try of a download runs on a thread with a runtime of its own, so a
//! cancelled or failed try stops all of hf-hub's chunk tasks with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError, Progress as HubProgress};
use hf_hub::{Repo, RepoType};
use rbee_schemas::error::{ErrorCode, JobError};
use rbee_schemas::model::{HfRef, ModelRef};

use crate::catalog::{now_ms, sha256_file, Catalog, ModelEntry, KNOWN_MODELS};
use crate::system::human;

/// Where and how this hive downloads.
#[derive(Debug, Clone)]
pub struct Downloader {
    /// The hub, e.g. `https://huggingface.co` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// `<models dir>/hf`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, for gated and private repos.
    pub token: Option<String>,
    /// Tries per download; each resumes the previous one.
    pub attempts: u32,
    /// Free space a download must leave where the models go (`--disk-reserve`), bytes.
    pub disk_reserve: u64,
    /// `--test-disk-free`: this many bytes free, whatever the disk says.
    pub fixed_free: Option<u64>,
    /// Downloads sent to any hive that turned out too big for this disk:
    /// job id → what it fetches, and when that was learnt.
    pub too_big: Arc<Mutex<HashMap<String, (TooBig, Instant)>>>,
}

/// A download found too big for this disk: the file's size and its repo.
#[derive(Debug, Clone)]
pub struct TooBig {
    pub size: u64,
    pub hf: HfRef,
}

/// How long a hive remembers a download too big for its disk.
const TOO_BIG_FOR: Duration = Duration::from_secs(3600);

/// Bytes done and in all, shared between hf-hub's progress callbacks and the job.
#[derive(Debug, Clone, Default)]
pub struct Transfer {
    pub done: Arc<AtomicU64>,
    pub total: Arc<AtomicU64>,
}

impl HubProgress for Transfer {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.total.store(size as u64, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    async fn update(&mut self, size: usize) {
        self.done.fetch_add(size as u64, Ordering::Relaxed);
    }

    async fn finish(&mut self) {}
}

fn unreachable_hint(endpoint: &str, what: &str) -> String {
    format!(
        "cannot reach the Hugging Face hub at {endpoint} ({what}). If this machine is offline, copy the GGUF file \
         here and register it with: rbee models import PATH --alias NAME --hive HIVE"
    )
}

/// The catalog key and hub reference a download request names.
pub fn download_target(model: &ModelRef) -> Result<(HfRef, Option<&'static crate::catalog::KnownModel>), JobError> {
    match model {
        ModelRef::Hf(h) => Ok((h.clone(), KNOWN_MODELS.iter().find(|k| k.hf == model.to_string()))),
        ModelRef::Alias(a) => {
            let k = KNOWN_MODELS.iter().find(|k| k.alias == a).ok_or_else(|| {
                JobError::new(
                    ErrorCode::UnknownModel,
                    format!("{a:?} is not a model rbee knows how to download; name it as hf:org/repo[@revision][:file.gguf]"),
                )
            })?;
            match ModelRef::parse(k.hf) {
                Ok(ModelRef::Hf(h)) => Ok((h, Some(k))),
                _ => Err(JobError::internal(format!("known model {} has a bad reference", k.alias))),
            }
        }
    }
}

/// `Some(bytes still to download)` when a download of `total` bytes (0:
/// not known yet), `done` of them written, does not fit in `free` and keep
/// `reserve` free. A resumed download needs only the rest: hf-hub reports
/// the bytes it resumed from as done (its temporary file is sparse).
fn short_of_disk(free: u64, total: u64, done: u64, reserve: u64) -> Option<u64> {
    let left = total.saturating_sub(done);
    (free < left.saturating_add(reserve)).then_some(left)
}

/// Space available to this user on the filesystem that holds `path` (or
/// its nearest existing parent), bytes; `None` where it cannot be read.
pub fn disk_free(path: &Path) -> Option<u64> {
    let st = path.ancestors().find_map(|p| rustix::fs::statvfs(p).ok())?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Downloader {
    /// This disk's room (see [`Downloader::room`]) when a file of `need`
    /// bytes does not fit in it, or, for `need` 0, when the disk is below
    /// its reserve: no download can start here now. `None` when it fits or
    /// the free space cannot be read.
    pub fn short_of(&self, need: u64) -> Option<u64> {
        let free = self.free()?;
        short_of_disk(free, need, 0, self.disk_reserve).map(|_| free.saturating_sub(self.disk_reserve))
    }

    /// Free space where the models go, bytes; `None` where it cannot be read.
    pub fn free(&self) -> Option<u64> {
        self.fixed_free.or_else(|| disk_free(&self.cache_dir))
    }

    /// What a download could still write here: free space above the reserve.
    pub fn room(&self) -> Option<u64> {
        self.free().map(|free| free.saturating_sub(self.disk_reserve))
    }

    /// Notes that the download job `job` needs `size` bytes of `hf`'s repo,
    /// more than this disk has room for: a later delivery of it is left for
    /// another hive.
    pub fn note_too_big(&self, job: &str, hf: &HfRef, size: u64) {
        let mut m = self.too_big.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, (_, at)| at.elapsed() < TOO_BIG_FOR);
        m.insert(job.to_owned(), (TooBig { size, hf: hf.clone() }, Instant::now()));
    }

    /// What the download job `job` was found to need here, if it was too big.
    pub fn too_big(&self, job: &str) -> Option<TooBig> {
        let m = self.too_big.lock().unwrap_or_else(|e| e.into_inner());
        m.get(job).filter(|(_, at)| at.elapsed() < TOO_BIG_FOR).map(|(t, _)| t.clone())
    }

    /// Fails `INSUFFICIENT_DISK` when what is left of `transfer` would leave
    /// less than `disk_reserve` free where the models go. Called before the
    /// download starts (the size unknown: the reserve alone), then every
    /// progress tick: the first one after the hub said the file's size, and
    /// on while it downloads, as other writers share the disk.
    pub fn check_room(&self, transfer: &Transfer) -> Result<(), JobError> {
        let Some(free) = self.free() else { return Ok(()) };
        let (total, done) = (transfer.total.load(Ordering::Relaxed), transfer.done.load(Ordering::Relaxed));
        let Some(left) = short_of_disk(free, total, done, self.disk_reserve) else { return Ok(()) };
        let (dir, free, keep) = (self.cache_dir.display(), human(free), human(self.disk_reserve));
        let what = match left {
            0 => format!("{dir} has {free} free, and this hive keeps {keep} free (--disk-reserve)"),
            left => format!("the download needs {} more and {dir} has {free} free, of which this hive keeps {keep} (--disk-reserve)", human(left)),
        };
        Err(JobError::new(
            ErrorCode::InsufficientDisk,
            format!("{what}; delete models (rbee models delete), free space, or lower --disk-reserve"),
        ))
    }

    /// Deletes what an unfinished download of a file of `size` bytes from
    /// `hf`'s repo left here: hf-hub's `blobs/<etag>.sync.part` (`size` + 8
    /// bytes: the file, then how far it got) and its lock file. For a
    /// download handed to a hive with more room: its part here would keep
    /// disk that this hive is short of, for a resume that will not come.
    /// A part whose lock a download holds is left; the try that just
    /// stopped lets go of it within moments, so this waits up to `wait`.
    /// Returns the bytes it freed on disk (a part file is sparse), `None`
    /// when it deleted nothing.
    pub fn drop_partial(&self, hf: &HfRef, size: u64, wait: Duration) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let blobs = self.cache_dir.join(Repo::new(hf.repo.clone(), RepoType::Model).folder_name()).join("blobs");
        let dir = std::fs::read_dir(&blobs).ok()?;
        let mut freed = None;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(etag) = name.strip_suffix(".sync.part") else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.len() != size.saturating_add(8) {
                continue;
            }
            let lock = blobs.join(format!("{etag}.lock"));
            let Some(_held) = lock_when_free(&lock, wait) else {
                tracing::warn!(file = %entry.path().display(), "a download still holds this part file; left");
                continue;
            };
            if std::fs::remove_file(entry.path()).is_ok() {
                *freed.get_or_insert(0) += meta.blocks() * 512;
            }
            let _ = std::fs::remove_file(&lock);
        }
        freed
    }

    fn api(&self) -> Result<Api, JobError> {
        ApiBuilder::new()
            .with_endpoint(self.endpoint.clone())
            .with_cache_dir(self.cache_dir.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| JobError::internal(format!("hf-hub client: {e}")))
    }

    fn map_error(&self, e: ApiError, hf: &HfRef, file: &str) -> JobError {
        let rev = hf.revision.as_deref().unwrap_or("main");
        match e {
            ApiError::RequestError(r) => match r.status().map(|s| s.as_u16()) {
                Some(404) => JobError::new(
                    ErrorCode::UnknownModel,
                    format!("the hub at {} has no file {file} in {}@{rev}", self.endpoint, hf.repo),
                ),
                Some(401 | 403) => JobError::new(
                    ErrorCode::ModelSourceUnreachable,
                    format!("the hub refused {}@{rev}/{file}: a gated or private repo; accept its terms and set HF_TOKEN for the hive", hf.repo),
                ),
                Some(s) => JobError::new(ErrorCode::ModelSourceUnreachable, unreachable_hint(&self.endpoint, &format!("HTTP {s}"))),
                None => JobError::new(ErrorCode::ModelSourceUnreachable, unreachable_hint(&self.endpoint, &error_chain(&r))),
            },
            ApiError::TooManyRetries(inner) => self.map_error(*inner, hf, file),
            ApiError::LockAcquisition(p) => JobError::new(
                ErrorCode::Internal,
                format!("another download of {} is running (lock {}); wait for it", file, p.display()),
            ),
            ApiError::IoError(io) if io.kind() == std::io::ErrorKind::StorageFull => JobError::new(
                ErrorCode::InsufficientDisk,
                format!("the disk under {} is full: {io}; delete models (rbee models delete) or free space", self.cache_dir.display()),
            ),
            ApiError::IoError(io) => JobError::internal(format!("writing the download under {}: {io}", self.cache_dir.display())),
            other => JobError::new(ErrorCode::ModelSourceUnreachable, format!("download from {} failed: {other}", self.endpoint)),
        }
    }

    /// Picks the file of a reference without one: the repo's only GGUF file.
    async fn pick_file(&self, hf: &HfRef) -> Result<String, JobError> {
        if let Some(f) = &hf.file {
            return Ok(f.clone());
        }
        let api = self.api()?;
        let repo = Repo::with_revision(hf.repo.clone(), RepoType::Model, hf.revision.clone().unwrap_or_else(|| "main".to_owned()));
        let info = api.repo(repo).info().await.map_err(|e| self.map_error(e, hf, "(repo listing)"))?;
        let ggufs: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).filter(|f| f.ends_with(".gguf")).collect();
        match ggufs.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(JobError::new(ErrorCode::UnknownModel, format!("hf:{} has no GGUF file; rbee runs GGUF models", hf.repo))),
            many => Err(JobError::invalid(format!(
                "hf:{} has {} GGUF files; name one: {}",
                hf.repo,
                many.len(),
                many.iter().map(|f| format!("hf:{}:{f}", hf.repo)).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// One try at `file` through hf-hub, on a runtime of its own on a thread
    /// of its own. hf-hub 0.4 spawns a task per chunk up front and keeps no
    /// handle that stops them: dropped (a cancelled job, a hive draining) or
    /// failed, its download would go on fetching every remaining chunk in the
    /// background. Here the runtime goes when this future is dropped or the
    /// try ends, and its chunk tasks with it.
    async fn try_download(api: Api, hf: &HfRef, file: &str, transfer: &Transfer) -> Result<PathBuf, ApiError> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        // Dropped with this future: the download's thread then stops.
        let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (hf, file, transfer) = (hf.clone(), file.to_owned(), transfer.clone());
        let spawned = std::thread::Builder::new().name("rbee-download".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return drop(done_tx.send(Err(ApiError::IoError(e)))),
            };
            runtime.block_on(async move {
                let revision = hf.revision.clone().unwrap_or_else(|| "main".to_owned());
                let repo = api.repo(Repo::with_revision(hf.repo.clone(), RepoType::Model, revision));
                tokio::select! {
                    r = repo.download_with_progress(&file, transfer) => drop(done_tx.send(r)),
                    _ = stop_rx => {}
                }
            });
            // Aborts the chunk tasks still running (their file writes are
            // short blocking tasks, waited for a moment).
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        if let Err(e) = spawned {
            return Err(ApiError::IoError(e));
        }
        done_rx.await.unwrap_or_else(|_| Err(ApiError::IoError(std::io::Error::other("the download thread stopped"))))
    }

    /// Downloads (resuming) and verifies one file; returns its blob path, size and sha256.
    pub async fn fetch(&self, hf: &HfRef, transfer: &Transfer) -> Result<(PathBuf, u64, String, String), JobError> {
        let file = self.pick_file(hf).await?;
        let api = self.api()?;
        let mut attempt = 0;
        let pointer = loop {
            attempt += 1;
            let before = transfer.done.load(Ordering::Relaxed);
            match Self::try_download(api.clone(), hf, &file, transfer).await {
                Ok(p) => break p,
                Err(e) => {
                    let progressed = transfer.done.load(Ordering::Relaxed) > before;
                    let transient = matches!(&e, ApiError::RequestError(r) if r.status().is_none())
                        || matches!(&e, ApiError::TooManyRetries(_))
                        || matches!(&e, ApiError::IoError(io) if io.kind() != std::io::ErrorKind::StorageFull);
                    if attempt >= self.attempts || !(progressed && transient) {
                        return Err(self.map_error(e, hf, &file));
                    }
                    tracing::warn!(error = %e, attempt, "download interrupted; resuming");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        };
        let blob = std::fs::canonicalize(&pointer).map_err(|e| JobError::internal(format!("{}: {e}", pointer.display())))?;
        let etag = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let size = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        let expected = transfer.total.load(Ordering::Relaxed);
        let b = blob.clone();
        let sha = tokio::task::spawn_blocking(move || sha256_file(&b))
            .await
            .map_err(|e| JobError::internal(e.to_string()))?
            .map_err(|e| JobError::internal(format!("hashing {}: {e}", blob.display())))?;
        // LFS files have their sha256 as etag; small git files a sha1, not checked here.
        let hub_sha = (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())).then(|| etag.to_ascii_lowercase());
        let bad = if expected > 0 && size != expected {
            Some(format!("it has {size} bytes, the hub said {expected}"))
        } else if hub_sha.as_ref().is_some_and(|h| *h != sha) {
            Some(format!("its sha256 is {sha}, the hub said {}", hub_sha.unwrap_or_default()))
        } else {
            None
        };
        if let Some(why) = bad {
            let _ = std::fs::remove_file(&pointer);
            let _ = std::fs::remove_file(&blob);
            return Err(JobError::new(
                ErrorCode::ModelVerificationFailed,
                format!("the download of {file} from hf:{} failed verification ({why}); it was deleted. Try again", hf.repo),
            ));
        }
        Ok((pointer, size, sha, file))
    }
}

/// The exclusive `flock` hf-hub takes on a blob's lock file while it
/// downloads it, taken here once free (tried every 50 ms for `wait`);
/// held while the returned file lives.
fn lock_when_free(path: &Path, wait: Duration) -> Option<std::fs::File> {
    use rustix::fs::{flock, FlockOperation};
    let file = std::fs::File::options().create(true).truncate(false).write(true).open(path).ok()?;
    let until = Instant::now() + wait;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Some(file),
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a GGUF header says about its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFacts {
    pub architecture: String,
    /// The dominant weight type, e.g. `q4_1`.
    pub quantization: String,
    /// KV-cache bytes per token of context (see [`ModelEntry::kv_bytes_per_token`]); 0 where the header does not say.
    pub kv_bytes_per_token: u64,
    /// `<architecture>.context_length`; 0 where the header does not say.
    pub context_length: u32,
    /// The weights' bytes once a worker holds them ([`resident_bytes`] of every tensor).
    pub weight_bytes: u64,
}

/// Bytes `n` elements of GGUF type `t` take in a worker's memory. The fast
/// CPU engine widens some types when it loads them (worker/src/fast/quant.rs,
/// `Src::packed`): Q4_K into Q4_1 blocks (20 bytes per 32 values), Q5_0 into
/// Q8_0 (34), Q5_1, Q5_K and Q6_K one value per byte with a scale and a
/// minimum or two scales per 32 (36). Every other type as in the file.
pub fn resident_bytes(t: candle_core::quantized::GgmlDType, n: u64) -> u64 {
    use candle_core::quantized::GgmlDType as G;
    let per_32 = match t {
        G::Q4K => 20,
        G::Q5_0 => 34,
        G::Q5_1 | G::Q5K | G::Q6K => 36,
        _ => return n / t.block_size() as u64 * t.type_size() as u64,
    };
    n / 32 * per_32
}

/// Reads a GGUF file's header (not its weights).
pub fn inspect_gguf(path: &Path) -> Result<GgufFacts, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Buffered: the header is one small read per field and vocabulary string.
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::BufReader::with_capacity(1 << 20, f))
        .map_err(|e| format!("{} is not a GGUF file rbee can read: {e}", path.display()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "unknown".to_owned());
    let mut by_type: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut weight_bytes = 0;
    for t in content.tensor_infos.values() {
        let n = t.shape.elem_count() as u64;
        *by_type.entry(format!("{:?}", t.ggml_dtype).to_ascii_lowercase()).or_default() += n;
        weight_bytes += resident_bytes(t.ggml_dtype, n);
    }
    let quant = by_type.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t).unwrap_or_else(|| "unknown".to_owned());
    let num = |key: &str| content.metadata.get(&format!("{arch}.{key}")).and_then(|v| v.to_u32().ok()).map_or(0, u64::from);
    let (layers, heads, dim) = (num("block_count"), num("attention.head_count"), num("embedding_length"));
    // Without a KV head count, every head has its own keys and values.
    let kv_heads = Some(num("attention.head_count_kv")).filter(|&n| n > 0).unwrap_or(heads);
    let head_dim = Some(num("attention.key_length")).filter(|&n| n > 0).or_else(|| (heads > 0).then(|| dim / heads)).unwrap_or(0);
    let (kv_bytes_per_token, context_length) = (2 * layers * kv_heads * head_dim * 2, num("context_length") as u32);
    Ok(GgufFacts { architecture: arch, quantization: quant, kv_bytes_per_token, context_length, weight_bytes })
}

/// Registers a local file: used in place, never moved or deleted by rbee.
pub fn import(catalog: &Catalog, path: &Path, alias: &str) -> Result<ModelEntry, JobError> {
    let path = std::fs::canonicalize(path).map_err(|e| {
        JobError::invalid(format!("{}: {e} (the path is read on the hive's machine)", path.display()))
    })?;
    if !path.is_file() {
        return Err(JobError::invalid(format!("{} is not a file", path.display())));
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let sha256 = sha256_file(&path).map_err(|e| JobError::internal(format!("hashing {}: {e}", path.display())))?;
    let source = format!("file:{}", path.display());
    register(catalog, alias, &source, path, size, sha256)
}

/// Registers a GGUF file (downloaded and verified, or imported) with what its header says.
pub fn register(
    catalog: &Catalog,
    key: &str,
    source: &str,
    path: PathBuf,
    size: u64,
    sha256: String,
) -> Result<ModelEntry, JobError> {
    let facts = inspect_gguf(&path).map_err(|e| JobError::new(ErrorCode::ModelLoadFailed, e))?;
    let now = now_ms();
    let entry = ModelEntry {
        key: key.to_owned(),
        source: source.to_owned(),
        path,
        format: "gguf".to_owned(),
        architecture: facts.architecture,
        quantization: facts.quantization,
        size,
        sha256,
        added_at_ms: now,
        last_used_ms: 0,
        kv_bytes_per_token: facts.kv_bytes_per_token,
        context_length: facts.context_length,
        weight_bytes: facts.weight_bytes,
    };
    catalog.put(&entry)?;
    Ok(entry)
}

/// Fills in [`ModelEntry::weight_bytes`] for entries registered before rbee
/// counted it, from each one's GGUF header, so that their workers' memory
/// estimates count widened weights too. Entries whose file cannot be read
/// (not there yet, or not a GGUF) are left as they are. Returns how many
/// were updated. Run once at start; a header takes ~10 ms to read.
pub fn fill_weight_sizes(catalog: &Catalog) -> Result<usize, JobError> {
    let mut updated = 0;
    for mut entry in catalog.list()? {
        if entry.weight_bytes > 0 || entry.format != "gguf" {
            continue;
        }
        let Ok(facts) = inspect_gguf(&entry.path) else { continue };
        entry.weight_bytes = facts.weight_bytes;
        catalog.put(&entry)?;
        updated += 1;
    }
    Ok(updated)
}

/// Removes a catalog entry, and its file when this module downloaded it
/// (under `<models dir>/hf`); imported files and files fetched by other means
/// are left where they are.
pub fn delete(catalog: &Catalog, entry: &ModelEntry) -> Result<bool, JobError> {
    catalog.remove(&entry.key)?;
    if !entry.path.starts_with(catalog.models_dir().join("hf")) {
        return Ok(false);
    }
    // A downloaded file is a snapshot link to a blob: remove both.
    let removed = std::fs::canonicalize(&entry.path).is_ok_and(|blob| std::fs::remove_file(blob).is_ok());
    let _ = std::fs::remove_file(&entry.path);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{self, Value};

    fn header(path: &Path, meta: &[(&str, Value)]) {
        let mut f = std::fs::File::create(path).unwrap();
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &meta, &[]).unwrap();
    }

    #[test]
    fn a_download_must_leave_the_reserve_free() {
        let gib = 1 << 30;
        // Size not known yet: only the reserve.
        assert_eq!(short_of_disk(2 * gib, 0, 0, gib), None);
        assert_eq!(short_of_disk(gib - 1, 0, 0, gib), Some(0));
        // 5 GiB to fetch, 6 GiB free: 1 GiB left, the reserve exactly.
        assert_eq!(short_of_disk(6 * gib, 5 * gib, 0, gib), None);
        assert_eq!(short_of_disk(6 * gib - 1, 5 * gib, 0, gib), Some(5 * gib));
        // Resumed at 4 GiB of 5: only the last one is needed.
        assert_eq!(short_of_disk(2 * gib, 5 * gib, 4 * gib, gib), None);
        // No reserve: the file alone.
        assert_eq!(short_of_disk(gib, gib, 0, 0), None);
        assert_eq!(short_of_disk(u64::MAX - 1, u64::MAX, 0, 1), Some(u64::MAX), "no overflow");
    }

    fn downloader(cache_dir: &Path) -> Downloader {
        Downloader {
            endpoint: "http://127.0.0.1:9".into(),
            cache_dir: cache_dir.to_path_buf(),
            token: None,
            attempts: 1,
            disk_reserve: 0,
            fixed_free: None,
            too_big: Arc::default(),
        }
    }

    #[test]
    fn a_full_disk_mid_download_is_insufficient_disk() {
        let d = downloader(Path::new("/models/hf"));
        let hf = HfRef { repo: "org/repo".into(), revision: None, file: Some("m.gguf".into()) };
        let full = ApiError::IoError(std::io::Error::from(std::io::ErrorKind::StorageFull));
        let e = d.map_error(full, &hf, "m.gguf");
        assert_eq!(e.code, ErrorCode::InsufficientDisk);
        assert!(e.message.contains("the disk under /models/hf is full") && e.message.contains("rbee models delete"), "{}", e.message);
        // Any other write failure is not the disk's size.
        let denied = ApiError::IoError(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(d.map_error(denied, &hf, "m.gguf").code, ErrorCode::Internal);
    }

    #[test]
    fn an_unfinished_download_part_is_deleted_unless_a_download_holds_it() {
        use rustix::fs::{flock, FlockOperation};
        let dir = tempfile::tempdir().unwrap();
        let d = downloader(dir.path());
        let hf = HfRef { repo: "org/repo".into(), revision: None, file: Some("m.gguf".into()) };
        let blobs = dir.path().join("models--org--repo/blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let size = 1_000_000u64;
        let part = |etag: &str, len: u64, written: usize| {
            let f = std::fs::File::create(blobs.join(format!("{etag}.sync.part"))).unwrap();
            f.set_len(len).unwrap();
            std::io::Write::write_all(&mut &f, &vec![7u8; written]).unwrap();
        };
        part("aaa", size + 8, 65_536); // this download's part, nobody on it
        part("bbb", 5 + 8, 0); // another file's
        part("ccc", size + 8, 0); // this size, but a download holds its lock
        std::fs::write(blobs.join("ddd"), b"a finished blob").unwrap();
        let held = std::fs::File::create(blobs.join("ccc.lock")).unwrap();
        flock(&held, FlockOperation::NonBlockingLockExclusive).unwrap();

        let freed = d.drop_partial(&hf, size, Duration::from_millis(120));
        assert!(freed.is_some_and(|b| b >= 65_536), "{freed:?}");
        let mut left: Vec<String> = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["bbb.sync.part", "ccc.lock", "ccc.sync.part", "ddd"]);

        // Once the download lets go, its part goes too; nothing there is no error.
        drop(held);
        assert!(d.drop_partial(&hf, size, Duration::ZERO).is_some(), "the part goes once its lock is let go");
        assert!(!blobs.join("ccc.sync.part").exists());
        assert_eq!(d.drop_partial(&hf, size, Duration::ZERO), None);
        assert_eq!(d.drop_partial(&HfRef { repo: "org/none".into(), revision: None, file: None }, size, Duration::ZERO), None);
    }

    #[test]
    fn the_free_space_of_a_directory_not_made_yet_is_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        let free = disk_free(dir.path()).expect("statvfs");
        assert!(free > 0);
        assert!(disk_free(&dir.path().join("hf/not/yet")).is_some());
    }

    #[test]
    fn the_header_gives_the_kv_cache_size_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let gqa = dir.path().join("gqa.gguf");
        header(
            &gqa,
            &[
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(30)),
                ("llama.embedding_length", Value::U32(576)),
                ("llama.attention.head_count", Value::U32(9)),
                ("llama.attention.head_count_kv", Value::U32(3)),
                ("llama.context_length", Value::U32(8192)),
            ],
        );
        let facts = inspect_gguf(&gqa).unwrap();
        assert_eq!(facts.architecture, "llama");
        // The demo model's shape: keys and values, 30 layers, 3 KV heads of 64, f16.
        assert_eq!((facts.kv_bytes_per_token, facts.context_length), (23_040, 8192));
        assert_eq!(facts.kv_bytes_per_token, crate::catalog::KNOWN_MODELS[0].kv_bytes_per_token);

        // No KV head count: every head has its own keys and values.
        let mha = dir.path().join("mha.gguf");
        header(
            &mha,
            &[
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(2)),
                ("llama.embedding_length", Value::U32(256)),
                ("llama.attention.head_count", Value::U32(4)),
            ],
        );
        let facts = inspect_gguf(&mha).unwrap();
        assert_eq!((facts.kv_bytes_per_token, facts.context_length), (2 * 2 * 4 * 64 * 2, 0));
    }

    /// Weights count at the size a worker holds them: the widened types at
    /// their packed size, the others as stored.
    #[test]
    fn the_header_gives_the_weights_resident_size() {
        use candle_core::quantized::{GgmlDType as G, QTensor};
        use candle_core::{Device, Tensor};
        let (rows, cols) = (4usize, 512usize);
        let x = Tensor::zeros((rows, cols), candle_core::DType::F32, &Device::Cpu).unwrap();
        let types = [G::F32, G::Q4_1, G::Q8_0, G::Q4K, G::Q5_0, G::Q5_1, G::Q5K, G::Q6K];
        let tensors: Vec<(String, QTensor)> = types.iter().map(|&t| (format!("{t:?}"), QTensor::quantize(&x, t).unwrap())).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("types.gguf");
        let mut f = std::fs::File::create(&path).unwrap();
        let arch = Value::String("llama".into());
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &ts).unwrap();
        drop(f);
        let blocks = (rows * cols / 32) as u64;
        // F32, Q4_1 and Q8_0 as stored; Q4_K as Q4_1; Q5_0 as Q8_0; the rest 36 bytes a block.
        let want = blocks * (32 * 4 + 20 + 34 + 20 + 34 + 36 + 36 + 36);
        let facts = inspect_gguf(&path).unwrap();
        assert_eq!(facts.weight_bytes, want);
        let stored: u64 = tensors.iter().map(|(_, t)| t.storage_size_in_bytes() as u64).sum();
        assert!(facts.weight_bytes > stored, "{} ≤ {stored}", facts.weight_bytes);

        // An entry from before rbee counted it gets it at start; one whose
        // file is missing is left alone.
        let catalog = Catalog::open(&dir.path().join("c.redb"), dir.path()).unwrap();
        let old = register(&catalog, "old", "file:types.gguf", path.clone(), 1, "x".into()).unwrap();
        catalog.put(&ModelEntry { weight_bytes: 0, ..old.clone() }).unwrap();
        catalog.put(&ModelEntry { key: "gone".into(), path: dir.path().join("gone.gguf"), weight_bytes: 0, ..old }).unwrap();
        assert_eq!(fill_weight_sizes(&catalog).unwrap(), 1);
        assert_eq!(catalog.get("old").unwrap().unwrap().weight_bytes, want);
        assert_eq!(catalog.get("gone").unwrap().unwrap().weight_bytes, 0);
        assert_eq!(fill_weight_sizes(&catalog).unwrap(), 0, "nothing left to fill");
    }
}
