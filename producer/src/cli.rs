//! The `rbee` command line. One function per subcommand.
//!
//! Exit codes: 0 success, 1 the job or command failed (its code and message
//! on stderr), 2 usage errors, 130 interrupted.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use rbee_schemas::codec::Encoding;
use rbee_schemas::event::{EventBody, StopReason};
use rbee_schemas::job::{ChatMessage, InferRequest};

use crate::local::{self, Embedded};
use crate::{Client, SubmitOptions};

/// rbee: LLM inference over NATS.
#[derive(Debug, Parser)]
#[command(name = "rbee", version, propagate_version = true)]
pub struct Cli {
    /// NATS server to use. Without it, rbee uses the stack from `rbee up`, or
    /// starts an embedded broker and hive for the one command.
    #[arg(long, env = "RBEE_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// rbee's data directory (default: ~/.local/share/rbee).
    #[arg(long, env = "RBEE_HOME", global = true)]
    pub home: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one inference job and stream its tokens to stdout.
    Infer(InferArgs),
    /// Start a persistent local broker and hive (stopped by `rbee down`).
    Up {
        /// Client port for the local nats-server.
        #[arg(long, default_value_t = 4222)]
        port: u16,
    },
    /// Stop what `rbee up` started.
    Down,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// The prompt; `-` reads it from stdin.
    pub prompt: String,
    /// Model alias or hf:org/repo[@revision]:file reference.
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
    /// Job id (default: a fresh one).
    #[arg(long)]
    pub id: Option<String>,
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

/// Runs the CLI; the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let home = cli.home.clone().unwrap_or_else(rbee_broker::rbee_home);
    let result = match cli.command {
        Command::Infer(args) => infer(cli.nats_url, &home, args).await,
        Command::Up { port } => up(&home, port).await,
        Command::Down => down(&home),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Where to reach the bus: the explicit URL, else `rbee up`'s stack, else an embedded one.
async fn connect(nats_url: Option<String>, home: &std::path::Path, verbose: bool) -> anyhow::Result<(Client, Option<Embedded>)> {
    if let Some(url) = nats_url {
        return Ok((Client::connect(&url).await?, None));
    }
    if let Some(state) = local::running_stack(home) {
        return Ok((Client::connect(&state.url).await?, None));
    }
    if verbose {
        eprintln!("starting an embedded broker and hive (rbee up keeps one running)...");
    }
    let embedded = Embedded::start(home).await.context("starting the embedded broker and hive")?;
    let client = Client::connect(embedded.url()).await?;
    Ok((client, Some(embedded)))
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

async fn infer(nats_url: Option<String>, home: &std::path::Path, args: InferArgs) -> anyhow::Result<ExitCode> {
    let req = request(&args)?;
    let (client, mut embedded) = connect(nats_url, home, args.verbose).await?;
    let opts = SubmitOptions {
        job_id: args.id.clone(),
        encoding: if args.msgpack { Encoding::Msgpack } else { Encoding::Json },
    };
    let code = tokio::select! {
        code = stream_job(&client, &args, req, opts) => code?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            eprintln!("interrupted");
            ExitCode::from(130)
        }
    };
    if let Some(stack) = embedded.take() {
        // Stopping waits for the hive to drain: off the async thread.
        let _ = tokio::task::spawn_blocking(move || drop(stack)).await;
    }
    Ok(code)
}

async fn stream_job(client: &Client, args: &InferArgs, req: InferRequest, opts: SubmitOptions) -> anyhow::Result<ExitCode> {
    let mut job = client.submit(&args.model, req, opts).await?;
    let mut out = std::io::stdout().lock();
    let mut ends_with_newline = true;
    while let Some(event) = job.next().await {
        let event = event?;
        if args.json {
            writeln!(out, "{}", String::from_utf8_lossy(&Encoding::Json.encode(&event)))?;
            out.flush()?;
        }
        match &event.body {
            EventBody::Started(s) => {
                if args.verbose {
                    eprintln!("[{} on hive {}, worker {}, {} start, attempt {}]", event.job_id, s.hive, s.worker, if s.cold { "cold" } else { "warm" }, s.attempt);
                }
            }
            EventBody::Token(t) => {
                if !args.json {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                    ends_with_newline = t.text.ends_with('\n');
                }
            }
            EventBody::Restarted(r) => {
                if !args.json {
                    writeln!(out)?;
                }
                eprintln!("[attempt {} failed: {}; the job starts over]", r.attempt, r.reason);
            }
            EventBody::Done(d) => {
                if !args.json && !ends_with_newline {
                    writeln!(out)?;
                }
                if args.verbose {
                    let t = &d.timings;
                    eprintln!(
                        "[done: {} | {} prompt + {} generated tokens | queued {:.1} ms, load {:.0} ms, first token {:.0} ms, total {:.0} ms | prompt {:.1} tok/s, decode {:.1} tok/s | seed {}]",
                        stop_reason(d.stop_reason), d.usage.prompt_tokens, d.usage.completion_tokens,
                        t.queued_ms, t.load_ms, t.ttft_ms, t.total_ms, t.prompt_tps, t.decode_tps, d.seed
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            EventBody::Error(e) => {
                if !args.json && !ends_with_newline {
                    writeln!(out)?;
                }
                eprintln!("error: {}: {}", e.code, e.message);
                return Ok(ExitCode::from(1));
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
        StopReason::Unknown => "unknown",
    }
}

async fn up(home: &std::path::Path, port: u16) -> anyhow::Result<ExitCode> {
    if let Some(state) = local::running_stack(home) {
        println!("rbee is already up: {} (hive {})", state.url, state.hive_id);
        return Ok(ExitCode::SUCCESS);
    }
    let state = local::up(home, port).await?;
    println!("rbee is up: {} (hive {}); logs in {}", state.url, state.hive_id, home.join("logs").display());
    println!("stop it with: rbee down");
    Ok(ExitCode::SUCCESS)
}

fn down(home: &std::path::Path) -> anyhow::Result<ExitCode> {
    if local::down(home)? {
        println!("rbee is down");
    } else {
        println!("rbee was not up");
    }
    Ok(ExitCode::SUCCESS)
}
