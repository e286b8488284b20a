//! A local stand-in for the Hugging Face hub: the same URL layout and the
//! headers hf-hub reads, so the hive's real download path runs against it.
//!
//! - `GET /{org}/{repo}/resolve/{revision}/{file}` with `Range`, answering 206
//!   with `content-range`, `x-repo-commit`, `x-linked-etag` (the sha256, as
//!   the hub does for LFS files) and `x-linked-size`;
//! - `GET /api/models/{org}/{repo}/revision/{revision}`: the repo's files.
//!
//! Faults: [`Hub::interrupt_at`] drops the connection once, mid-response,
//! when that many body bytes were served; [`HubFile::corrupt`] serves one flipped byte under the true hash;
//! [`Hub::slow`] waits before each ranged body.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct HubFile {
    pub repo: String,
    pub name: String,
    pub bytes: Arc<Vec<u8>>,
    /// Serve a damaged copy under the original's hash.
    pub corrupt: bool,
}

#[derive(Default)]
struct State {
    files: Vec<(HubFile, String)>,
    /// Every ranged body request: (file, first byte).
    ranges: Mutex<Vec<(String, u64)>>,
    /// Hang up once this many body bytes were served in all (0 = never).
    interrupt_at: AtomicU64,
    body_bytes: AtomicU64,
    /// Wait this long (ms) before each ranged body.
    delay_ms: AtomicU64,
}

pub struct Hub {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl Hub {
    pub async fn start(files: Vec<HubFile>) -> Self {
        let files = files
            .into_iter()
            .map(|f| {
                let sha = hex::encode(Sha256::digest(f.bytes.as_slice()));
                (f, sha)
            })
            .collect();
        let state = Arc::new(State { files, ..State::default() });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the hub fixture");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, s.clone()));
            }
        });
        Self { url, state, task }
    }

    /// Hangs up once, in the middle of a response, when `bytes` body bytes were served in all.
    pub fn interrupt_at(&self, bytes: u64) {
        self.state.interrupt_at.store(bytes, Ordering::SeqCst);
    }

    /// Waits `per_body` before answering each ranged request, so a download
    /// takes about that long per 10 MB chunk.
    pub fn slow(&self, per_body: std::time::Duration) {
        self.state.delay_ms.store(per_body.as_millis() as u64, Ordering::SeqCst);
    }

    /// First bytes of the ranged body requests for `file`, in order.
    pub fn range_starts(&self, file: &str) -> Vec<u64> {
        self.state.ranges.lock().unwrap().iter().filter(|(f, _)| f == file).map(|(_, s)| *s).collect()
    }

    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }
}

async fn serve(mut conn: TcpStream, state: Arc<State>) {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.lines();
        let request = lines.next().unwrap_or_default().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())))
            .collect();
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned());
        if !respond(&mut conn, &state, &method, &path, &headers).await {
            return;
        }
    }
}

async fn send(conn: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> bool {
    let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await.is_ok() && conn.write_all(body).await.is_ok()
}

/// Answers one request; false when the connection must close.
async fn respond(conn: &mut TcpStream, state: &State, method: &str, path: &str, headers: &HashMap<String, String>) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/models/{org}/{repo}/revision/{rev}
    if segments.len() >= 6 && segments[0] == "api" && segments[1] == "models" && segments[4] == "revision" {
        let repo = format!("{}/{}", segments[2], segments[3]);
        let siblings: Vec<_> = state.files.iter().filter(|(f, _)| f.repo == repo).map(|(f, _)| serde_json::json!({"rfilename": f.name})).collect();
        if siblings.is_empty() {
            return send(conn, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}").await;
        }
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        return send(conn, "200 OK", &[("content-type", "application/json".into())], body.as_bytes()).await;
    }
    // /{org}/{repo}/resolve/{rev}/{file...}
    if segments.len() < 5 || segments[2] != "resolve" {
        return send(conn, "404 Not Found", &[], b"not found").await;
    }
    let repo = format!("{}/{}", segments[0], segments[1]);
    let name = segments[4..].join("/");
    let Some((file, sha)) = state.files.iter().find(|(f, _)| f.repo == repo && f.name == name) else {
        return send(conn, "404 Not Found", &[("x-error-code", "EntryNotFound".into())], b"Entry not found").await;
    };
    let len = file.bytes.len() as u64;
    let (start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: u64 = a.parse().unwrap_or(0);
            let b: u64 = b.parse().unwrap_or(len - 1).min(len - 1);
            (a, b)
        }
        None => (0, len - 1),
    };
    let common = vec![
        ("x-repo-commit", COMMIT.to_owned()),
        ("x-linked-etag", format!("\"{sha}\"")),
        ("etag", format!("\"{sha}\"")),
        ("x-linked-size", len.to_string()),
        ("accept-ranges", "bytes".to_owned()),
        ("content-range", format!("bytes {start}-{end}/{len}")),
    ];
    if method == "HEAD" {
        return send(conn, "200 OK", &common, b"").await;
    }
    let mut body = file.bytes[start as usize..=end as usize].to_vec();
    if file.corrupt && !body.is_empty() {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let is_metadata_probe = start == 0 && end == 0;
    if !is_metadata_probe {
        state.ranges.lock().unwrap().push((name.clone(), start));
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let (mark, so_far) = (state.interrupt_at.load(Ordering::SeqCst), state.body_bytes.load(Ordering::SeqCst));
        if mark > so_far && mark < so_far + body.len() as u64 {
            state.interrupt_at.store(0, Ordering::SeqCst);
            let cut = mark - so_far;
            // Promise the whole range, send part of it, hang up.
            let mut head = format!("HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\n", body.len());
            for (k, v) in &common {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(&body[..cut as usize]).await;
            state.body_bytes.fetch_add(cut, Ordering::SeqCst);
            let _ = conn.shutdown().await;
            return false;
        }
        state.body_bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    }
    send(conn, "206 Partial Content", &common, &body).await
}
