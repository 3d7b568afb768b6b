//! The running sidecar: owns the config `ArcSwap`, the cache, the metrics and the
//! lifecycle (start, pre-warm, reload, graceful shutdown). The HTTP layer (`server`)
//! and the file watcher (`reload`) drive it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::schedule::Policy;
use crate::cache::TokenCache;
use crate::config::{self, AccountKind, Config, CredentialSet};
use crate::credentials::{ConfigError, ConfigErrors, CredentialKey, Grant};
use crate::metrics::Metrics;
use crate::state::TokenStore;
use crate::upstream::{http_client, SentCall, Upstream};

/// Everything `serve` is configured with (the CLI fills it; tests build it directly).
#[derive(Clone, Debug)]
pub struct Options {
    /// The account map file.
    pub config_path: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where rotated refresh tokens are persisted; memory only without it.
    pub state_dir: Option<PathBuf>,
    /// The token endpoint's path.
    pub path: String,
    /// Permit a non-loopback listen address (requires `auth`).
    pub allow_remote: bool,
    /// TLS certificate chain and key (PEM), if TLS is wanted.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Cache timing rules.
    pub policy: Policy,
    /// Periodic re-read of the config, backing up the file watcher.
    pub reload_interval: Duration,
    /// Quiet time that ends a burst of file events.
    pub reload_debounce: Duration,
    /// Concurrent fetches during pre-warm (0 disables pre-warm).
    pub prewarm_concurrency: usize,
    /// Readiness waits at most this long for pre-warm.
    pub prewarm_timeout: Duration,
    /// Concurrent upstream calls per provider.
    pub provider_concurrency: usize,
    /// Timeout of one upstream call.
    pub upstream_timeout: Duration,
    /// Time given to in-flight requests and fetches on shutdown.
    pub shutdown_grace: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// A client must send its request headers within this time (also ends idle keep-alive).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress (fresh, or keep-alive between requests)
    /// is closed after this long.
    pub idle_timeout: Duration,
    /// A forced refresh (admin API) of one credential set starts a new upstream call at
    /// most this often.
    pub forced_refresh_interval: Duration,
}

impl Options {
    /// Defaults for everything but the config file.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Options {
            config_path: config_path.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: None,
            path: "/authentication".into(),
            allow_remote: false,
            tls: None,
            policy: Policy::default(),
            reload_interval: Duration::from_secs(30),
            reload_debounce: Duration::from_millis(200),
            prewarm_concurrency: 8,
            prewarm_timeout: Duration::from_secs(20),
            provider_concurrency: 16,
            upstream_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15),
            forced_refresh_interval: Duration::from_secs(10),
        }
    }
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The listen address is not allowed.
    #[error("{0}")]
    Listen(ListenError),
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
    Tls(crate::server::TlsError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// The outcome of the last config load, for the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// When the config in use was loaded (RFC 3339).
    pub last_success_at: Option<String>,
    /// The errors of the last failed load, if it failed after the last success.
    pub last_error: Option<Vec<String>>,
    /// When that failure happened.
    pub last_error_at: Option<String>,
}

/// State shared by the server, the reloader and background tasks.
pub struct Sidecar {
    config: ArcSwap<Config>,
    cache: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    reload_status: Mutex<ReloadStatus>,
    options: Options,
    store: Arc<TokenStore>,
    /// Admin lists being built (a whole list of 100k accounts is tens of MB): a few at
    /// a time at most.
    list_builds: Arc<tokio::sync::Semaphore>,
}

/// Admin lists built at once at most; more are answered 503.
const LIST_BUILDS: usize = 2;

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Why a listen address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Not loopback, and `--allow-remote` not given.
    #[error("refusing to listen on non-loopback address {0}: tokens would be reachable from outside the pod; pass --allow-remote (and configure `auth`) if that is really wanted")]
    Remote(SocketAddr),
    /// `--allow-remote` without `auth` in the config.
    #[error("refusing to listen on non-loopback address {0} without `auth` in the config: --allow-remote requires Basic credentials")]
    NoAuth(SocketAddr),
}

/// Refuses a listen address that could expose tokens beyond the pod.
pub fn check_listen(options: &Options, config: &Config) -> Result<(), ListenError> {
    if options.listen.ip().is_loopback() {
        return Ok(());
    }
    if !options.allow_remote {
        return Err(ListenError::Remote(options.listen));
    }
    if config.auth.is_none() {
        return Err(ListenError::NoAuth(options.listen));
    }
    Ok(())
}

impl Sidecar {
    /// Builds the shared state from a validated config.
    fn new(config: Config, options: Options) -> Result<(Arc<Self>, Arc<TokenStore>), StartError> {
        let metrics = Arc::new(Metrics::new());
        let store = match &options.state_dir {
            Some(dir) => {
                let (store, warnings) = TokenStore::open(dir)?;
                for w in warnings {
                    tracing::warn!(record = %w, "unreadable refresh-token record");
                }
                tracing::info!(dir = %dir.display(), restored = store.len(), "rotated refresh tokens are persisted");
                store
            }
            None => {
                // Only refresh-token grants can rotate; a config of passwords, static
                // tokens and app-only grants loses nothing on restart.
                if config.credential_sets().any(|s| s.refresh_token.is_some()) {
                    tracing::warn!("no --state-dir: rotated refresh tokens are kept in memory only and are LOST on restart; accounts whose provider rotates refresh tokens (Microsoft) will fail once the config's token expires");
                }
                TokenStore::in_memory()
            }
        };
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
        metrics.reload(true);
        let sidecar = Arc::new(Sidecar {
            config: ArcSwap::from_pointee(config),
            cache,
            metrics,
            ready: AtomicBool::new(false),
            reload_status: Mutex::new(ReloadStatus {
                last_success_at: Some(now_rfc3339()),
                ..Default::default()
            }),
            options,
            store: store.clone(),
            list_builds: Arc::new(tokio::sync::Semaphore::new(LIST_BUILDS)),
        });
        Ok((sidecar, store))
    }

    /// The config in use.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// The token cache.
    pub fn cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A place to build an admin list in, if one is free.
    pub fn list_build(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.list_builds.clone().try_acquire_owned().ok()
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The store of rotated refresh tokens.
    pub fn token_store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    /// Whether pre-warm has finished (or timed out).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The last config load outcome.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Renders `/metrics`: the per-state counts are kept as keys change, so a scrape
    /// costs the same with 10 or 100,000 accounts.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.cache.snapshot())
    }

    /// Re-reads the config file and, if it changed and is valid, swaps it in and applies
    /// the differences to the cache. An invalid config changes nothing.
    pub async fn reload(self: &Arc<Self>) -> Result<bool, ConfigErrors> {
        let path = self.options.config_path.clone();
        // Files byte-for-byte as the config in use was built from them: nothing to parse.
        // Only when the last attempt succeeded; a broken file is re-parsed (and its error
        // deduplicated) until it is fixed.
        let current = self.config.load_full();
        let last_failed = self
            .reload_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .is_some();
        let loaded = at_low_priority(move || {
            if !last_failed && current.files_unchanged(&path) {
                return None;
            }
            Some(config::load(&path))
        })
        .await;
        let loaded = match loaded {
            Ok(None) => return Ok(false),
            Ok(Some(loaded)) => loaded,
            Err(e) => Err(ConfigErrors {
                file: self.options.config_path.clone(),
                errors: vec![ConfigError::new("(file)", format!("loader failed: {e}"))],
            }),
        };
        let new = loaded.and_then(|c| {
            if c.fingerprint == self.config.load().fingerprint {
                return Ok(None);
            }
            check_listen(&self.options, &c).map_err(|m| ConfigErrors {
                file: self.options.config_path.clone(),
                errors: vec![ConfigError::new("auth", m.to_string())],
            })?;
            Ok(Some(c))
        });
        match new {
            Ok(None) => {
                // The file is back to the config in use (an operator reverted a bad
                // edit): the error shown is no longer true.
                let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
                if st.last_error.take().is_some() {
                    st.last_error_at = None;
                    tracing::info!(file = %self.options.config_path.display(), "config file is valid again and unchanged from the one in use");
                }
                Ok(false)
            }
            Ok(Some(new)) => {
                let new = Arc::new(new);
                let old = self.config.swap(new.clone());
                self.metrics.reload(true);
                {
                    let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_success_at = Some(now_rfc3339());
                    st.last_error = None;
                    st.last_error_at = None;
                }
                self.apply_diff(old, &new).await;
                Ok(true)
            }
            Err(errors) => {
                let messages: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
                let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
                if st.last_error.as_ref() == Some(&messages) {
                    // The same broken file looked at again (periodic re-read, an unrelated
                    // event): it was logged and counted when it first appeared.
                    return Err(errors);
                }
                self.metrics.reload(false);
                tracing::error!(file = %errors.file.display(), "{errors}; keeping the previous config");
                st.last_error = Some(messages);
                st.last_error_at = Some(now_rfc3339());
                Err(errors)
            }
        }
    }

    /// Brings the cache in line with a new config: removed keys go at once, changed ones
    /// are refetched, new accounts are warmed in the background; unchanged keys keep
    /// their tokens and cause no upstream call.
    async fn apply_diff(self: &Arc<Self>, old: Arc<Config>, new: &Arc<Config>) {
        // Working out the differences walks every account: with 100k of them that is
        // milliseconds of CPU, kept off the thread that serves requests.
        let new_c = new.clone();
        let diff = match at_low_priority(move || {
            let diff = Diff::between(&old, &new_c);
            drop(old);
            release_freed_memory();
            diff
        })
        .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "config diff failed; re-checking every account against the new config");
                Diff::everything(new)
            }
        };
        for key in &diff.removed {
            self.cache.remove(key).await;
        }
        for set in &diff.changed {
            self.cache.replace(set).await;
        }
        // A request that loaded the old map just before the swap may reach the cache only
        // after this diff and bring a removed key back: remove those once more, shortly.
        if !diff.removed.is_empty() {
            let this = Arc::downgrade(self);
            let removed = diff.removed.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(this) = this.upgrade() {
                    this.drop_unconfigured(&removed).await;
                }
            });
        }
        tracing::info!(
            accounts = new.accounts.len(),
            removed_sets = diff.removed.len(),
            changed_sets = diff.changed.len(),
            warming_sets = diff.added.len(),
            "config reloaded"
        );
        if !diff.added.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.warm_all(diff.added).await });
        }
    }

    /// Forgets those of `keys` that the config in use does not define.
    async fn drop_unconfigured(&self, keys: &[CredentialKey]) {
        let stale: Vec<&CredentialKey> = {
            let config = self.config();
            keys.iter()
                .filter(|key| match config.account(&key.account).map(|a| &a.kind) {
                    Some(AccountKind::OAuth(o)) => !o.sets().iter().any(|s| s.key == **key),
                    _ => true,
                })
                .collect()
        };
        for key in stale {
            self.cache.remove(key).await;
        }
    }

    /// Fetches tokens for `sets` with bounded concurrency; returns when all are done.
    async fn warm_all(self: &Arc<Self>, sets: Vec<Arc<CredentialSet>>) {
        let n = self.options.prewarm_concurrency.max(1);
        futures_util::stream::iter(sets)
            .map(|set| {
                let cache = self.cache.clone();
                async move {
                    if let Some(flight) = cache.warm(&set) {
                        let _ = flight.await;
                    }
                }
            })
            .buffer_unordered(n)
            .for_each(|_| async {})
            .await;
    }
}

/// The work of a reload (reading, parsing and validating the map, then the diff) died
/// before it gave its result: it panicked, or its thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("the reload's worker thread {0}")]
struct WorkerLost(&'static str);

/// Runs `work` on a thread of its own at a lower CPU priority (nice +10) and waits for it.
///
/// A reload of 100k accounts takes most of a second of CPU. On tokio's blocking pool it
/// competed as an equal with the thread serving requests whenever the two shared a core
/// (a pod with a one-CPU limit, a busy node): the hit p99 during such reloads rose from
/// ~3 to 25 ms (BENCHMARKS.md, P5). At nice +10 the serving thread gets the core whenever
/// it has work; the reload only takes longer when the core is busy.
async fn at_low_priority<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WorkerLost> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ee-reload".into())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = done.send(work());
        })
        .map_err(|_| WorkerLost("could not be started"))?;
    // The sender is dropped without a value only if `work` panicked.
    result.await.map_err(|_| WorkerLost("panicked"))
}

/// Nice +10 for the calling thread, relative to the process's own value (on Linux nice is
/// a thread's setting, unlike POSIX's per-process one, and `nice` changes the caller's).
/// Best effort: without it a reload only competes as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn lower_this_threads_priority() {
    // SAFETY: nice takes no pointers; it only lowers this thread's scheduling weight.
    unsafe {
        libc::nice(10);
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_this_threads_priority() {}

/// Hands memory freed after a config load back to the OS. Parsing a big map makes many
/// short-lived allocations, and glibc otherwise keeps the freed pages: the process would
/// sit at its peak size (hundreds of MB with 100k accounts) for good.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointers from us; it only walks glibc's own heap
    // bookkeeping, under glibc's locks, and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// What a reload changes in the cache.
struct Diff {
    /// Keys the new config no longer has.
    removed: Vec<CredentialKey>,
    /// Keys whose credentials changed.
    changed: Vec<Arc<CredentialSet>>,
    /// Sets of new or changed accounts to fetch before anyone asks.
    added: Vec<Arc<CredentialSet>>,
}

impl Diff {
    /// Account by account: an account's digest covers all its credential sets, so an
    /// unchanged one (nearly all of a big map) costs one hash lookup. The old config is
    /// dropped here too, off the serving thread (freeing a big map takes a while).
    fn between(old: &Config, new: &Config) -> Diff {
        let mut diff = Diff {
            removed: Vec::new(),
            changed: Vec::new(),
            added: Vec::new(),
        };
        for (id, old_account) in &old.accounts {
            let new_account = new.accounts.get(id);
            if new_account.is_some_and(|n| n.fingerprint == old_account.fingerprint) {
                continue;
            }
            let AccountKind::OAuth(old_oauth) = &old_account.kind else {
                continue;
            };
            let new_sets = match new_account.map(|a| &a.kind) {
                Some(AccountKind::OAuth(n)) => n.sets(),
                _ => Vec::new(),
            };
            for set in old_oauth.sets() {
                match new_sets.iter().find(|n| n.key == set.key) {
                    None => diff.removed.push(set.key.clone()),
                    Some(n) if n.fingerprint != set.fingerprint => diff.changed.push((*n).clone()),
                    Some(_) => {}
                }
            }
        }
        for account in new.accounts.values() {
            let unchanged = old
                .accounts
                .get(&account.id)
                .is_some_and(|o| o.fingerprint == account.fingerprint);
            if let (false, AccountKind::OAuth(o)) = (unchanged, &account.kind) {
                diff.added.extend(o.warm_sets().into_iter().cloned());
            }
        }
        diff
    }

    /// The fallback when the diff could not be computed: treat every set as changed.
    fn everything(new: &Config) -> Diff {
        Diff {
            removed: Vec::new(),
            changed: new.credential_sets().cloned().collect(),
            added: Vec::new(),
        }
    }
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
        let grace = self.sidecar.options.shutdown_grace;
        let now = tokio::time::Instant::now();
        // A grace too large to add is as good as no limit; a day is far beyond any call.
        let deadline = now
            .checked_add(grace)
            .or_else(|| now.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(now);
        self.sidecar.cache.close();
        let _ = self.shutdown.send(true);
        let upstream = self.sidecar.cache.upstream().clone();
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
        let store = self.sidecar.store.clone();
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
                    "stopping with this account's newest refresh token only in memory: the state directory could not be written; the account needs re-consent after the restart");
            }
        } else if !unpersisted.is_empty() {
            tracing::warn!(
                accounts = unpersisted.len(),
                "no --state-dir: the rotated refresh tokens of these accounts are lost now"
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

/// Loads the config, binds, and starts serving, pre-warming and watching the config.
pub async fn start(options: Options) -> Result<Running, StartError> {
    let config = config::load(&options.config_path)?;
    release_freed_memory();
    check_listen(&options, &config).map_err(StartError::Listen)?;
    if config.auth.is_none() {
        tracing::warn!("no `auth` in the config: any process that can reach the listen address gets tokens without credentials (and may hold requests open); set `auth` and put its user and password into EmailEngine's authServer URL");
    }
    let tls = match &options.tls {
        Some((cert, key)) => Some(crate::server::tls_acceptor(cert, key).map_err(StartError::Tls)?),
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
    let (sidecar, _store) = Sidecar::new(config, options)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tracing::info!(
        addr = %local_addr,
        path = %sidecar.options.path,
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

    // Pre-warm: readiness waits for it (bounded), so traffic starts on a warm cache.
    {
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            let sets: Vec<Arc<CredentialSet>> = sidecar
                .config()
                .accounts
                .values()
                .flat_map(|a| match &a.kind {
                    AccountKind::OAuth(o) => o.warm_sets().into_iter().cloned().collect(),
                    AccountKind::Fixed(_) => Vec::new(),
                })
                .collect();
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
                    sidecar.cache.run_pending_tasks().await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn reload_work_runs_at_a_lower_priority_than_the_serving_thread() {
        // SAFETY: getpriority takes no pointers; with 0 it reads the calling thread's nice
        // value (Linux).
        let nice_of_this_thread = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let serving = nice_of_this_thread();
        let reload = at_low_priority(nice_of_this_thread).await.unwrap();
        assert_eq!(reload, (serving + 10).min(19));
        assert_eq!(
            nice_of_this_thread(),
            serving,
            "the caller's thread is left alone"
        );
    }

    #[tokio::test]
    async fn reload_work_that_panics_is_an_error_not_a_hang() {
        let lost = at_low_priority(|| -> u32 { panic!("broken reload") })
            .await
            .unwrap_err();
        assert_eq!(lost.to_string(), "the reload's worker thread panicked");
    }
}
