//! `rbee-bench`: measurements behind `docs/benchmarks.md`.
//!
//! `cargo run --release -p rbee-bench -- bus` measures the bus against its floor;
//! `cargo run --release -p rbee-bench -- engine` compares rbee's two inference
//! engines with llama.cpp on one GGUF; `all` runs both. Not a default workspace member, so CI
//! never builds it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bus;
mod engine;
mod llama_cpp;

#[derive(Debug, Parser)]
#[command(name = "rbee-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prompt processing and decode speed: rbee's fast engine, rbee's candle
    /// engine and llama.cpp's llama-bench on the same GGUF and threads, plus
    /// the worker's job loop with one job vs several concurrent ones.
    Engine(engine::Args),
    /// What the bus costs: raw JetStream floor, warm time to first token
    /// (no-op and real model vs in-process), batching through the bus (one
    /// job at a time vs several), dispatch throughput with 1/2/4 workers,
    /// token streaming, cold start.
    Bus(bus::Args),
    /// Both, with their default settings: the engine table, then the bus.
    All,
}

/// Default settings of one subcommand, as if run with no options.
fn defaults<A: clap::Args>(name: &'static str) -> A {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    Wrap::<A>::parse_from([name]).args
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Engine(args) => engine::run(&args),
        Command::Bus(args) => bus::run(&args),
        Command::All => engine::run(&defaults("engine")).and_then(|()| bus::run(&defaults("bus"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbee-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
