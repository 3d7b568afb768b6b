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
    // Colours only on a terminal: container runtimes store stderr as it is written, and
    // escape codes make `kubectl logs` and log search harder to read.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match log.log_format {
        // Flattened: `message` and the event's fields at the top level, where log
        // pipelines look for them (not under `fields`).
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let workers = match &cli.command {
        Some(Command::Serve(args)) => args.worker_threads,
        None => cli.serve.worker_threads,
        Some(_) => 1,
    };
    limit_malloc_arenas(workers);
    // One thread by default: a request is a few microseconds of work, the pod's CPU
    // belongs to EmailEngine, and a single-threaded runtime has no cross-core contention
    // on the cache and the counters (BENCHMARKS.md, P1). Blocking work (fsync) runs on
    // tokio's blocking pool, config reloads on a low-priority thread of their own.
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Some(Command::Check { config }) => cli::check(&config),
            Some(Command::Token(args)) => cli::token(&args).await,
            Some(Command::Consent(args)) => cli::consent(&args).await,
            Some(Command::Probe { url, timeout }) => cli::probe(&url, timeout).await,
            Some(Command::State(cli::StateCommand::Migrate(args))) => cli::migrate(&args).await,
            Some(Command::Serve(args)) => serve(*args).await,
            None => serve(cli.serve).await,
        }
    });
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
    // Handlers first: a SIGTERM that arrives while the sidecar is still starting (it
    // serves before `start` returns) must shut down cleanly, not kill the process.
    let signals = Signals::install();
    let running = match ee_auth_sidecar::start(options).await {
        Ok(r) => r,
        Err(e) => {
            // Once, in the log format the operator chose.
            tracing::error!("{e}");
            return 1;
        }
    };
    signals.wait().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    tracing::info!("stopped");
    0
}

/// The signals the sidecar handles, registered up front so that none is missed and none
/// kills the process before it is ready: SIGTERM and SIGINT shut down gracefully;
/// SIGHUP re-reads the config (the reloader acts on it, see `reload::watch`; held here
/// so that one arriving during start-up is harmless); SIGUSR1 and SIGUSR2 are logged and
/// ignored (their default action would end the process without a graceful shutdown).
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    _hup: Option<tokio::signal::unix::Signal>,
    usr1: Option<tokio::signal::unix::Signal>,
    usr2: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let register = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle {name}");
                None
            }
        };
        Signals {
            term: register(SignalKind::terminate(), "SIGTERM"),
            int: register(SignalKind::interrupt(), "SIGINT"),
            _hup: register(SignalKind::hangup(), "SIGHUP"),
            usr1: register(SignalKind::user_defined1(), "SIGUSR1"),
            usr2: register(SignalKind::user_defined2(), "SIGUSR2"),
        }
    }

    /// Returns on SIGTERM or SIGINT.
    async fn wait(mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            if let Some(signal) = s {
                if signal.recv().await.is_some() {
                    return;
                }
                // The stream ended (the runtime is going away): no signal, nor any more.
                *s = None;
            }
            std::future::pending().await
        }
        if self.term.is_none() && self.int.is_none() {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
        loop {
            tokio::select! {
                _ = recv(&mut self.term) => return,
                _ = recv(&mut self.int) => return,
                _ = recv(&mut self.usr1) => tracing::info!("SIGUSR1 received; ignored"),
                _ = recv(&mut self.usr2) => tracing::info!("SIGUSR2 received; ignored"),
            }
        }
    }
}

/// glibc gives threads that contend for the heap arenas of their own (up to 8 per core),
/// and memory freed in one arena cannot serve another: with 100k accounts the default
/// costs tens of MB of resident memory (BENCHMARKS.md, P5). One arena per runtime worker
/// plus one for the other threads (reloads, tokio's blocking pool): with a single arena
/// a 100k-account parse contended with the serving thread and doubled the p99 latency
/// during reloads. glibc hands a new thread a free arena first, but past the limit it may
/// share any, so this bounds the contention rather than ruling it out.
/// Unless the operator set `MALLOC_ARENA_MAX` (glibc reads it itself). Called before any
/// thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas(workers: usize) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let arenas = libc::c_int::try_from(workers.max(1) + 1).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets a glibc tunable; no pointers are involved, and no other
    // thread is running yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas(_workers: usize) {}
