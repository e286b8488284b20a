//! `rbee infer`: submit one job and print its tokens as they come.
//!
//! Before publishing it checks that a hive is attached (else the job would
//! wait unseen), and downloads an `hf:` model no hive has (`--no-pull`: no). A full queue is retried with exponential backoff and jitter
//! (`--retries`, off with `--no-retry`). Ctrl-C cancels the job on its hive
//! and exits with 130.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{EventBody, StopReason};
use rbee_schemas::job::{ChatMessage, InferRequest};
use rbee_schemas::subjects::Lane;

use super::{connect_or_embed, Priority};
use crate::{Client, ClientError, JobStream, SubmitOptions};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The prompt; `-` reads it from stdin.
    pub prompt: String,
    /// Model alias or hf:org/repo[@revision]:file reference.
    // The brackets are the syntax `--help` shows, not links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, short, env = "RBEE_MODEL", default_value = "smollm2-135m")]
    pub model: String,
    /// Most tokens to generate.
    #[arg(long, short = 'n')]
    pub max_tokens: Option<i64>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub repeat_penalty: Option<f64>,
    /// Sampling seed: the same seed reproduces the same text.
    #[arg(long, short)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// System message for the chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as raw text instead of a chat message.
    #[arg(long)]
    pub raw: bool,
    /// The job must end within this time (e.g. 30s, 2m), queueing included.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Lane: interactive jobs are served before batch jobs.
    #[arg(long, value_enum, default_value_t = Priority::Interactive)]
    pub priority: Priority,
    /// Job id (default: a fresh one). Submitting an id again replays that job.
    #[arg(long)]
    pub id: Option<String>,
    /// Times to retry when the queue is full (exponential backoff with jitter).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Fail at once when the queue is full.
    #[arg(long)]
    pub no_retry: bool,
    /// Fail when no hive has the hf: model, instead of downloading it first.
    #[arg(long)]
    pub no_pull: bool,
    /// Encode the job (and its events) as MessagePack instead of JSON.
    #[arg(long)]
    pub msgpack: bool,
    /// Print every event as a JSON line instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Print timings and usage on stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

fn request(args: &InferArgs) -> anyhow::Result<InferRequest> {
    let prompt = if args.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
        s
    } else {
        args.prompt.clone()
    };
    let mut req = InferRequest {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        stop: (!args.stop.is_empty()).then(|| args.stop.clone()),
        timeout_ms: args.timeout.map(|t| t.as_millis().max(1) as u64),
        ..InferRequest::default()
    };
    if args.raw {
        req.prompt = Some(prompt);
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage { role: "system".into(), content: system.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: prompt });
        req.messages = Some(messages);
    }
    // Check the limits here too, so a typo is a usage error (exit 2), not a job.
    if let Err(e) = req.validate(0) {
        eprintln!("error: {}: {}", e.code, e.message);
        std::process::exit(2);
    }
    Ok(req)
}

pub async fn run(nats_url: Option<String>, home: &Path, args: InferArgs) -> anyhow::Result<ExitCode> {
    let req = request(&args)?;
    let (client, mut embedded) = connect_or_embed(nats_url, home, args.verbose).await?;
    // Refuses when no hive is attached, or none speaks this protocol version.
    let hives = client.compatible_hives().await?;
    if !args.no_pull {
        if let Some(failed) = super::fleet::pull_if_missing(&client, &args.model, &hives).await? {
            if let Some(stack) = embedded.take() {
                let _ = tokio::task::spawn_blocking(move || drop(stack)).await;
            }
            return Ok(failed);
        }
    }
    let opts = SubmitOptions {
        job_id: Some(args.id.clone().unwrap_or_else(crate::new_job_id)),
        encoding: if args.msgpack { Encoding::Msgpack } else { Encoding::Json },
        lane: match args.priority {
            Priority::Interactive => Lane::Interactive,
            Priority::Batch => Lane::Batch,
        },
    };
    let job_id = opts.job_id.clone().unwrap_or_default();
    let mut job = submit_with_retry(&client, &args, req, opts).await?;
    let code = tokio::select! {
        code = print_events(&mut job, args.json, args.verbose) => code?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            match client.cancel(&job_id).await {
                Ok(outcome) => eprintln!("interrupted: job {job_id} cancel: {outcome:?}"),
                Err(e) => eprintln!("interrupted: cancelling job {job_id} failed: {e}"),
            }
            ExitCode::from(130)
        }
    };
    if let Some(stack) = embedded.take() {
        // Stopping waits for the hive to drain: off the async thread.
        let _ = tokio::task::spawn_blocking(move || drop(stack)).await;
    }
    Ok(code)
}

/// Submits, retrying a full queue with exponential backoff and full jitter.
async fn submit_with_retry(client: &Client, args: &InferArgs, req: InferRequest, opts: SubmitOptions) -> anyhow::Result<JobStream> {
    let retries = if args.no_retry { 0 } else { args.retries };
    let mut attempt = 0;
    loop {
        let mut job = client.submit(&args.model, req.clone(), opts.clone()).await?;
        match job.published().await {
            Ok(_) => return Ok(job),
            Err(ClientError::QueueFull(why)) if attempt < retries => {
                attempt += 1;
                let cap = Duration::from_millis(200).saturating_mul(1 << attempt.min(8));
                let wait = Duration::from_millis(jitter(cap.as_millis() as u64));
                if args.verbose {
                    eprintln!("[queue full ({why}); retry {attempt}/{retries} in {wait:?}]");
                }
                tokio::time::sleep(wait).await;
            }
            Err(ClientError::QueueFull(why)) => {
                anyhow::bail!(
                    "QUEUE_FULL: the job queue is full ({why}) after {attempt} retries. Try again later, submit with \
                     --priority batch to queue behind, or raise the hive's --queue-max-jobs"
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn jitter(cap_ms: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(cap_ms);
    h.finish() % cap_ms.max(1)
}

/// Prints a job's events until its end; the exit code it calls for.
pub async fn print_events(job: &mut JobStream, json: bool, verbose: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut ends_with_newline = true;
    while let Some(event) = job.next().await {
        let event = event?;
        if json {
            writeln!(out, "{}", String::from_utf8_lossy(&Encoding::Json.encode(&event)))?;
            out.flush()?;
        }
        match &event.body {
            EventBody::Started(s) => {
                if verbose {
                    eprintln!(
                        "[{} on hive {}, worker {}, {} start, attempt {}]",
                        event.job_id,
                        s.hive,
                        s.worker,
                        if s.cold { "cold" } else { "warm" },
                        s.attempt
                    );
                }
            }
            EventBody::Token(t) => {
                if !json {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                    ends_with_newline = t.text.ends_with('\n');
                }
            }
            EventBody::Restarted(r) => {
                if r.resume {
                    eprintln!("[attempt {} failed: {}; the job continues on another attempt]", r.attempt, r.reason);
                } else {
                    if !json {
                        writeln!(out)?;
                    }
                    eprintln!("[attempt {} failed: {}; the job starts over]", r.attempt, r.reason);
                }
            }
            EventBody::Done(d) => {
                if !json && !ends_with_newline {
                    writeln!(out)?;
                }
                if verbose {
                    let t = &d.timings;
                    eprintln!(
                        "[done: {} | {} prompt + {} generated tokens | queued {:.1} ms, load {:.0} ms, first token {:.0} ms, total {:.0} ms | prompt {:.1} tok/s, decode {:.1} tok/s | seed {}]",
                        stop_reason(d.stop_reason), d.usage.prompt_tokens, d.usage.completion_tokens,
                        t.queued_ms, t.load_ms, t.ttft_ms, t.total_ms, t.prompt_tps, t.decode_tps, d.seed
                    );
                }
                if d.stop_reason == StopReason::Cancelled {
                    eprintln!("[cancelled]");
                    return Ok(ExitCode::from(1));
                }
                return Ok(ExitCode::SUCCESS);
            }
            EventBody::Error(e) => {
                if !json && !ends_with_newline {
                    writeln!(out)?;
                }
                eprintln!("error: {}: {}", e.code, e.message);
                return Ok(ExitCode::from(1));
            }
            EventBody::Progress(p) => {
                if verbose {
                    eprintln!("[{}: {}/{}]", p.stage, p.done, p.total);
                }
            }
            EventBody::Unknown => {}
        }
    }
    anyhow::bail!("the event stream ended without a terminal event")
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "end of text",
        StopReason::MaxTokens => "max tokens",
        StopReason::Stop => "stop string",
        StopReason::Cancelled => "cancelled",
        StopReason::Completed => "completed",
        StopReason::Unknown => "unknown",
    }
}
