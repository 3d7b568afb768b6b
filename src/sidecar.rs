//! The composition root and the lifecycle: builds the shared state from the options and
//! the config, starts the server, the watcher and pre-warm, and shuts down without
//! losing a rotated refresh token. Requests read [`crate::shared`]; reloads are applied
//! by [`crate::reload`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::TokenCache;
use crate::config::{self, Config};
use crate::credentials::{ConfigErrors, Grant};
use crate::metrics::Metrics;
use crate::options::{check_listen, ListenError, Options};
use crate::priority::release_freed_memory;
use crate::shared::{Changes, Routes, Sidecar};
use crate::state::TokenStore;
use crate::upstream::{http_client, SentCall, Upstream};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The listen address is not allowed.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] crate::server::TlsError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A started sidecar: its address, and the handle to stop it.
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The shared state (tests and the admin API use it).
    pub sidecar: Arc<Sidecar>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What a shutdown could not finish: each would cost a rotating account on restart.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Calls to identity providers still unanswered when the grace ran out.
    pub unanswered: Vec<SentCall>,
    /// Accounts whose newest refresh token was never written (`--state-dir` unusable,
    /// or none), with the reason.
    pub unpersisted: Vec<(Arc<str>, String)>,
}

impl Running {
    /// Stops: from the first instant no upstream call starts (refresh queues, pre-warm,
    /// reloads, admin refreshes, requests); accepting stops and open requests finish;
    /// every call already sent is awaited within the grace period and its rotated token
    /// written; failed writes are tried once more; then the state directory is released.
    /// What could not be finished is logged at ERROR, account by account, and returned.
    pub async fn shutdown(self) -> ShutdownReport {
        let grace = self.sidecar.options().shutdown_grace;
        let now = tokio::time::Instant::now();
        // A grace too large to add is as good as no limit; a day is far beyond any call.
        let deadline = now
            .checked_add(grace)
            .or_else(|| now.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(now);
        self.sidecar.cache().close();
        let _ = self.shutdown.send(true);
        let upstream = self.sidecar.cache().upstream().clone();
        let tasks = async {
            for t in self.tasks {
                let _ = tokio::time::timeout_at(deadline, t).await;
            }
        };
        let ((), unanswered) = tokio::join!(tasks, upstream.drain(deadline));
        for call in &unanswered {
            if call.grant == Grant::RefreshToken {
                tracing::error!(account = %call.account, provider = %call.provider,
                    "a refresh sent to the identity provider was not answered within --shutdown-grace; if the provider rotated the refresh token, the account needs re-consent after the restart");
            } else {
                tracing::warn!(account = %call.account, provider = %call.provider, grant = call.grant.as_str(),
                    "a token request sent to the identity provider was not answered within --shutdown-grace");
            }
        }
        // Bounded: a hung volume must not keep the process from exiting.
        let store = self.sidecar.token_store().clone();
        let unpersisted = match tokio::time::timeout(FINAL_WRITE_LIMIT, store.close()).await {
            Ok(left) => left,
            Err(_) => store
                .unpersisted()
                .into_iter()
                .map(|(a, s)| (a, format!("{} (final write timed out)", s.error)))
                .collect(),
        };
        if store.is_durable() {
            for (account, error) in &unpersisted {
                tracing::error!(account = %account, error = %error,
                    "stopping with this account's newest refresh token only in memory: the state store could not be written; the account needs re-consent after the restart");
            }
        } else if !unpersisted.is_empty() {
            tracing::warn!(
                accounts = unpersisted.len(),
                "no --state-dir or --state: the rotated refresh tokens of these accounts are lost now"
            );
        }
        ShutdownReport {
            unanswered,
            unpersisted,
        }
    }
}

/// How long shutdown's last attempt at failed writes may take.
const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(3);

/// Accept-queue length of the listening socket. tokio (like std) asks for 128; a burst
/// of connections beyond that (EmailEngine connecting many accounts at once) makes the
/// kernel drop SYNs, which clients resend only after a second.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the listening socket (`SO_REUSEADDR`, as tokio's own `bind` does).
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the open-file limit and works out how many client connections it leaves room
/// for (logged once).
fn connection_cap(options: &Options, config: &Config) -> usize {
    let limit = crate::limits::raise_open_file_limit();
    let upstream_calls = options
        .provider_concurrency
        .saturating_mul(config.providers.len().max(1));
    let reserve = crate::limits::reserve(upstream_calls);
    let cap =
        crate::limits::connection_cap(options.max_connections, limit.map(|l| l.soft), reserve);
    let soft = limit.map(|l| l.soft);
    let raised_from = limit.and_then(|l| l.raised_from);
    if cap < options.max_connections {
        tracing::warn!(cap, max_connections = options.max_connections, open_file_limit = soft, reserved = reserve,
            "connection cap lowered below --max-connections: the open-file limit leaves no room for more; raise the hard limit (ulimit -Hn, LimitNOFILE) to allow more");
    } else {
        tracing::info!(
            cap,
            open_file_limit = soft,
            raised_from,
            reserved = reserve,
            "connection cap"
        );
    }
    cap
}

/// Opens the state store the options name, logging what it restored and any record it
/// could not use.
pub(crate) async fn open_store(
    options: &Options,
    config: &Config,
) -> Result<TokenStore, StartError> {
    let keys = match &options.state_key_file {
        Some(path) => Some(Arc::new(
            crate::state::Keyring::load(path).map_err(crate::state::StateError::from)?,
        )),
        None => None,
    };
    let store_options = options.store_options(keys.clone());
    let location = store_options.location.clone();
    let (store, warnings) = TokenStore::connect(&store_options).await?;
    for w in warnings {
        tracing::warn!(record = %w, "unreadable refresh-token record");
    }
    match &location {
        crate::state::Location::Memory => {
            // Only refresh-token grants can rotate; a config of passwords, static
            // tokens and app-only grants loses nothing on restart.
            if config
                .credential_sets()
                .any(|s| s.grant == Grant::RefreshToken)
            {
                tracing::warn!("no --state-dir or --state: rotated refresh tokens are kept in memory only and are LOST on restart; accounts whose provider rotates refresh tokens (Microsoft) will fail once the config's token expires");
            }
        }
        crate::state::Location::Dir(dir) => {
            tracing::info!(dir = %dir.display(), restored = store.len(), encrypted = keys.is_some(), "rotated refresh tokens are persisted");
        }
        crate::state::Location::Redis(_) => {
            tracing::info!(store = %location.describe(), prefix = %options.state_prefix, restored = store.len(), encrypted = keys.is_some(), "rotated refresh tokens and access tokens are kept in Redis");
            if keys.is_none() {
                tracing::warn!(store = %location.describe(),
                    "THE REDIS STATE STORE IS NOT ENCRYPTED: refresh and access tokens are readable by anyone who can read this Redis (often shared with EmailEngine and more); pass --state-key-file with a 32-byte key");
            }
        }
    }
    Ok(store)
}

/// Builds the shared state from a validated config; returns it with the entries to
/// pre-warm.
async fn build(
    config: Config,
    options: Options,
) -> Result<(Arc<Sidecar>, Vec<Arc<crate::cache::KeyEntry>>), StartError> {
    let metrics = Arc::new(Metrics::new());
    let store = open_store(&options, &config).await?;
    let store = Arc::new(store);
    store.report_unpersisted(metrics.unpersisted_gauge());
    let http = http_client(options.upstream_timeout)?;
    let upstream = Arc::new(Upstream::new(
        http,
        store.clone(),
        options.provider_concurrency,
        metrics.clone(),
    ));
    let expected_keys = config.credential_sets().count();
    let cache = TokenCache::new(
        upstream,
        options.policy.clone(),
        metrics.clone(),
        expected_keys,
    );
    let (routes, Changes { commit, warm, .. }) = Routes::build(Arc::new(config), &cache, None);
    for entry in &commit {
        cache.commit(entry);
    }
    metrics.reload(true);
    let sidecar = Arc::new(Sidecar::new(routes, cache, metrics, options, store));
    Ok((sidecar, warm))
}

/// Loads the config, binds, and starts serving, pre-warming and watching the config.
pub async fn start(options: Options) -> Result<Running, StartError> {
    let config = config::load(&options.config_path)?;
    release_freed_memory();
    check_listen(&options, &config)?;
    if config.auth.is_none() {
        tracing::warn!("no `auth` in the config: any process that can reach the listen address gets tokens without credentials (and may hold requests open); set `auth` and put its user and password into EmailEngine's authServer URL");
    }
    let tls = match &options.tls {
        Some((cert, key)) => Some(crate::server::tls_acceptor(cert, key)?),
        None => None,
    };
    let listener = bind(options.listen).map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;
    let max_connections = connection_cap(&options, &config);
    let (sidecar, warm) = build(config, options).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tracing::info!(
        addr = %local_addr,
        path = %sidecar.options().path,
        tls = tls.is_some(),
        accounts = sidecar.config().accounts.len(),
        "listening"
    );

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::server::serve(
        listener,
        tls,
        sidecar.clone(),
        max_connections,
        shutdown_rx.clone(),
    )));
    // The watcher starts before `start` returns; the re-read after it covers a change
    // made between the first load and the first watch (a no-op otherwise).
    let watcher = crate::reload::watch(sidecar.clone(), shutdown_rx.clone());
    let _ = sidecar.reload().await;
    tasks.push(tokio::spawn(watcher));

    // Histogram buffers are drained on a timer, as the exporter expects.
    let upkeep = {
        let sidecar = sidecar.clone();
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => sidecar.metrics.upkeep(),
                    _ = rx.changed() => break,
                }
            }
        })
    };
    tasks.push(upkeep);
    // Tokens stored by another process (`consent`) for accounts waiting for one.
    tasks.push(tokio::spawn(crate::pickup::poll(
        sidecar.clone(),
        sidecar.options().consent_poll_interval,
        shutdown_rx.clone(),
    )));

    // Pre-warm: readiness waits for it (bounded), so traffic starts on a warm cache.
    {
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            let sets = warm;
            if sidecar.options.prewarm_concurrency > 0 && !sets.is_empty() {
                let started = std::time::Instant::now();
                let count = sets.len();
                if tokio::time::timeout(sidecar.options.prewarm_timeout, sidecar.warm_all(sets))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        sets = count,
                        "pre-warm did not finish within --prewarm-timeout; ready anyway"
                    );
                } else {
                    tracing::info!(
                        sets = count,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "pre-warm finished"
                    );
                    // Thousands of inserts leave moka housekeeping behind, and thousands
                    // of fetches freed buffers: settle both before traffic starts.
                    sidecar.cache.run_pending_tasks();
                    let _ = tokio::task::spawn_blocking(release_freed_memory).await;
                }
            }
            sidecar.ready.store(true, Ordering::Release);
        });
    }

    Ok(Running {
        local_addr,
        sidecar,
        shutdown: shutdown_tx,
        tasks,
    })
}
