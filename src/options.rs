//! What the sidecar is started with (the CLI fills it; tests build it directly), and
//! the check of the listen address against the config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cache::schedule::Policy;
use crate::config::Config;

/// Everything the sidecar is configured with.
#[derive(Clone, Debug)]
pub struct Options {
    /// The account map file.
    pub config_path: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where rotated refresh tokens are persisted; memory only without it (or `state`).
    pub state_dir: Option<PathBuf>,
    /// A Redis state store (`redis://…` / `rediss://…`), instead of `state_dir`.
    pub state: Option<String>,
    /// Key prefix in the Redis store.
    pub state_prefix: String,
    /// Keys that seal state records, newest first (hex or base64, one per line).
    pub state_key_file: Option<PathBuf>,
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
    /// How often the accounts waiting for a refresh token (needs consent, or refused
    /// with `invalid_grant`) look for one in the state store (a consent from another
    /// process).
    pub consent_poll_interval: Duration,
}

impl Options {
    /// Defaults for everything but the config file.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Options {
            config_path: config_path.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: None,
            state: None,
            state_prefix: crate::state::DEFAULT_PREFIX.into(),
            state_key_file: None,
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
            consent_poll_interval: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// Where the state lives: Redis, a directory, or memory.
    pub fn state_location(&self) -> crate::state::Location {
        use crate::state::Location;
        match (&self.state, &self.state_dir) {
            (Some(url), _) => Location::Redis(url.clone()),
            (None, Some(dir)) => Location::Dir(dir.clone()),
            (None, None) => Location::Memory,
        }
    }

    /// How the state store is opened (the key file is read by the caller).
    pub fn store_options(
        &self,
        keys: Option<std::sync::Arc<crate::state::Keyring>>,
    ) -> crate::state::StoreOptions {
        let mut o = crate::state::StoreOptions::new(self.state_location());
        o.prefix = self.state_prefix.clone();
        o.keys = keys;
        // Longer than one upstream call (renewed while it runs): a process that dies
        // holding it blocks the account's refreshes for at most this long.
        o.lease = self.upstream_timeout.saturating_add(Duration::from_secs(2));
        o
    }
}

/// Why a listen address is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ListenError {
    /// Non-loopback without `--allow-remote`.
    #[error("refusing to listen on non-loopback address {0}: tokens would be reachable from outside the pod; pass --allow-remote (and configure `auth`) if that is really wanted")]
    RemoteNotAllowed(SocketAddr),
    /// Non-loopback without Basic credentials.
    #[error("refusing to listen on non-loopback address {0} without `auth` in the config: --allow-remote requires Basic credentials")]
    RemoteWithoutAuth(SocketAddr),
}

/// Refuses a listen address that could expose tokens beyond the pod.
pub fn check_listen(options: &Options, config: &Config) -> Result<(), ListenError> {
    if options.listen.ip().is_loopback() {
        return Ok(());
    }
    if !options.allow_remote {
        return Err(ListenError::RemoteNotAllowed(options.listen));
    }
    if config.auth.is_none() {
        return Err(ListenError::RemoteWithoutAuth(options.listen));
    }
    Ok(())
}
