use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = rbee_hive::HiveArgs::parse();
    rbee_hive::init_tracing();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rbee-hive: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = rbee_hive::shutdown_on_signals();
        match rbee_hive::run(args, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("rbee-hive: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
