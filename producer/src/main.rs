use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rbee::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBEE_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).try_init();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(rbee::cli::main(cli)),
        Err(e) => {
            eprintln!("rbee: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
