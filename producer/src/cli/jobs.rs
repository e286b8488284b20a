//! `rbee jobs ...` and `rbee status`.

use std::process::ExitCode;

use clap::Subcommand;
use rbee_schemas::codec::Encoding;
use rbee_schemas::record::{JobRecord, JobState};

use super::infer::print_events;
use super::render::{age, table};
use crate::jobs::CancelOutcome;
use crate::{Client, ClientError};

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Jobs with their state (records are kept 24 h; queued jobs come from the queue).
    List {
        /// Only jobs in this state: queued, running, retrying, done, failed, cancelled, expired, dead.
        #[arg(long)]
        state: Option<JobState>,
        /// Only jobs for this model key.
        #[arg(long)]
        model: Option<String>,
        /// At most this many rows (newest first).
        #[arg(long, default_value_t = LIST_LIMIT)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one job.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Replay a job's events from the start (or --from-seq) and follow it live.
    Follow {
        id: String,
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// Print every event as a JSON line.
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        verbose: bool,
    },
    /// Cancel a job: a queued one never starts, a running one stops within a token. Idempotent.
    Cancel { id: String },
    /// Resubmit a dead job (one that ran out of attempts) under a new id.
    Retry {
        id: String,
        /// Follow the new job's events.
        #[arg(long)]
        follow: bool,
    },
}

/// Rows `rbee jobs list` shows unless told otherwise.
const LIST_LIMIT: usize = 50;

/// What the bare `rbee jobs` lists.
impl JobsCommand {
    pub fn list(json: bool) -> Self {
        JobsCommand::List { state: None, model: None, limit: LIST_LIMIT, json }
    }
}

pub async fn run(client: &Client, cmd: JobsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        JobsCommand::List { state, model, limit, json } => {
            let mut jobs = client.jobs(1000).await?;
            jobs.retain(|j| state.is_none_or(|s| j.state == s) && model.as_deref().is_none_or(|m| j.model == m));
            jobs.truncate(limit);
            if json {
                for j in &jobs {
                    println!("{}", String::from_utf8_lossy(&Encoding::Json.encode(j)));
                }
            } else {
                println!("{}", list_table(&jobs));
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id, json } => {
            let job = client.job(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print!("{}", show(&job));
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Follow { id, from_seq, json, verbose } => {
            // Fail clearly for an id that does not exist rather than waiting.
            client.job(&id).await?;
            let mut job = client.follow(&id, from_seq).await?;
            print_events(&mut job, json, verbose).await
        }
        JobsCommand::Cancel { id } => match client.cancel(&id).await {
            Ok(CancelOutcome::Cancelled) => {
                println!("job {id} was queued: cancelled, it will not start");
                Ok(ExitCode::SUCCESS)
            }
            Ok(CancelOutcome::Requested { hive }) => {
                println!("job {id} is running on hive {}: cancel requested, it stops within a token", hive.as_deref().unwrap_or("?"));
                Ok(ExitCode::SUCCESS)
            }
            Ok(CancelOutcome::AlreadyEnded(state)) => {
                println!("job {id} had already ended ({}); nothing to cancel", state.as_str());
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ ClientError::NotFound(_)) => Err(e.into()),
            Err(e) => Err(e.into()),
        },
        JobsCommand::Retry { id, follow } => {
            let new_id = client.retry(&id).await?;
            println!("job {id} resubmitted as {new_id}");
            if follow {
                let mut job = client.follow(&new_id, 0).await?;
                return print_events(&mut job, false, false).await;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list_table(jobs: &[JobRecord]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.job_id.clone(),
                j.state.as_str().to_owned(),
                j.model.clone(),
                j.lane.as_str().to_owned(),
                j.hive.clone().unwrap_or_else(|| "-".into()),
                j.attempts.to_string(),
                age(j.submitted_at_ms),
                j.usage.map_or_else(|| "-".into(), |u| u.completion_tokens.to_string()),
                j.error_code.map_or_else(String::new, |c| c.to_string()),
            ]
        })
        .collect();
    table(&["JOB", "STATE", "MODEL", "LANE", "HIVE", "ATTEMPTS", "AGE", "TOKENS", "ERROR"], &rows)
}

fn show(j: &JobRecord) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<12} {v}\n"));
    line("job", j.job_id.clone());
    line("state", j.state.as_str().to_owned());
    line("model", j.model.clone());
    line("lane", j.lane.as_str().to_owned());
    line("hive", j.hive.clone().unwrap_or_else(|| "-".into()));
    line("worker", j.worker.clone().unwrap_or_else(|| "-".into()));
    line("attempts", j.attempts.to_string());
    line("submitted", format!("{} ago", age(j.submitted_at_ms)));
    line("updated", format!("{} ago", age(j.updated_at_ms)));
    if let Some(d) = j.deadline_ms {
        line("deadline", format!("unix ms {d}"));
    }
    if j.cancel_requested {
        line("cancel", "requested".into());
    }
    if let Some(u) = j.usage {
        line("tokens", format!("{} prompt + {} generated", u.prompt_tokens, u.completion_tokens));
    }
    if let Some(t) = j.timings {
        line(
            "timings",
            format!("queued {:.1} ms, load {:.0} ms, first token {:.0} ms, total {:.0} ms, {:.1} tok/s", t.queued_ms, t.load_ms, t.ttft_ms, t.total_ms, t.decode_tps),
        );
    }
    if let Some(c) = j.error_code {
        line("error", format!("{c}: {}", j.error_message.clone().unwrap_or_default()));
    }
    line("events", format!("{} (rbee jobs follow {})", j.next_seq, j.job_id));
    s
}

pub async fn status(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let hives = client.hives().await?;
    let depth = client.queue_depth().await.unwrap_or_default();
    if json {
        let v = serde_json::json!({
            "hives": hives,
            "queue": depth.iter().map(|d| serde_json::json!({
                "lane": d.lane.as_str(), "model": d.model, "jobs": d.jobs, "oldest_ms": d.oldest_ms,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if hives.is_empty() {
        println!("no hive is attached");
    } else {
        println!("{}", table(&super::fleet::HIVE_HEADER, &super::fleet::hive_rows(&hives)));
    }
    println!();
    if depth.is_empty() {
        println!("queue: empty");
    } else {
        let rows: Vec<Vec<String>> = depth
            .iter()
            .map(|d| vec![d.model.clone(), d.lane.as_str().to_owned(), d.jobs.to_string(), d.oldest_ms.map_or_else(|| "-".into(), age)])
            .collect();
        println!("{}", table(&["MODEL", "LANE", "JOBS", "OLDEST"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}
