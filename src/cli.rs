//! The command line: `serve` (default), `check`, `token`, `consent`, `probe`. Every flag can also
//! come from an `EE_AUTH_…` environment variable, as containers are usually configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cache::schedule::Policy;
use crate::config::{self, AccountKind};
use crate::options::Options;
use crate::protocol::Proto;

/// `--version` text: the crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("EE_AUTH_GIT_REV"),
    ")"
);

/// Why a flag's value is refused (clap prints it after the flag's name; exit 2).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlagError {
    /// Not a duration.
    #[error("{0} (examples: 500ms, 30s, 5m)")]
    Duration(humantime::DurationError),
    /// A duration outside the flag's range.
    #[error("out of range: must be {} to {}", humantime::format_duration(*.min), humantime::format_duration(*.max))]
    DurationRange {
        /// The shortest accepted.
        min: Duration,
        /// The longest accepted.
        max: Duration,
    },
    /// A count outside the flag's range.
    #[error("out of range: must be {min} to {max}")]
    CountRange {
        /// The smallest accepted.
        min: usize,
        /// The largest accepted.
        max: usize,
    },
    /// Not a whole number.
    #[error("not a whole number (must be {min} to {max})")]
    NotANumber {
        /// The smallest accepted.
        min: usize,
        /// The largest accepted.
        max: usize,
    },
}

fn duration(s: &str) -> Result<Duration, FlagError> {
    humantime::parse_duration(s).map_err(FlagError::Duration)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A duration flag that accepts `min` to `max` (inclusive). Every duration flag has a
/// range: an absurd value (`500000000000y`) is refused at start (exit 2) rather than
/// overflowing a clock somewhere later. The ranges are listed in the README.
fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, FlagError> + Clone + Send + Sync + 'static {
    move |s| match duration(s)? {
        d if d < min || d > max => Err(FlagError::DurationRange { min, max }),
        d => Ok(d),
    }
}

/// A count flag that accepts `min` to `max` (inclusive).
fn count_in(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<usize, FlagError> + Clone + Send + Sync + 'static {
    move |s| match s.trim().parse::<u128>() {
        Ok(n) if n >= min as u128 && n <= max as u128 => Ok(n as usize),
        Ok(_) => Err(FlagError::CountRange { min, max }),
        Err(_) => Err(FlagError::NotANumber { min, max }),
    }
}

/// The sidecar's command line.
#[derive(Parser, Debug)]
#[command(name = "ee-auth-sidecar", version = VERSION, about = "Authentication server sidecar for EmailEngine", args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` flags, accepted without the subcommand name.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve EmailEngine's authentication requests (the default).
    Serve(Box<ServeArgs>),
    /// Validate a config and every secret it references; list every error.
    Check {
        /// The account map file.
        #[arg(long, env = "EE_AUTH_CONFIG")]
        config: PathBuf,
    },
    /// Fetch one token and print the answer EmailEngine would get.
    Token(Box<TokenArgs>),
    /// Sign the mailbox owner in and store the account's refresh token (consent).
    Consent(Box<ConsentArgs>),
    /// Manage the state store.
    #[command(subcommand)]
    State(StateCommand),
    /// Exit 0 if a URL answers 2xx (a probe for images without a shell or curl).
    Probe {
        /// The URL, e.g. http://127.0.0.1:8080/readyz
        url: String,
        /// How long to wait.
        #[arg(long, default_value = "2s", value_parser = duration_in(millis(100), secs(60)))]
        timeout: Duration,
    },
}

/// `state` subcommands.
#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Copy every record from one state store to another (a directory or a Redis URL),
    /// refusing while a sidecar holds either; records are re-sealed with --to-key-file.
    Migrate(Box<MigrateArgs>),
}

/// `state migrate` flags.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source: a state directory or redis://… / rediss://…
    #[arg(long)]
    pub from: String,
    /// The target: a state directory or redis://… / rediss://…
    #[arg(long)]
    pub to: String,
    /// Keys of the source's records (default: --state-key-file's).
    #[arg(long)]
    pub from_key_file: Option<PathBuf>,
    /// Keys to seal the target's records with (default: --state-key-file's).
    #[arg(long)]
    pub to_key_file: Option<PathBuf>,
    /// Keys of both stores (the sidecar's --state-key-file).
    #[arg(long, env = "EE_AUTH_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,
    /// Key prefix of the Redis store(s).
    #[arg(long, default_value = crate::state::DEFAULT_PREFIX, env = "EE_AUTH_STATE_PREFIX")]
    pub state_prefix: String,
}

/// Flags that choose the state store (`serve` and `token`).
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Directory for rotated refresh tokens (without it, or --state, they live in memory
    /// only). Several processes may share one.
    #[arg(long, env = "EE_AUTH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Redis state store instead of --state-dir: redis://[user:pass@]host:port/db or
    /// rediss://… (EmailEngine's Redis; keys under --state-prefix).
    #[arg(long, env = "EE_AUTH_STATE", hide_env_values = true, conflicts_with = "state_dir", value_parser = RedisUrl)]
    pub state: Option<String>,
    /// Key prefix in the Redis store.
    #[arg(long, default_value = crate::state::DEFAULT_PREFIX, env = "EE_AUTH_STATE_PREFIX", value_parser = state_prefix)]
    pub state_prefix: String,
    /// Keys that seal the state records (AES-256-GCM): one 32-byte key per line, hex or
    /// base64, newest first.
    #[arg(long, env = "EE_AUTH_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,
}

/// At most 20 names, then how many more.
fn listed(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 20 {
        out.push_str(&format!(" and {} more", names.len() - 20));
    }
    out
}

/// Why a `--state` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFlagError {
    /// Not a Redis URL.
    #[error("must be a redis://[user:pass@]host:port/db or rediss://… URL (for a directory use --state-dir)")]
    NotRedis,
    /// Too long.
    #[error("longer than 2048 characters")]
    TooLong,
    /// A bad prefix.
    #[error("must be 1 to 64 characters of A-Z a-z 0-9 : _ . -")]
    Prefix,
}

/// Parses `--state` without ever repeating the value: clap's own errors quote it, and a
/// Redis URL may hold a password.
#[derive(Clone)]
struct RedisUrl;

impl clap::builder::TypedValueParser for RedisUrl {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let refused = |why: &dyn std::fmt::Display| {
            let message =
                format!("invalid --state (not repeated here: it may hold a password): {why}\n");
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, message).with_cmd(cmd)
        };
        let s = value.to_str().ok_or_else(|| refused(&"not UTF-8"))?;
        redis_url(s).map_err(|e| refused(&e))
    }
}

fn redis_url(s: &str) -> Result<String, StateFlagError> {
    if s.len() > 2048 {
        return Err(StateFlagError::TooLong);
    }
    match crate::state::Location::parse(s) {
        crate::state::Location::Redis(u) => Ok(u),
        _ => Err(StateFlagError::NotRedis),
    }
}

fn state_prefix(s: &str) -> Result<String, StateFlagError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(StateFlagError::Prefix)
    }
}

/// Logging flags.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "EE_AUTH_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log level or filter (RUST_LOG, when set, takes precedence).
    #[arg(long, global = true, default_value = "info", env = "EE_AUTH_LOG_LEVEL")]
    pub log_level: String,
}

/// Log output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `serve` flags.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The account map file (JSON).
    #[arg(long, env = "EE_AUTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on; non-loopback needs --allow-remote and `auth`.
    #[arg(long, default_value = "127.0.0.1:8080", env = "EE_AUTH_LISTEN")]
    pub listen: SocketAddr,
    /// The state store.
    #[command(flatten)]
    pub state: StateArgs,
    /// Path of the token endpoint.
    #[arg(long, default_value = "/authentication", env = "EE_AUTH_PATH")]
    pub path: String,
    /// Allow a non-loopback listen address (requires `auth` in the config).
    #[arg(long, env = "EE_AUTH_ALLOW_REMOTE")]
    pub allow_remote: bool,
    /// TLS certificate chain (PEM); with --tls-key, serve HTTPS.
    #[arg(long, env = "EE_AUTH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "EE_AUTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Never hand out a token with less life left (scaled down for short-lived tokens).
    #[arg(long, default_value = "60s", value_parser = duration_in(secs(0), secs(3600)), env = "EE_AUTH_MIN_TTL")]
    pub min_ttl: Duration,
    /// Refresh at least this long before expiry (or 1/5 of the lifetime if larger).
    #[arg(long, default_value = "5m", value_parser = duration_in(secs(0), secs(12 * 3600)), env = "EE_AUTH_REFRESH_MARGIN")]
    pub refresh_margin: Duration,
    /// Lifetime assumed when a provider's answer has no expires_in.
    // At least 1s: a shorter lifetime would make the refresh schedule a tight loop.
    #[arg(long, default_value = "10m", value_parser = duration_in(secs(1), secs(86_400)), env = "EE_AUTH_DEFAULT_LIFETIME")]
    pub default_lifetime: Duration,
    /// Largest retry delay after transient failures.
    #[arg(long, default_value = "60s", value_parser = duration_in(secs(1), secs(3600)), env = "EE_AUTH_BACKOFF_MAX")]
    pub backoff_max: Duration,
    /// Retry delay after a permanent failure (invalid_grant…); a config change retries at once.
    #[arg(long, default_value = "1h", value_parser = duration_in(secs(1), secs(7 * 86_400)), env = "EE_AUTH_PERMANENT_RETRY")]
    pub permanent_retry: Duration,
    /// How long a request without a token is held (for the fetch under way, or through a
    /// back-off for the next attempt) before it is answered 429; below EmailEngine's 90 s
    /// request timeout.
    #[arg(long, default_value = "20s", value_parser = duration_in(Duration::ZERO, secs(80)), env = "EE_AUTH_REQUEST_WAIT")]
    pub request_wait: Duration,
    /// Timeout of one call to an identity provider.
    #[arg(long, default_value = "30s", value_parser = duration_in(millis(100), secs(300)), env = "EE_AUTH_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Duration,
    /// Periodic re-read of the config (backs up the file watcher).
    #[arg(long, default_value = "30s", value_parser = duration_in(millis(100), secs(86_400)), env = "EE_AUTH_RELOAD_INTERVAL")]
    pub reload_interval: Duration,
    /// Concurrent token fetches during start-up pre-warm (0 disables it).
    #[arg(long, default_value = "8", value_parser = count_in(0, 1024), env = "EE_AUTH_PREWARM_CONCURRENCY")]
    pub prewarm_concurrency: usize,
    /// /readyz waits at most this long for pre-warm.
    #[arg(long, default_value = "20s", value_parser = duration_in(secs(0), secs(3600)), env = "EE_AUTH_PREWARM_TIMEOUT")]
    pub prewarm_timeout: Duration,
    /// Concurrent calls to one identity provider at most.
    #[arg(long, default_value = "16", value_parser = count_in(1, 1024), env = "EE_AUTH_PROVIDER_CONCURRENCY")]
    pub provider_concurrency: usize,
    /// Time given to in-flight requests on SIGTERM.
    #[arg(long, default_value = "5s", value_parser = duration_in(secs(0), secs(600)), env = "EE_AUTH_SHUTDOWN_GRACE")]
    pub shutdown_grace: Duration,
    /// Open connections at most.
    #[arg(long, default_value = "4096", value_parser = count_in(1, 1_000_000), env = "EE_AUTH_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Threads serving requests (1: a single-threaded runtime, the fastest here).
    #[arg(long, default_value = "1", value_parser = count_in(1, 64), env = "EE_AUTH_WORKER_THREADS")]
    pub worker_threads: usize,
    /// Request headers must arrive within this time; also closes idle keep-alive connections.
    #[arg(long, default_value = "30s", value_parser = duration_in(millis(100), secs(600)), env = "EE_AUTH_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    #[arg(long, default_value = "15s", value_parser = duration, env = "EE_AUTH_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// A forced refresh (admin API) starts a new call for a credential set at most this often.
    #[arg(long, default_value = "10s", value_parser = duration, env = "EE_AUTH_FORCED_REFRESH_INTERVAL")]
    pub forced_refresh_interval: Duration,
    /// How often accounts waiting for a refresh token (needs consent, invalid_grant) look
    /// for one stored by `consent`.
    #[arg(long, default_value = "10s", value_parser = duration_in(millis(100), secs(3600)), env = "EE_AUTH_CONSENT_POLL_INTERVAL")]
    pub consent_poll_interval: Duration,
}

/// `token` flags.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The account map file.
    #[arg(long, env = "EE_AUTH_CONFIG")]
    pub config: PathBuf,
    /// The account id.
    pub account: String,
    /// The protocol to fetch for.
    #[arg(long, value_parser = ["imap", "smtp", "api"])]
    pub proto: Option<String>,
    /// Print the token instead of a masked form.
    #[arg(long)]
    pub show_token: bool,
    /// Use (and update) the rotated refresh tokens of this state store (the sidecar's,
    /// running or not: the account's lease keeps the two from spending one token).
    #[command(flatten)]
    pub state: StateArgs,
    /// Spend a refresh token without --state-dir: a rotating provider's new refresh token
    /// is then thrown away, and the sidecar's next refresh with the old one may fail.
    #[arg(long)]
    pub allow_unpersisted: bool,
}

/// The consent flows on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowArg {
    /// Device authorization (RFC 8628): a URL and a code to send to the mailbox owner.
    Device,
    /// Authorization code with PKCE through a browser; the redirect comes to 127.0.0.1.
    Browser,
}

/// `consent` flags.
#[derive(Args, Debug)]
pub struct ConsentArgs {
    /// The account map file.
    #[arg(long, env = "EE_AUTH_CONFIG")]
    pub config: PathBuf,
    /// The account id.
    pub account: String,
    /// Consent to the scopes of this protocol's credential set only (default: all of the
    /// account's).
    #[arg(long, value_parser = ["imap", "smtp", "api"])]
    pub proto: Option<String>,
    /// How the owner signs in (default: the provider's; device for Microsoft, browser
    /// for Google).
    #[arg(long, value_enum)]
    pub flow: Option<FlowArg>,
    /// The sidecar's state store, where the token is stored (it may run beside the
    /// sidecar: the account's lease keeps the two from writing over each other).
    #[command(flatten)]
    pub state: StateArgs,
    /// Store the token even if the person who signed in is not the account's `user`.
    #[arg(long)]
    pub accept_user: bool,
    /// Browser flow: the port of the one-shot redirect listener on 127.0.0.1 (0: any).
    #[arg(long, default_value = "0")]
    pub redirect_port: u16,
    /// Browser flow: how long to wait for the sign-in.
    #[arg(long, default_value = "10m", value_parser = duration_in(secs(10), secs(3600)))]
    pub timeout: Duration,
}

/// Why the `serve` flags do not make [`Options`] (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// No config file given.
    #[error("missing --config FILE (or EE_AUTH_CONFIG)")]
    NoConfig,
    /// `--path` is not an absolute path.
    #[error("--path must start with `/`, got `{0}`")]
    Path(String),
    /// `--idle-timeout` outside 1 s to 1 h.
    #[error("--idle-timeout must be between 1s and 1h, got {}", humantime::format_duration(*.0))]
    IdleTimeout(Duration),
    /// `--forced-refresh-interval` over 1 h.
    #[error("--forced-refresh-interval must be at most 1h, got {}", humantime::format_duration(*.0))]
    ForcedRefreshInterval(Duration),
}

impl ServeArgs {
    /// Turns the flags into [`Options`]; the config path is required.
    pub fn into_options(self) -> Result<Options, OptionsError> {
        let config = self.config.ok_or(OptionsError::NoConfig)?;
        let mut o = Options::new(config);
        o.listen = self.listen;
        o.state_dir = self.state.state_dir;
        o.state = self.state.state;
        o.state_prefix = self.state.state_prefix;
        o.state_key_file = self.state.state_key_file;
        if !self.path.starts_with('/') {
            return Err(OptionsError::Path(self.path));
        }
        o.path = self.path;
        o.allow_remote = self.allow_remote;
        o.tls = self.tls_cert.zip(self.tls_key);
        // Ranges are checked by the flags' parsers (`duration_in`, `count_in`).
        o.policy = Policy {
            min_ttl: self.min_ttl,
            margin_floor: self.refresh_margin,
            default_lifetime: self.default_lifetime,
            backoff_max: self.backoff_max,
            permanent_retry: self.permanent_retry,
            request_wait: self.request_wait,
            ..Policy::default()
        };
        o.upstream_timeout = self.upstream_timeout;
        o.reload_interval = self.reload_interval;
        o.prewarm_concurrency = self.prewarm_concurrency;
        o.prewarm_timeout = self.prewarm_timeout;
        o.provider_concurrency = self.provider_concurrency;
        o.shutdown_grace = self.shutdown_grace;
        o.max_connections = self.max_connections;
        o.header_read_timeout = self.header_read_timeout;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.idle_timeout) {
            return Err(OptionsError::IdleTimeout(self.idle_timeout));
        }
        o.idle_timeout = self.idle_timeout;
        if self.forced_refresh_interval > Duration::from_secs(3600) {
            return Err(OptionsError::ForcedRefreshInterval(
                self.forced_refresh_interval,
            ));
        }
        o.forced_refresh_interval = self.forced_refresh_interval;
        o.consent_poll_interval = self.consent_poll_interval;
        Ok(o)
    }
}

/// `check`: prints a summary and returns 0, or every error and returns 1.
pub fn check(config_path: &std::path::Path) -> i32 {
    match config::load(config_path) {
        Err(e) => {
            eprintln!("{e}");
            1
        }
        Ok(c) => {
            let mut per_provider: std::collections::BTreeMap<(String, &'static str), usize> =
                Default::default();
            let mut fixed = 0;
            let mut waiting = 0;
            for a in c.accounts.values() {
                match &a.kind {
                    AccountKind::Fixed(_) => fixed += 1,
                    AccountKind::OAuth(o) => {
                        let no_token = |s: &&std::sync::Arc<config::CredentialSet>| {
                            s.grant == crate::credentials::Grant::RefreshToken
                                && s.refresh_token.is_none()
                        };
                        waiting += usize::from(o.sets().iter().any(no_token));
                        // An account counts once under each provider and grant it uses
                        // (per-protocol overrides may add a second one).
                        let mut used: Vec<(String, &'static str)> = o
                            .sets()
                            .iter()
                            .map(|s| (s.provider_name.to_string(), s.grant.as_str()))
                            .collect();
                        used.sort_unstable();
                        used.dedup();
                        for pair in used {
                            *per_provider.entry(pair).or_default() += 1;
                        }
                    }
                }
            }
            println!(
                "{}: OK, {} account(s)",
                config_path.display(),
                c.accounts.len()
            );
            for (name, kind) in &c.providers {
                println!("  provider {name} ({kind})");
                for ((p, grant), n) in &per_provider {
                    if p == name {
                        println!("    {grant}: {n} account(s)");
                    }
                }
            }
            if fixed > 0 {
                println!("  password or static-token accounts: {fixed}");
            }
            if waiting > 0 {
                println!("  accounts without refreshToken (their token comes from `consent` via the state store): {waiting}");
            }
            if !c.secret_files.is_empty() {
                println!("  secret files read: {}", c.secret_files.len());
            }
            0
        }
    }
}

/// Masks the secret values of an answer body for display.
pub fn mask_answer(body: &[u8]) -> String {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return "[unprintable answer]".into();
    };
    for field in ["accessToken", "pass"] {
        if let Some(serde_json::Value::String(s)) = v.get_mut(field) {
            let n = s.chars().count();
            // A few leading characters help tell tokens apart; none of a password is shown.
            let shown = if field == "accessToken" && n > 16 {
                4
            } else {
                0
            };
            let head: String = s.chars().take(shown).collect();
            *s = format!("{head}…[{n} chars, masked; --show-token prints it]");
        }
    }
    v.to_string()
}

/// The `token` command's timeout of one call to the identity provider.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// `token`: fetches once and prints the answer; returns the exit code.
pub async fn token(args: &TokenArgs) -> i32 {
    let proto = args.proto.as_deref().and_then(Proto::parse);
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let Some(account) = config.account(&args.account) else {
        eprintln!("no account `{}` in {}", args.account, args.config.display());
        return 1;
    };
    let body = match &account.kind {
        AccountKind::Fixed(body) => body.clone(),
        AccountKind::OAuth(o) => {
            let set = o.set_for(proto).clone();
            // Only the refresh_token grant spends something a provider may rotate.
            let spends_refresh_token = set.grant == crate::credentials::Grant::RefreshToken;
            let no_store = args.state.state_dir.is_none() && args.state.state.is_none();
            if spends_refresh_token && no_store && !args.allow_unpersisted {
                eprintln!(
                    "error: refusing to spend the refresh token of `{}` without --state-dir: a provider that rotates refresh tokens (Microsoft, strict-rotation providers) would revoke the current one and the new one would be lost, so the sidecar's next refresh fails with invalid_grant; pass --state-dir DIR (the sidecar's, while it is stopped) to keep the new token, or --allow-unpersisted if the provider does not rotate",
                    args.account
                );
                return 2;
            }
            // A grant that rotates nothing needs no state store.
            let store = if spends_refresh_token {
                match open_state(&args.state).await {
                    Ok(s) => s,
                    Err(code) => return code,
                }
            } else {
                crate::state::TokenStore::in_memory()
            };
            let store = std::sync::Arc::new(store);
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let http = match crate::upstream::http_client(UPSTREAM_TIMEOUT) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("HTTP client: {e}");
                    return 1;
                }
            };
            let upstream = std::sync::Arc::new(crate::upstream::Upstream::new(
                http,
                store.clone(),
                1,
                metrics.clone(),
            ));
            let policy = Policy {
                request_wait: Duration::from_secs(60),
                ..Policy::default()
            };
            let cache = crate::cache::TokenCache::new(upstream, policy, metrics, 1);
            let got = cache.get(&cache.install(&set)).await;
            // The request may give up while an attempt is still under way (it is held
            // through back-offs): start nothing more, and wait for what was sent, so a
            // rotation in its answer is written before the directory is let go.
            cache.close();
            let drain_until = crate::cache::schedule::later(
                tokio::time::Instant::now(),
                UPSTREAM_TIMEOUT + Duration::from_secs(5),
            );
            let unanswered = cache.upstream().drain(drain_until).await;
            if !unanswered.is_empty() && spends_refresh_token {
                eprintln!(
                    "error: the refresh of `{}` was not answered in time; if the provider rotated its refresh token, the account needs re-consent",
                    args.account
                );
            }
            // A rotated token is written before the answer is used; a write that failed
            // gets one more try, and the directory's lock is released.
            let lost = store.close().await;
            if let Some((_, why)) = lost.first() {
                if store.is_durable() {
                    eprintln!(
                        "error: the provider rotated the refresh token of `{}` and the new one could not be written to {}: {why}; the previous one is spent, so the account needs re-consent",
                        args.account,
                        state_location(&args.state).describe()
                    );
                    return 1;
                }
                eprintln!(
                    "warning: the provider rotated the refresh token of `{}`; the new one was not kept (--allow-unpersisted), so a sidecar refreshing with the previous one will get invalid_grant",
                    args.account
                );
            }
            match got {
                Ok((body, _)) => body,
                Err(e) => {
                    eprintln!("{}: {e}", args.account);
                    return 1;
                }
            }
        }
    };
    if args.show_token {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        println!("{}", mask_answer(&body));
    }
    0
}

fn state_location(args: &StateArgs) -> crate::state::Location {
    match (&args.state, &args.state_dir) {
        (Some(u), _) => crate::state::Location::Redis(u.clone()),
        (None, Some(d)) => crate::state::Location::Dir(d.clone()),
        (None, None) => crate::state::Location::Memory,
    }
}

fn load_keys(
    path: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<crate::state::Keyring>>, i32> {
    match path {
        None => Ok(None),
        Some(p) => match crate::state::Keyring::load(p) {
            Ok(k) => Ok(Some(std::sync::Arc::new(k))),
            Err(e) => {
                eprintln!("error: {e}");
                Err(1)
            }
        },
    }
}

/// Opens the state store of `token`; the exit code when it cannot be.
async fn open_state(args: &StateArgs) -> Result<crate::state::TokenStore, i32> {
    let mut o = crate::state::StoreOptions::new(state_location(args));
    o.prefix = args.state_prefix.clone();
    o.keys = load_keys(args.state_key_file.as_deref())?;
    o.lease = UPSTREAM_TIMEOUT + Duration::from_secs(2);
    if matches!(o.location, crate::state::Location::Redis(_)) && o.keys.is_none() {
        eprintln!("warning: the Redis state store is not encrypted (no --state-key-file): its refresh tokens are readable by anyone who can read that Redis");
    }
    match crate::state::TokenStore::connect(&o).await {
        Ok((s, warnings)) => {
            for w in warnings {
                eprintln!("warning: unreadable refresh-token record: {w}");
            }
            Ok(s)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(1)
        }
    }
}

/// `consent`: signs the mailbox owner in and stores the refresh token; returns the exit
/// code (2: bad use, nothing asked; 1: the consent failed, nothing stored).
pub async fn consent(args: &ConsentArgs) -> i32 {
    use crate::consent::{self, Target};
    // A closed stdout (piped into `head`) must not end the sign-in half way.
    macro_rules! say {
        ($($t:tt)*) => {{
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, $($t)*);
            let _ = out.flush();
        }};
    }
    let proto = args.proto.as_deref().and_then(Proto::parse);
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let Some(account) = config.account(&args.account) else {
        eprintln!("no account `{}` in {}", args.account, args.config.display());
        return 1;
    };
    let target = match Target::of(account, proto) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    if args.state.state_dir.is_none() && args.state.state.is_none() {
        eprintln!("error: consent needs the sidecar's state store, --state-dir DIR or --state redis://…: the refresh token is stored there, and the sidecar takes it from there");
        return 2;
    }
    let where_stored = state_location(&args.state).describe();
    // Opened before anyone is asked to sign in: a store that cannot be used fails now.
    let store = match open_state(&args.state).await {
        Ok(s) => std::sync::Arc::new(s),
        Err(code) => return code,
    };
    let http = match crate::upstream::http_client(UPSTREAM_TIMEOUT) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("HTTP client: {e}");
            return 1;
        }
    };
    let flow = match args.flow {
        Some(FlowArg::Device) => crate::provider::ConsentFlow::Device,
        Some(FlowArg::Browser) => crate::provider::ConsentFlow::Browser,
        None => target.client.default_flow,
    };
    say!(
        "consent for `{}` ({}), provider `{}`, scopes: {}",
        target.account,
        target.user,
        target.provider,
        target.scopes.join(" ")
    );
    let got = match flow {
        crate::provider::ConsentFlow::Device => {
            consent::device_flow(&http, &target, |p| {
                say!(
                    "ask {} to open {} and enter the code {} (valid for {})",
                    target.user,
                    p.verification_uri,
                    p.user_code,
                    humantime::format_duration(p.expires_in)
                );
                say!("waiting for the sign-in…");
            })
            .await
        }
        crate::provider::ConsentFlow::Browser => {
            consent::browser_flow(&http, &target, args.redirect_port, args.timeout, |url| {
                say!(
                    "open this URL in a browser on this machine and sign in as {}:",
                    target.user
                );
                say!("{url}");
                say!("waiting for the sign-in…");
            })
            .await
        }
    };
    let stored = match got {
        Ok(c) => consent::store(&store, &target, c, args.accept_user).await,
        Err(e) => Err(e),
    };
    // A write that failed gets one more try, and the store is let go of.
    let lost = store.close().await;
    match stored {
        Ok(_) if !lost.is_empty() => {
            eprintln!(
                "error: the refresh token of `{}` could not be written to {}: {}",
                target.account, where_stored, lost[0].1
            );
            1
        }
        Ok(signed_in) => {
            say!(
                "stored a refresh token for `{}` (signed in as {}) in {}; a running sidecar uses it within --consent-poll-interval",
                target.account,
                signed_in.as_deref().unwrap_or("an identity not checked: --accept-user"),
                where_stored
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `state migrate`: copies every record; returns the exit code.
pub async fn migrate(args: &MigrateArgs) -> i32 {
    let options = |loc: &str, key: Option<&std::path::Path>| {
        let mut o = crate::state::StoreOptions::new(crate::state::Location::parse(loc));
        o.prefix = args.state_prefix.clone();
        o.keys = load_keys(key.or(args.state_key_file.as_deref()))?;
        Ok::<_, i32>(o)
    };
    let (from, to) = match (
        options(&args.from, args.from_key_file.as_deref()),
        options(&args.to, args.to_key_file.as_deref()),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    match crate::state::migrate(&from, &to).await {
        Ok(done) => {
            for w in &done.skipped {
                eprintln!("warning: {w}");
            }
            if !done.plain.is_empty() {
                eprintln!(
                    "note: {} record(s) were not sealed in the source (written before its key, or by anyone who can write to it); check that these accounts' tokens are theirs: {}",
                    done.plain.len(),
                    listed(&done.plain)
                );
            }
            println!(
                "copied {} record(s) from {} to {}{}",
                done.copied,
                from.location.describe(),
                to.location.describe(),
                if to.keys.is_some() { ", sealed" } else { "" }
            );
            i32::from(!done.skipped.is_empty())
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `probe`: 0 if the URL answers 2xx within the timeout, else 1 with one line on stderr
/// saying what went wrong.
pub async fn probe(url: &str, timeout: Duration) -> i32 {
    match probe_once(url, timeout).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("probe {url}: {e}");
            1
        }
    }
}

/// Why a probe failed, as its one stderr line says.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no scheme: give the whole URL, e.g. http://127.0.0.1:8080/readyz")]
    NoScheme,
    #[error("not a valid URL: {0}")]
    BadUrl(String),
    #[error("the scheme must be http:// or https://, not `{0}:`")]
    Scheme(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Any other transport failure: its innermost cause.
    #[error("{0}")]
    Other(String),
}

async fn probe_once(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    if !url.contains("://") {
        return Err(ProbeError::NoScheme);
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| ProbeError::BadUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ProbeError::Scheme(parsed.scheme().to_owned()));
    }
    // No proxy: a probe targets the pod's own loopback, even when HTTPS_PROXY is set for
    // the identity providers.
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| ProbeError::Client(error_chain(&e)))?;
    match client.get(parsed).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(ProbeError::Status(r.status())),
        Err(e) if e.is_timeout() => Err(ProbeError::Timeout(timeout)),
        Err(e) if e.is_connect() => Err(ProbeError::Connect(error_chain(&e))),
        Err(e) => Err(ProbeError::Other(error_chain(&e))),
    }
}

/// The innermost cause of an error: reqwest's own message ("error sending request")
/// says nothing the operator can act on, its source ("Connection refused") does.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    // io::Error displays as "Connection refused (os error 111)".
    let text = inner.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_and_option_errors_read_as_before() {
        let not_a_duration = humantime::parse_duration("soon").unwrap_err();
        assert_eq!(
            duration("soon").unwrap_err().to_string(),
            format!("{not_a_duration} (examples: 500ms, 30s, 5m)")
        );
        let hour = duration_in(secs(1), secs(3600));
        assert_eq!(hour("1h"), Ok(secs(3600)));
        assert_eq!(
            hour("2h"),
            Err(FlagError::DurationRange {
                min: secs(1),
                max: secs(3600)
            })
        );
        assert_eq!(
            duration_in(millis(100), secs(60))("2h")
                .unwrap_err()
                .to_string(),
            "out of range: must be 100ms to 1m"
        );
        let threads = count_in(1, 64);
        assert_eq!(threads(" 64 ").unwrap(), 64);
        assert_eq!(
            threads("0").unwrap_err().to_string(),
            "out of range: must be 1 to 64"
        );
        assert_eq!(
            threads("many").unwrap_err().to_string(),
            "not a whole number (must be 1 to 64)"
        );
        let cases = [
            (
                OptionsError::NoConfig,
                "missing --config FILE (or EE_AUTH_CONFIG)",
            ),
            (
                OptionsError::Path("token".into()),
                "--path must start with `/`, got `token`",
            ),
            (
                OptionsError::IdleTimeout(secs(7200)),
                "--idle-timeout must be between 1s and 1h, got 2h",
            ),
            (
                OptionsError::ForcedRefreshInterval(secs(7200)),
                "--forced-refresh-interval must be at most 1h, got 2h",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    #[test]
    fn probe_errors_read_as_before() {
        let cases = [
            (
                ProbeError::NoScheme,
                "no scheme: give the whole URL, e.g. http://127.0.0.1:8080/readyz",
            ),
            (
                ProbeError::Scheme("ftp".into()),
                "the scheme must be http:// or https://, not `ftp:`",
            ),
            (
                ProbeError::Status(reqwest::StatusCode::SERVICE_UNAVAILABLE),
                "answered 503 Service Unavailable",
            ),
            (ProbeError::Timeout(millis(300)), "no answer within 300ms"),
            (
                ProbeError::Connect("connection refused".into()),
                "cannot connect: connection refused",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }
}
