//! Durable store of rotated refresh tokens: a directory (`--state-dir`) or Redis
//! (`--state redis://…`), optionally sealed with `--state-key-file`.
//!
//! Microsoft (and strict-rotation providers) hand out a new refresh token on every
//! refresh; the old one dies sooner or later. Forgetting a rotated token therefore loses
//! the account weeks later, so each rotation is written to the store *before* the new
//! token is used or the access token that came with it is served.
//!
//! A persisted token wins over the config's, unless the config's token is not the one the
//! persisted chain started from: then an operator re-consented, and the config wins.
//!
//! One spender at a time, across processes: before a refresh token that may rotate is
//! spent, the spender takes the account's lease in the store ([`TokenStore::lock_account`]:
//! a per-account `flock` in a directory, `SET NX PX` in Redis), re-reads the record
//! (another process may have rotated it), and writes the rotation with a compare-and-set
//! on the account's generation. Writes of one process are also serialized per account.
//!
//! A write that fails (disk full, Redis unreachable) loses nothing yet: the newest token
//! stays in memory and is the one spent next, the account is listed as unpersisted (admin
//! API, gauge), its lease is kept, and the write is retried with back-off until it
//! succeeds, and once more at shutdown.
//!
//! A record that does not open (tampered with, copied from another account, sealed under
//! a key that is gone) is refused: the account is reported and not served from it.

mod dir;
mod record;
mod redis;
pub mod seal;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use record::RecordError;
pub use seal::{KeyFileError, Keyring};

use crate::secret::Secret;
use record::Stored;

/// Why the state store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, reading or writing under the state directory failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A Redis command failed or timed out.
    #[error("Redis state store {host}: {op}: {why}")]
    Redis {
        /// host:port.
        host: String,
        /// What was done.
        op: &'static str,
        /// Why it failed.
        why: String,
    },
    /// `--state` is not a usable Redis URL.
    #[error("--state redis URL for {host}: {why} (expected redis://[user:pass@]host:port/db or rediss://…)")]
    BadUrl {
        /// host:port as given.
        host: String,
        /// Why.
        why: String,
    },
    /// `--state-prefix` is unusable.
    #[error("--state-prefix `{0}`: must be 1 to 64 characters of A-Z a-z 0-9 : _ . -")]
    BadPrefix(String),
    /// The account's lease could not be taken in time.
    #[error("could not take the refresh lease of account {account} within {} (another process is refreshing it, or the state store is unreachable); retried", humantime::format_duration(*.waited))]
    LockTimeout {
        /// The account.
        account: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Another process wrote the account's record meanwhile.
    #[error("another process rotated account {account}'s refresh token meanwhile (stored generation {found}, this write followed {expected}); the stored one is used")]
    Conflict {
        /// The account.
        account: String,
        /// The generation this write followed.
        expected: u64,
        /// The generation found.
        found: u64,
    },
    /// The stored record is not used.
    #[error("the stored record of account {account} is refused: {why}; the account is not served from it (restore the record, or re-consent the account)")]
    Refused {
        /// The account.
        account: String,
        /// Why.
        why: String,
    },
    /// A write without keys would replace a sealed record.
    #[error("the stored record of account {account} is sealed and this process has no --state-key-file: nothing was written (a plain record would replace it, and a sidecar with the key would refuse that); give the key")]
    SealedWithoutKey {
        /// The account.
        account: String,
    },
    /// A store `state migrate` needs to itself is in use.
    #[error("state store {store} is in use by {by}; stop it first")]
    InUse {
        /// The store.
        store: String,
        /// Who holds it.
        by: String,
    },
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// The store was closed (shutdown) and released: nothing is written.
    #[error("the state store was released at shutdown; nothing more is written")]
    Closed,
}

/// Where the state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// Memory only (lost on restart).
    Memory,
    /// A directory.
    Dir(PathBuf),
    /// A Redis URL.
    Redis(String),
}

impl Location {
    /// A `--state` / `--from` / `--to` value: a redis:// or rediss:// URL, else a directory.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            Location::Redis(s.to_owned())
        } else {
            Location::Dir(PathBuf::from(s))
        }
    }

    /// For logs and errors: the directory, or the Redis host (never credentials).
    pub fn describe(&self) -> String {
        match self {
            Location::Memory => "memory".into(),
            Location::Dir(d) => d.display().to_string(),
            Location::Redis(u) => format!("redis {}", redis::url_host(u)),
        }
    }
}

/// How a store is opened.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Where.
    pub location: Location,
    /// Redis key prefix.
    pub prefix: String,
    /// Sealing keys, newest first.
    pub keys: Option<Arc<Keyring>>,
    /// How long a spend lease lives without renewal (longer than an upstream call).
    pub lease: Duration,
    /// How long one Redis command may take.
    pub timeout: Duration,
}

/// The default Redis key prefix.
pub const DEFAULT_PREFIX: &str = "eeas:";

impl StoreOptions {
    /// Defaults for `location`.
    pub fn new(location: Location) -> Self {
        StoreOptions {
            location,
            prefix: DEFAULT_PREFIX.into(),
            keys: None,
            lease: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Clone)]
struct Record {
    origin: [u8; 32],
    token: Secret,
    /// Store-wide rotation number: a write of an older one never replaces a newer one.
    version: u64,
    /// The newest version written by this process (0: none).
    written: u64,
}

/// Writes of one account are serialized by one of these, picked by the account's hash:
/// a lock per account would cost memory for every account that ever rotated.
const WRITE_STRIPES: usize = 64;

/// First retry of a failed write, doubled after each failed round up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between two rounds of retried writes.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why an account's newest refresh token exists only in memory, or its stored record is
/// refused (admin API).
#[derive(Clone, Debug)]
pub struct PersistStatus {
    /// `memory_only` or `refused`.
    pub state: &'static str,
    /// The reason of the last failed write, or why nothing is written, or why the stored
    /// record is refused.
    pub error: String,
    /// Since when.
    pub since: SystemTime,
    /// Failed writes so far (0 without a state store).
    pub attempts: u32,
    /// When the next write is tried, if one is scheduled.
    pub retry_in: Option<Duration>,
}

/// An unpersisted account: its rotation that is not in the store, and why.
struct Pending {
    version: u64,
    /// Shared: with no state store every rotated account has the same reason.
    error: Arc<str>,
    since: SystemTime,
    attempts: u32,
}

#[derive(Default)]
struct Unpersisted {
    accounts: HashMap<Arc<str>, Pending>,
    /// Whether the retry task runs, and when its next round is.
    retrying: bool,
    next_round: Option<tokio::time::Instant>,
}

/// One record to write.
struct WriteJob {
    account: Arc<str>,
    origin: [u8; 32],
    token: Secret,
    version: u64,
}

enum Backend {
    Memory,
    Dir(Arc<dir::DirStore>),
    Redis(Arc<redis::RedisStore>),
}

/// A spend lease held in the store.
enum Lease {
    None,
    File(#[allow(dead_code)] dir::FileLease),
    Redis(redis::RedisLease),
}

impl Lease {
    /// Whether it may no longer be ours (a Redis lease not renewed in time; a `flock`
    /// lasts as long as its file is open).
    fn is_lost(&self) -> bool {
        match self {
            Lease::Redis(l) => l.is_lost(),
            Lease::None | Lease::File(_) => false,
        }
    }
}

/// A lease of this process: `guarded` while a [`LeaseGuard`] holds it; kept after that
/// while the account's rotation is not written yet.
struct Held {
    lease: Lease,
    guarded: bool,
}

/// A refused record.
struct Refusal {
    why: String,
    since: SystemTime,
}

/// The store's health, for status and metrics.
#[derive(Clone, Debug)]
pub struct StoreHealth {
    /// `memory`, `directory` or `redis`.
    pub backend: &'static str,
    /// The directory or the Redis host.
    pub location: String,
    /// Whether the last command succeeded.
    pub reachable: bool,
    /// Since when it has not been reachable.
    pub unreachable_since: Option<SystemTime>,
    /// The last error while unreachable.
    pub error: Option<String>,
    /// Whether records are sealed.
    pub encrypted: bool,
}

/// The newest refresh token of every account whose token has rotated, in memory and (with
/// a store) durably; other accounts spend their config's token.
pub struct TokenStore {
    backend: Backend,
    keys: Option<Arc<Keyring>>,
    lease: Duration,
    records: Mutex<HashMap<Arc<str>, Record>>,
    /// The store's generation of each account's record, as last read or written.
    generations: Mutex<HashMap<Arc<str>, u64>>,
    refused: Mutex<HashMap<Arc<str>, Refusal>>,
    held: Mutex<HashMap<Arc<str>, Held>>,
    /// A write holds its account's stripe, so writes of one account (a rotation and a
    /// retry) never interleave, and one older than the record's `written` is skipped.
    stripes: [tokio::sync::Mutex<()>; WRITE_STRIPES],
    next_version: AtomicU64,
    unpersisted: Mutex<Unpersisted>,
    gauge: OnceLock<metrics::Gauge>,
    /// Whether writes are allowed; false once closed. Writers hold it shared, so closing
    /// waits for a write under way and none follows.
    open: tokio::sync::RwLock<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single-step updates only: a poisoned lock still holds a whole map.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stripe(account: &str) -> usize {
    ring::digest::digest(&ring::digest::SHA256, account.as_bytes())
        .as_ref()
        .first()
        .map_or(0, |b| usize::from(*b) % WRITE_STRIPES)
}

impl TokenStore {
    fn with_backend(backend: Backend, keys: Option<Arc<Keyring>>, lease: Duration) -> Self {
        let durable = !matches!(backend, Backend::Memory);
        TokenStore {
            backend,
            keys,
            lease,
            records: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            stripes: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            next_version: AtomicU64::new(0),
            unpersisted: Mutex::new(Unpersisted::default()),
            gauge: OnceLock::new(),
            open: tokio::sync::RwLock::new(durable),
        }
    }

    /// A store that keeps rotated tokens in memory only (lost on restart).
    pub fn in_memory() -> Self {
        Self::with_backend(Backend::Memory, None, Duration::from_secs(60))
    }

    /// Opens (creating, mode 0700) a state directory without a key and loads every
    /// persisted token. Unreadable records are reported and skipped; stray temp files
    /// are removed.
    pub fn open(dir: &std::path::Path) -> Result<(Self, Vec<String>), StateError> {
        let (d, mut warnings) = dir::DirStore::open(dir)?;
        let store = Self::with_backend(Backend::Dir(Arc::new(d)), None, Duration::from_secs(60));
        warnings.extend(store.load_dir()?);
        Ok((store, warnings))
    }

    /// Opens the store `options` name and loads its records. A Redis store that does not
    /// answer yet is opened anyway (a warning): records are read again before each spend.
    pub async fn connect(options: &StoreOptions) -> Result<(Self, Vec<String>), StateError> {
        let lease = options.lease;
        match &options.location {
            Location::Memory => Ok((Self::in_memory(), Vec::new())),
            Location::Dir(path) => {
                let (d, mut warnings) = dir::DirStore::open(path)?;
                let store =
                    Self::with_backend(Backend::Dir(Arc::new(d)), options.keys.clone(), lease);
                warnings.extend(store.load_dir()?);
                Ok((store, warnings))
            }
            Location::Redis(url) => {
                let r = Arc::new(redis::RedisStore::connect(
                    url,
                    &options.prefix,
                    options.timeout,
                )?);
                let store =
                    Self::with_backend(Backend::Redis(r.clone()), options.keys.clone(), lease);
                let mut warnings = Vec::new();
                match r.load_all().await {
                    Ok(all) => {
                        for (account, bytes) in all {
                            if let Some(w) = store.load_one(Some(&account), &bytes) {
                                warnings.push(w);
                            }
                        }
                    }
                    Err(e) => warnings.push(format!(
                        "{e}; starting anyway: each refresh that may rotate reads its record (and waits for the store)"
                    )),
                }
                let _ = r.heartbeat().await;
                tokio::spawn(heartbeat(Arc::downgrade(&r)));
                Ok((store, warnings))
            }
        }
    }

    fn load_dir(&self) -> Result<Vec<String>, StateError> {
        let Backend::Dir(d) = &self.backend else {
            return Ok(Vec::new());
        };
        let mut warnings = Vec::new();
        for (path, read) in d.load_all()? {
            let bytes = match read {
                Ok(b) => b,
                Err(why) => {
                    warnings.push(format!("{}: {why}; ignored", path.display()));
                    continue;
                }
            };
            match record::decode(&bytes, self.keys.as_deref(), None) {
                Ok((account, _)) if !dir::DirStore::named_for(&path, &account) => {
                    // Copied from another account's file: whose name it has is not known
                    // here; that account's spend reads it and refuses it.
                    warnings.push(format!(
                        "{}: holds the record of account {account} under another account's name (copied?); ignored",
                        path.display()
                    ));
                }
                _ => {
                    if let Some(w) = self.load_one(None, &bytes) {
                        warnings.push(format!("{}: {w}", path.display()));
                    }
                }
            }
        }
        Ok(warnings)
    }

    /// Loads one record into memory; a warning when it is not used.
    fn load_one(&self, expected: Option<&str>, bytes: &[u8]) -> Option<String> {
        match record::decode(bytes, self.keys.as_deref(), expected) {
            Ok((account, stored)) => {
                let account: Arc<str> = Arc::from(account.as_str());
                lock(&self.generations).insert(account.clone(), stored.generation);
                lock(&self.records).insert(
                    account,
                    Record {
                        origin: stored.origin,
                        token: stored.token,
                        version: 0,
                        written: 0,
                    },
                );
                None
            }
            Err((Some(account), e)) => {
                let why = e.to_string();
                let w = format!("account {account}: stored record refused: {why}");
                lock(&self.refused).insert(
                    Arc::from(account.as_str()),
                    Refusal {
                        why,
                        since: SystemTime::now(),
                    },
                );
                Some(w)
            }
            Err((None, e)) => Some(format!("{e}; ignored")),
        }
    }

    /// Keeps `gauge` at the number of accounts whose newest refresh token is only in memory.
    pub fn report_unpersisted(&self, gauge: metrics::Gauge) {
        gauge.set(self.unpersisted_lock().accounts.len() as f64);
        let _ = self.gauge.set(gauge);
    }

    /// How many accounts' newest refresh token exists only in memory.
    pub fn unpersisted_count(&self) -> usize {
        self.unpersisted_lock().accounts.len()
    }

    /// Whether `account`'s newest refresh token exists only in memory, or its stored record
    /// is refused, and why (one lookup: the admin API asks per account).
    pub fn persist_status(&self, account: &str) -> Option<PersistStatus> {
        if let Some(r) = lock(&self.refused).get(account) {
            return Some(PersistStatus {
                state: "refused",
                error: r.why.clone(),
                since: r.since,
                attempts: 0,
                retry_in: None,
            });
        }
        let u = self.unpersisted_lock();
        let p = u.accounts.get(account)?;
        Some(PersistStatus {
            state: "memory_only",
            error: p.error.to_string(),
            since: p.since,
            attempts: p.attempts,
            retry_in: u
                .next_round
                .map(|at| at.saturating_duration_since(tokio::time::Instant::now())),
        })
    }

    /// Why `account`'s stored record is refused, if it is.
    pub fn refused(&self, account: &str) -> Option<String> {
        lock(&self.refused).get(account).map(|r| r.why.clone())
    }

    /// The accounts whose newest refresh token exists only in memory, and why.
    pub fn unpersisted(&self) -> HashMap<Arc<str>, PersistStatus> {
        let u = self.unpersisted_lock();
        let retry_in = u
            .next_round
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        u.accounts
            .iter()
            .map(|(account, p)| {
                (
                    account.clone(),
                    PersistStatus {
                        state: "memory_only",
                        error: p.error.to_string(),
                        since: p.since,
                        attempts: p.attempts,
                        retry_in,
                    },
                )
            })
            .collect()
    }

    fn unpersisted_lock(&self) -> std::sync::MutexGuard<'_, Unpersisted> {
        lock(&self.unpersisted)
    }

    fn set_gauge(&self, u: &Unpersisted) {
        if let Some(g) = self.gauge.get() {
            g.set(u.accounts.len() as f64);
        }
    }

    /// Whether rotations survive a restart.
    pub fn is_durable(&self) -> bool {
        !matches!(self.backend, Backend::Memory)
    }

    /// Whether this is the Redis store (which also keeps access tokens).
    pub fn is_redis(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// The store's health.
    pub fn health(&self) -> StoreHealth {
        let encrypted = self.keys.is_some();
        match &self.backend {
            Backend::Memory => StoreHealth {
                backend: "memory",
                location: String::new(),
                reachable: true,
                unreachable_since: None,
                error: None,
                encrypted,
            },
            Backend::Dir(d) => StoreHealth {
                backend: "directory",
                location: d.root.display().to_string(),
                reachable: true,
                unreachable_since: None,
                error: None,
                encrypted,
            },
            Backend::Redis(r) => {
                let h = r.health();
                StoreHealth {
                    backend: "redis",
                    location: r.host.clone(),
                    reachable: h.down_since.is_none(),
                    unreachable_since: h.down_since,
                    error: h.error,
                    encrypted,
                }
            }
        }
    }

    /// How many accounts have a rotated token (persisted or in memory).
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Whether no account has a stored token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the store holds a record for `account` (in memory).
    pub fn has_token(&self, account: &str) -> bool {
        lock(&self.records).contains_key(account)
    }

    /// The refresh token to spend for `account`, given the config's token (if any).
    /// Returns the token and the digest of the config token it descends from (pass it to
    /// `rotate`; `[0; 32]` without a config token). `None` when there is neither a usable
    /// record nor a config token, or the stored record is refused.
    pub fn current(
        &self,
        account: &Arc<str>,
        config_token: Option<&Secret>,
    ) -> Option<(Secret, [u8; 32])> {
        if lock(&self.refused).contains_key(account) {
            return None;
        }
        let origin = config_token.map_or([0u8; 32], Secret::digest);
        let mut records = lock(&self.records);
        match (records.get(account), config_token) {
            (Some(r), _) if r.origin == origin => Some((r.token.clone(), origin)),
            (Some(_), None) => None,
            (Some(_), Some(config_token)) => {
                // The operator put a new token in the config: it wins over the rotated
                // descendant of the old one (and that one need not be written any more).
                records.remove(account);
                drop(records);
                let mut u = self.unpersisted_lock();
                if u.accounts.remove(account).is_some() {
                    self.set_gauge(&u);
                }
                Some((config_token.clone(), origin))
            }
            // No rotation yet: the config's token, with no record (a record per account
            // would cost memory on maps where nothing rotates).
            (None, t) => t.map(|t| (t.clone(), origin)),
        }
    }

    /// Re-reads `account`'s record from the store into memory; true if it changed. A
    /// record that does not open is refused (the error says why); a rotation of ours not
    /// written yet stays (it is newer than anything stored).
    pub async fn reload_record(&self, account: &Arc<str>) -> Result<bool, StateError> {
        let Some(bytes) = self.read_raw(account).await? else {
            return Ok(false);
        };
        match record::decode(&bytes, self.keys.as_deref(), Some(account)) {
            Err((_, e)) => {
                let why = e.to_string();
                let mut refused = lock(&self.refused);
                if !refused.contains_key(account) {
                    tracing::error!(account = %account, reason = %why,
                        "stored refresh-token record refused: tampered with, copied from another account, or sealed under a key that is not in --state-key-file; the account is not served from it");
                    refused.insert(
                        account.clone(),
                        Refusal {
                            why: why.clone(),
                            since: SystemTime::now(),
                        },
                    );
                }
                Err(StateError::Refused {
                    account: account.to_string(),
                    why,
                })
            }
            Ok((_, stored)) => {
                lock(&self.refused).remove(account);
                {
                    let mut generations = lock(&self.generations);
                    let known = generations.get(account).copied();
                    if let Some(known) = known.filter(|k| stored.generation < *k) {
                        // Rolled back (see `write_in_order`): the newer token in memory
                        // is the one to spend, and its rotation is written back.
                        tracing::error!(account = %account, stored_generation = stored.generation, known_generation = known,
                            "the state store holds an older record of this account than this process read or wrote (restored from an older snapshot, or a lagging replica): it is not used");
                        return Ok(false);
                    }
                    generations.insert(account.clone(), stored.generation);
                }
                if self.unpersisted_lock().accounts.contains_key(account) {
                    return Ok(false);
                }
                let mut records = lock(&self.records);
                let changed = records
                    .get(account)
                    .is_none_or(|r| r.token != stored.token || r.origin != stored.origin);
                if changed {
                    let version = self.next_version.fetch_add(1, Ordering::Relaxed) + 1;
                    records.insert(
                        account.clone(),
                        Record {
                            origin: stored.origin,
                            token: stored.token,
                            version,
                            written: version,
                        },
                    );
                }
                Ok(changed)
            }
        }
    }

    /// One account's stored record bytes (`None`: no record, or no store).
    async fn read_raw(&self, account: &Arc<str>) -> Result<Option<Vec<u8>>, StateError> {
        match &self.backend {
            Backend::Memory => Ok(None),
            Backend::Dir(d) => {
                let (d, a) = (d.clone(), account.clone());
                off_thread("(state reader)", move || d.read(&a)).await?
            }
            Backend::Redis(r) => r.read(account).await,
        }
    }

    /// Takes `account`'s spend lease (waiting up to the lease's length for another
    /// process to finish), so that no other process spends its refresh token until the
    /// guard is dropped and the rotation written. Re-read the record after this.
    pub async fn lock_account(
        self: &Arc<Self>,
        account: &Arc<str>,
    ) -> Result<LeaseGuard, StateError> {
        if !self.is_durable() {
            // In memory: nothing shared, nothing to hold (the caller's own lock serializes).
            return Ok(LeaseGuard {
                store: self.clone(),
                account: account.clone(),
            });
        }
        {
            let mut held = lock(&self.held);
            match held.get_mut(account) {
                // Kept from an earlier rotation not written yet: still ours.
                Some(h) if !h.lease.is_lost() => {
                    h.guarded = true;
                    return Ok(LeaseGuard {
                        store: self.clone(),
                        account: account.clone(),
                    });
                }
                // Lapsed: taken again below (the rotation's write compares generations).
                Some(_) => {
                    held.remove(account);
                }
                None => {}
            }
        }
        let lease = self.acquire(account, self.lease).await?;
        lock(&self.held).insert(
            account.clone(),
            Held {
                lease,
                guarded: true,
            },
        );
        Ok(LeaseGuard {
            store: self.clone(),
            account: account.clone(),
        })
    }

    /// Waits up to `wait` for the store's lease of `account`, polling with back-off.
    async fn acquire(&self, account: &Arc<str>, wait: Duration) -> Result<Lease, StateError> {
        let started = tokio::time::Instant::now();
        let mut pause = dir::POLL_FIRST;
        loop {
            let got = match &self.backend {
                Backend::Memory => return Ok(Lease::None),
                Backend::Dir(d) => {
                    let (d, a) = (d.clone(), account.clone());
                    off_thread("(state lock)", move || d.try_lock(&a))
                        .await?
                        .map(|l| l.map(Lease::File))
                }
                Backend::Redis(r) => r.try_lock(account, self.lease).await.map(|owner| {
                    owner.map(|o| {
                        Lease::Redis(redis::RedisLease::new(
                            r.clone(),
                            account.clone(),
                            o,
                            self.lease,
                        ))
                    })
                }),
            };
            match got {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                // A directory that cannot be locked will not get better by waiting.
                Err(e @ StateError::Io { .. }) => return Err(e),
                Err(_) => {}
            }
            if started.elapsed() >= wait {
                return Err(StateError::LockTimeout {
                    account: account.to_string(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(pause.min(wait.saturating_sub(started.elapsed()))).await;
            pause = pause.saturating_mul(2).min(dir::POLL_MAX);
        }
    }

    fn holds(&self, account: &str) -> bool {
        lock(&self.held)
            .get(account)
            .is_some_and(|h| !h.lease.is_lost())
    }

    /// A guard went away: the lease goes too, unless the account's rotation is not
    /// written yet (then it is kept until it is).
    fn unguard(&self, account: &Arc<str>) {
        let pending = self.unpersisted_lock().accounts.contains_key(account);
        let mut held = lock(&self.held);
        if pending {
            if let Some(h) = held.get_mut(account) {
                h.guarded = false;
            }
        } else {
            held.remove(account);
        }
    }

    /// The rotation is written: a lease kept for it goes unless a guard holds it.
    fn drop_kept_lease(&self, account: &Arc<str>) {
        let mut held = lock(&self.held);
        if held.get(account).is_some_and(|h| !h.guarded) {
            held.remove(account);
        }
    }

    /// Records a rotated (or newly consented) refresh token: in memory (it is the one
    /// spent next, because the old token may already be dead at the provider), then in
    /// the store when there is one. A failed write is returned for the log, and retried in
    /// the background until it succeeds; meanwhile the account is listed by
    /// [`TokenStore::unpersisted`]. A write that finds another process's newer record
    /// ([`StateError::Conflict`]) is dropped and the stored record used.
    pub async fn rotate(
        self: &Arc<Self>,
        account: &Arc<str>,
        origin: [u8; 32],
        token: Secret,
    ) -> Result<(), StateError> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut records = lock(&self.records);
            let written = records.get(account).map_or(0, |r| r.written);
            records.insert(
                account.clone(),
                Record {
                    origin,
                    token: token.clone(),
                    version,
                    written,
                },
            );
        }
        lock(&self.refused).remove(account);
        if !self.is_durable() {
            static NO_DIR: OnceLock<Arc<str>> = OnceLock::new();
            let why = NO_DIR.get_or_init(|| {
                Arc::from("no --state-dir or --state: kept in memory only, lost on restart")
            });
            self.mark_unpersisted(account, version, why.clone(), false);
            return Ok(());
        }
        let job = WriteJob {
            account: account.clone(),
            origin,
            token,
            version,
        };
        let mut results = self.write_all(vec![job], false).await;
        let result = results.pop().map_or(Err(StateError::Closed), |(_, _, r)| r);
        match &result {
            Ok(()) => self.mark_persisted(account, version),
            Err(StateError::Conflict { .. }) => self.take_stored(account).await,
            Err(e) => self.mark_unpersisted(account, version, e.to_string().into(), true),
        }
        result
    }

    /// After a conflict: forget our write, use the stored record.
    async fn take_stored(&self, account: &Arc<str>) {
        {
            let mut u = self.unpersisted_lock();
            if u.accounts.remove(account).is_some() {
                self.set_gauge(&u);
            }
        }
        lock(&self.records).remove(account);
        let _ = self.reload_record(account).await;
        self.drop_kept_lease(account);
    }

    /// Writes `jobs`, each in its account's order; with `release`, then gives up the
    /// store (no write follows). Results come back in job order.
    async fn write_all(
        self: &Arc<Self>,
        jobs: Vec<WriteJob>,
        release: bool,
    ) -> Vec<(Arc<str>, u64, Result<(), StateError>)> {
        let mut out = Vec::with_capacity(jobs.len());
        if release {
            let mut open = self.open.write().await;
            for job in jobs {
                let r = if *open {
                    self.write_in_order(&job).await
                } else {
                    Err(StateError::Closed)
                };
                out.push((job.account, job.version, r));
            }
            *open = false;
            let held: Vec<Held> = lock(&self.held).drain().map(|(_, h)| h).collect();
            for h in held {
                if let Lease::Redis(l) = h.lease {
                    l.release_now().await;
                }
            }
            match &self.backend {
                Backend::Memory => {}
                Backend::Dir(d) => d.release(),
                Backend::Redis(r) => r.release_holder().await,
            }
        } else {
            let open = self.open.read().await;
            for job in jobs {
                let r = if *open {
                    self.write_in_order(&job).await
                } else {
                    Err(StateError::Closed)
                };
                out.push((job.account, job.version, r));
            }
        }
        out
    }

    /// Writes one job unless a newer version of its account is already written, with a
    /// compare-and-set on the account's generation, under the account's lease (this
    /// process's, or one taken for the write).
    async fn write_in_order(&self, job: &WriteJob) -> Result<(), StateError> {
        let _turn = self.stripes[stripe(&job.account)].lock().await;
        let newer_written = lock(&self.records)
            .get(&job.account)
            .is_some_and(|r| r.written >= job.version);
        if newer_written {
            return Ok(());
        }
        let had_lease = lock(&self.held).contains_key(&job.account);
        let own = if self.holds(&job.account) {
            None
        } else {
            Some(self.acquire(&job.account, self.lease).await?)
        };
        // Under a lease taken for this write (a consent stored from outside a refresh),
        // this write replaces whatever is stored: follow the stored generation. Under the
        // spender's lease, follow the one it read: a mismatch means another process wrote
        // (also when that lease lapsed and was taken again for this write).
        if own.is_some() && !had_lease {
            if let Some((g, sealed)) = self
                .read_raw(&job.account)
                .await?
                .and_then(|b| record::generation_of(&b))
            {
                // Without the key, a sealed record would be replaced by a plain one that
                // a sidecar with the key then refuses: the account's token lost for both.
                if sealed && self.keys.is_none() {
                    return Err(StateError::SealedWithoutKey {
                        account: job.account.to_string(),
                    });
                }
                lock(&self.generations).insert(job.account.clone(), g);
            }
        }
        let expected = lock(&self.generations)
            .get(&job.account)
            .copied()
            .unwrap_or(0);
        let stored = Stored {
            origin: job.origin,
            token: job.token.clone(),
            generation: expected.saturating_add(1),
        };
        let bytes = record::encode(&job.account, &stored, self.keys.as_deref()).map_err(|e| {
            StateError::Io {
                path: PathBuf::from("(state record)"),
                source: std::io::Error::other(e),
            }
        })?;
        let outcome = match &self.backend {
            Backend::Memory => Ok(Ok(())),
            Backend::Dir(d) => {
                let (d, a, b) = (d.clone(), job.account.clone(), bytes.clone());
                off_thread("(state writer)", move || d.write_if(&a, &b, expected)).await?
            }
            Backend::Redis(r) => r.write_if(&job.account, &bytes, expected).await,
        }?;
        let outcome = match outcome {
            // Older than what this process read or wrote: the store lost the record or
            // went back in time (restarted empty or from an older snapshot, a lagging
            // replica, a restored backup). Nobody else can have written it under the
            // lease: the newer token is ours, and it is written back.
            Err(found) if found < expected => {
                tracing::error!(account = %job.account, stored_generation = found, expected_generation = expected,
                    "the state store holds an older record of this account than this process read or wrote (lost or restored from an older snapshot?): writing the newest refresh token back");
                match &self.backend {
                    Backend::Memory => Ok(Ok(())),
                    Backend::Dir(d) => {
                        let (d, a) = (d.clone(), job.account.clone());
                        off_thread("(state writer)", move || d.write_if(&a, &bytes, found)).await?
                    }
                    Backend::Redis(r) => r.write_if(&job.account, &bytes, found).await,
                }?
            }
            other => other,
        };
        if let Err(found) = outcome {
            return Err(StateError::Conflict {
                account: job.account.to_string(),
                expected,
                found,
            });
        }
        lock(&self.generations).insert(job.account.clone(), stored.generation);
        if let Some(r) = lock(&self.records).get_mut(&job.account) {
            r.written = r.written.max(job.version);
        }
        Ok(())
    }

    fn mark_persisted(&self, account: &Arc<str>, version: u64) {
        {
            let mut u = self.unpersisted_lock();
            if let Some(p) = u.accounts.get(account).filter(|p| p.version <= version) {
                tracing::info!(account = %account, failed_attempts = p.attempts,
                    "rotated refresh token written to the state store after earlier failures");
                u.accounts.remove(account);
                self.set_gauge(&u);
            }
        }
        self.drop_kept_lease(account);
    }

    fn mark_unpersisted(
        self: &Arc<Self>,
        account: &Arc<str>,
        version: u64,
        error: Arc<str>,
        retry: bool,
    ) {
        let mut u = self.unpersisted_lock();
        let attempts = u32::from(retry);
        match u.accounts.get_mut(account) {
            Some(p) if p.version > version => return,
            Some(p) => {
                p.version = version;
                p.error = error;
                p.attempts = p.attempts.saturating_add(attempts);
            }
            None => {
                u.accounts.insert(
                    account.clone(),
                    Pending {
                        version,
                        error,
                        since: SystemTime::now(),
                        attempts,
                    },
                );
            }
        }
        self.set_gauge(&u);
        if retry && !u.retrying {
            u.retrying = true;
            tokio::spawn(self.clone().retry_unpersisted());
        }
    }

    /// The unpersisted accounts' current tokens, as write jobs (forgetting accounts whose
    /// record went away: the config's token won).
    fn pending_jobs(&self) -> Vec<WriteJob> {
        let accounts: Vec<Arc<str>> = self.unpersisted_lock().accounts.keys().cloned().collect();
        let records = lock(&self.records);
        let mut jobs = Vec::with_capacity(accounts.len());
        let mut gone = Vec::new();
        for account in accounts {
            match records.get(&account) {
                Some(r) => jobs.push(WriteJob {
                    account,
                    origin: r.origin,
                    token: r.token.clone(),
                    version: r.version,
                }),
                None => gone.push(account),
            }
        }
        drop(records);
        if !gone.is_empty() {
            let mut u = self.unpersisted_lock();
            for account in &gone {
                u.accounts.remove(account);
            }
            self.set_gauge(&u);
            drop(u);
            for account in &gone {
                self.drop_kept_lease(account);
            }
        }
        jobs
    }

    /// Handles the results of retried writes; returns how many failed and the first error.
    async fn settle(
        &self,
        results: Vec<(Arc<str>, u64, Result<(), StateError>)>,
    ) -> (usize, Option<Arc<str>>, Vec<(Arc<str>, u64, Arc<str>)>) {
        let mut failed = 0usize;
        let mut first_error = None;
        let mut still = Vec::new();
        for (account, version, result) in results {
            match result {
                Ok(()) => self.mark_persisted(&account, version),
                // Closed at shutdown: the final attempt is the shutdown's.
                Err(StateError::Closed) => {}
                Err(e @ StateError::Conflict { .. }) => {
                    tracing::error!(account = %account, error = %e, "rotated refresh token not written");
                    self.take_stored(&account).await;
                }
                Err(e) => {
                    failed += 1;
                    let e: Arc<str> = e.to_string().into();
                    first_error.get_or_insert_with(|| e.clone());
                    still.push((account, version, e));
                }
            }
        }
        (failed, first_error, still)
    }

    /// Retries the failed writes in rounds, with back-off, until none is left or the
    /// store is closed.
    async fn retry_unpersisted(self: Arc<Self>) {
        // Redis comes back by itself (a restart, a failover): try it more often.
        let max = if self.is_redis() {
            Duration::from_secs(5)
        } else {
            RETRY_MAX
        };
        let mut delay = RETRY_FIRST;
        loop {
            self.unpersisted_lock().next_round = tokio::time::Instant::now().checked_add(delay);
            tokio::time::sleep(delay).await;
            let jobs = self.pending_jobs();
            let results = self.write_all(jobs, false).await;
            let (failed, first_error, still) = self.settle(results).await;
            for (account, version, e) in still {
                self.mark_unpersisted(&account, version, e, true);
            }
            let closed = !*self.open.read().await;
            {
                let mut u = self.unpersisted_lock();
                if u.accounts.is_empty() || closed {
                    u.retrying = false;
                    u.next_round = None;
                    return;
                }
            }
            delay = delay.saturating_mul(2).min(max);
            tracing::warn!(
                accounts = failed,
                error = first_error.as_deref().unwrap_or(""),
                retry_in_ms = delay.as_millis() as u64,
                "rotated refresh tokens still not written to the state store; they are kept in memory and used"
            );
        }
    }

    /// At shutdown: tries every unpersisted account's write once more, then releases the
    /// store (nothing is written after this). Returns the accounts whose newest refresh
    /// token is still only in memory, and why; the caller logs them.
    pub async fn close(self: &Arc<Self>) -> Vec<(Arc<str>, String)> {
        if !self.is_durable() {
            return self
                .unpersisted_lock()
                .accounts
                .iter()
                .map(|(a, p)| (a.clone(), p.error.to_string()))
                .collect();
        }
        let jobs = self.pending_jobs();
        let results = self.write_all(jobs, true).await;
        let (_, _, still) = self.settle(results).await;
        {
            let mut u = self.unpersisted_lock();
            for (account, _, e) in still {
                if let Some(p) = u.accounts.get_mut(&account) {
                    p.error = e;
                    p.attempts = p.attempts.saturating_add(1);
                }
            }
        }
        let u = self.unpersisted_lock();
        u.accounts
            .iter()
            .map(|(a, p)| (a.clone(), p.error.to_string()))
            .collect()
    }

    /// Keeps an access token for warm restarts (Redis only; a no-op otherwise). `name`
    /// identifies the credential set (a digest of it, never a secret).
    pub async fn save_access(
        &self,
        name: &str,
        token: &Secret,
        expires_at: SystemTime,
    ) -> Result<(), StateError> {
        let Backend::Redis(r) = &self.backend else {
            return Ok(());
        };
        let Ok(left) = expires_at.duration_since(SystemTime::now()) else {
            return Ok(());
        };
        let at_ms = expires_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let Some(bytes) = record::encode_access(name, token, at_ms, self.keys.as_deref()) else {
            return Ok(());
        };
        r.put_access(name, &bytes, left).await
    }

    /// A kept access token of the credential set `name` and its expiry, if there is one
    /// that opens.
    pub async fn load_access(&self, name: &str) -> Option<(Secret, SystemTime)> {
        let Backend::Redis(r) = &self.backend else {
            return None;
        };
        let bytes = r.get_access(name).await.ok()??;
        let (token, at_ms) = record::decode_access(name, &bytes, self.keys.as_deref())?;
        let at = UNIX_EPOCH.checked_add(Duration::from_millis(at_ms))?;
        Some((token, at))
    }
}

/// Renews a Redis holder heartbeat until the store is dropped or released.
async fn heartbeat(store: std::sync::Weak<redis::RedisStore>) {
    loop {
        tokio::time::sleep(redis::HOLDER_TTL / 5).await;
        let Some(s) = store.upgrade() else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let _ = s.heartbeat().await;
    }
}

/// A held spend lease of one account ([`TokenStore::lock_account`]).
pub struct LeaseGuard {
    store: Arc<TokenStore>,
    account: Arc<str>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.store.unguard(&self.account);
    }
}

/// What `state migrate` did.
#[derive(Debug, Default)]
pub struct Migrated {
    /// Records copied.
    pub copied: usize,
    /// Records skipped, and why.
    pub skipped: Vec<String>,
    /// Accounts whose record was plain in a source read with keys: copied (the operator
    /// asked for this store to be copied), and listed, for a review of records that
    /// anyone with write access to the store could have put there.
    pub plain: Vec<String>,
}

/// `state migrate`: copies every record of `from` into `to`, refusing while a process
/// holds either.
pub async fn migrate(from: &StoreOptions, to: &StoreOptions) -> Result<Migrated, StateError> {
    if from.location == to.location && from.prefix == to.prefix {
        return Err(StateError::InUse {
            store: to.location.describe(),
            by: "the migration itself (--from and --to are the same store)".into(),
        });
    }
    let mut guards = Vec::new();
    let mut read = Vec::new();
    let mut warnings = Vec::new();
    // Source: every record as stored.
    match &from.location {
        Location::Memory => {}
        Location::Dir(path) => {
            guards.push(dir::DirStore::take_exclusive(path)?);
            let (d, _) = dir::DirStore::open_unlocked(path)?;
            for (p, bytes) in d.load_all()? {
                match bytes {
                    Ok(b) => read.push(b),
                    Err(why) => warnings.push(format!("{}: {why}; skipped", p.display())),
                }
            }
        }
        Location::Redis(url) => {
            let r = redis::RedisStore::connect(url, &from.prefix, from.timeout)?;
            if r.holders().await? > 0 {
                return Err(StateError::InUse {
                    store: from.location.describe(),
                    by: "a running sidecar (a live holder heartbeat)".into(),
                });
            }
            read.extend(r.load_all().await?.into_iter().map(|(_, b)| b));
        }
    }
    // Decode with the source's keys, re-encode with the target's.
    let mut records = Vec::new();
    let mut plain = Vec::new();
    for bytes in read {
        // A store sealed gradually (a key added to one written plain) holds both kinds;
        // migrating is how it becomes sealed throughout.
        let decoded = match record::decode(&bytes, from.keys.as_deref(), None) {
            Err((Some(account), record::RecordError::Unsealed)) => {
                plain.push(account);
                record::decode(&bytes, None, None)
            }
            other => other,
        };
        match decoded {
            Ok(r) => records.push(r),
            Err((who, e)) => warnings.push(format!(
                "{}: {e}; skipped",
                who.map_or_else(|| "a record".to_owned(), |a| format!("account {a}"))
            )),
        }
    }
    let encode = |account: &str, s: &Stored| {
        record::encode(account, s, to.keys.as_deref()).map_err(|e| StateError::Io {
            path: PathBuf::from("(state record)"),
            source: std::io::Error::other(e),
        })
    };
    match &to.location {
        Location::Memory => {}
        Location::Dir(path) => {
            guards.push(dir::DirStore::take_exclusive(path)?);
            let (d, _) = dir::DirStore::open_unlocked(path)?;
            for (account, s) in &records {
                d.write(account, &encode(account, s)?)?;
            }
        }
        Location::Redis(url) => {
            let r = redis::RedisStore::connect(url, &to.prefix, to.timeout)?;
            if r.holders().await? > 0 {
                return Err(StateError::InUse {
                    store: to.location.describe(),
                    by: "a running sidecar (a live holder heartbeat)".into(),
                });
            }
            for (account, s) in &records {
                r.put(account, &encode(account, s)?, s.generation).await?;
            }
        }
    }
    drop(guards);
    Ok(Migrated {
        copied: records.len(),
        skipped: warnings,
        plain,
    })
}

/// Runs a directory operation on tokio's blocking pool (file I/O and `flock` never run
/// on the serving thread); a task that could not finish is an I/O error named `what`.
async fn off_thread<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Io {
            path: PathBuf::from(what),
            source: std::io::Error::other(format!("{what} failed: {e}")),
        })
}

#[cfg(test)]
mod tests;
