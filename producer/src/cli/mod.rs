//! The `rbee` command line. One function per subcommand (`infer`, `jobs`).
//!
//! Exit codes: 0 success, 1 the job or command failed (its code and message
//! on stderr), 2 usage errors, 130 interrupted.

mod fleet;
mod infer;
mod jobs;
mod render;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::local::{self, Embedded};
use crate::Client;

pub use infer::InferArgs;
pub use fleet::{HivesCommand, ModelsCommand, WorkersCommand};
pub use jobs::JobsCommand;

/// rbee: LLM inference over NATS.
#[derive(Debug, Parser)]
#[command(name = "rbee", version, propagate_version = true)]
pub struct Cli {
    /// NATS server to use. Without it, rbee uses the stack from `rbee up`, or
    /// starts an embedded broker and hive for `rbee infer`.
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
    /// Look at, follow, cancel and retry jobs (alone: `jobs list`).
    #[command(args_conflicts_with_subcommands = true)]
    Jobs {
        #[command(subcommand)]
        cmd: Option<JobsCommand>,
        /// Alone: the list, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List, inspect, download, import and delete models on the hives (alone: `models list`).
    #[command(args_conflicts_with_subcommands = true)]
    Models {
        #[command(subcommand)]
        cmd: Option<ModelsCommand>,
        /// Alone: the list, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List, start (pre-warm) and stop workers (alone: `workers list`).
    #[command(args_conflicts_with_subcommands = true)]
    Workers {
        #[command(subcommand)]
        cmd: Option<WorkersCommand>,
        /// Alone: the list, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The hives attached to the broker (alone: `hives list`).
    #[command(args_conflicts_with_subcommands = true)]
    Hives {
        #[command(subcommand)]
        cmd: Option<HivesCommand>,
        /// Alone: the list, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream a hive's log lines (its own and its workers').
    Logs {
        #[arg(long)]
        hive: String,
        /// Keep printing new lines.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The fleet at a glance: hives, their workers, and the queue per model.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a persistent local broker and hive (stopped by `rbee down`).
    Up {
        /// Client port for the local nats-server.
        #[arg(long, default_value_t = 4222)]
        port: u16,
    },
    /// Stop what `rbee up` started.
    Down,
}

/// A job's lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Priority {
    /// Served first.
    #[default]
    Interactive,
    /// Served when no interactive job waits (and at least every 4th claim).
    Batch,
}

/// Runs the CLI; the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    let home = cli.home.clone().unwrap_or_else(rbee_broker::rbee_home);
    let result = match cli.command {
        Command::Infer(args) => infer::run(cli.nats_url, &home, args).await,
        Command::Jobs { cmd, json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => jobs::run(&client, cmd.unwrap_or_else(|| JobsCommand::list(json))).await,
            Err(e) => Err(e),
        },
        Command::Models { cmd, json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => fleet::models(&client, cmd.unwrap_or_else(|| ModelsCommand::list(json))).await,
            Err(e) => Err(e),
        },
        Command::Workers { cmd, json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => fleet::workers(&client, cmd.unwrap_or_else(|| WorkersCommand::list(json))).await,
            Err(e) => Err(e),
        },
        Command::Hives { cmd, json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => fleet::hives(&client, cmd.unwrap_or_else(|| HivesCommand::list(json))).await,
            Err(e) => Err(e),
        },
        Command::Logs { hive, follow, json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => fleet::logs(&client, &hive, follow, json).await,
            Err(e) => Err(e),
        },
        Command::Status { json } => match connect_existing(cli.nats_url, &home).await {
            Ok(client) => jobs::status(&client, json).await,
            Err(e) => Err(e),
        },
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

/// The explicit URL, else `rbee up`'s stack; commands other than `infer`
/// have nothing to look at on a fresh embedded broker.
async fn connect_existing(nats_url: Option<String>, home: &Path) -> anyhow::Result<Client> {
    let url = match nats_url {
        Some(u) => u,
        None => match local::running_stack(home) {
            Some(state) => state.url,
            None => anyhow::bail!("no broker to ask: pass --nats-url (or RBEE_NATS_URL), or start one with rbee up"),
        },
    };
    Ok(Client::connect(&url).await?)
}

/// Where to reach the bus: the explicit URL, else `rbee up`'s stack, else an embedded one.
async fn connect_or_embed(nats_url: Option<String>, home: &Path, verbose: bool) -> anyhow::Result<(Client, Option<Embedded>)> {
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

async fn up(home: &Path, port: u16) -> anyhow::Result<ExitCode> {
    if let Some(state) = local::running_stack(home) {
        println!("rbee is already up: {} (hive {})", state.url, state.hive_id);
        return Ok(ExitCode::SUCCESS);
    }
    let state = local::up(home, port).await?;
    println!("rbee is up: {} (hive {}); logs in {}", state.url, state.hive_id, home.join("logs").display());
    println!("stop it with: rbee down");
    Ok(ExitCode::SUCCESS)
}

fn down(home: &Path) -> anyhow::Result<ExitCode> {
    if local::down(home)? {
        println!("rbee is down");
    } else {
        println!("rbee was not up");
    }
    Ok(ExitCode::SUCCESS)
}
