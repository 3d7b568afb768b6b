//! Wiring only: parse the command line, set up logging, run.

use clap::Parser;
use ee_auth_sidecar::cli::{self, Cli, Command, LogArgs, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(log: &LogArgs) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| {
            EnvFilter::try_new(&log.log_level).unwrap_or_else(|_| EnvFilter::new("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let code = match cli.command {
        Some(Command::Check { config }) => cli::check(&config),
        Some(Command::Token(args)) => cli::token(&args).await,
        Some(Command::Probe { url, timeout }) => cli::probe(&url, timeout).await,
        Some(Command::Serve(args)) => serve(*args).await,
        None => serve(cli.serve).await,
    };
    std::process::exit(code);
}

async fn serve(args: cli::ServeArgs) -> i32 {
    let options = match args.into_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let running = match ee_auth_sidecar::start(options).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return 1;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    tracing::info!("stopped");
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
