//! Durable store of rotated refresh tokens.
//!
//! Microsoft (and strict-rotation providers) hand out a new refresh token on every
//! refresh; the old one dies sooner or later. Forgetting a rotated token therefore loses
//! the account weeks later, so each rotation is written to disk — temp file, fsync,
//! rename, fsync of the directory, mode 0600 — *before* the new token is used or the
//! access token that came with it is served. One small file per account keeps every
//! write small and independent, and a crash can leave at worst a stray temp file.
//!
//! A persisted token wins over the config's, unless the config's token is not the one the
//! persisted chain started from: then an operator re-consented, and the config wins.
//!
//! A write that fails (disk full, read-only, out of file descriptors) loses nothing yet:
//! the newest token stays in memory and is the one spent next, the account is listed as
//! unpersisted (admin API, gauge), and the write is retried with back-off until it
//! succeeds, and once more at shutdown. Writes of one account land in rotation order.
//!
//! A state directory belongs to one process at a time: an advisory `flock` on its `lock`
//! file, which also names the holder's pid. Two processes spending one refresh token
//! would make a rotating provider revoke the account.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Why the state directory could not be used.
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
    /// Another process holds the state directory's lock.
    #[error("state directory {} is in use by another process ({}, from {}): only one sidecar or `token --state-dir` may use a state directory at a time, or both would spend the same refresh tokens; stop that process, or give this one a --state-dir of its own", dir.display(), holder.as_deref().map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}")), lock_file.display())]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// Its lock file.
        lock_file: PathBuf,
        /// The pid the holder wrote into the lock file, if readable.
        holder: Option<String>,
    },
    /// The store was closed (shutdown) and its directory released: nothing is written.
    #[error("the state directory was released at shutdown; nothing more is written")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileRecord {
    version: u32,
    account: String,
    /// Hex SHA-256 of the config refresh token this chain of rotations started from.
    config_token_sha256: String,
    refresh_token: String,
    updated_at_unix: u64,
}

#[derive(Clone)]
struct Record {
    origin: [u8; 32],
    token: Secret,
    /// Store-wide rotation number: a write of an older one never replaces a newer one.
    version: u64,
    /// The newest version on disk (0: none written by this process).
    written: u64,
}

/// Writes of one account are serialized by one of these, picked by the account's hash:
/// a lock per account would cost memory for every account that ever rotated.
const WRITE_STRIPES: usize = 64;

/// First retry of a failed write, doubled after each failed round up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between two rounds of retried writes.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The lock file's content is a pid: anything longer is not ours.
const LOCK_FILE_MAX: u64 = 64;

/// Why an account's newest refresh token exists only in memory (admin API).
#[derive(Clone, Debug)]
pub struct PersistStatus {
    /// The OS reason of the last failed write, or why nothing is written.
    pub error: String,
    /// Since when the newest token has been only in memory.
    pub since: SystemTime,
    /// Failed writes so far (0 without a state directory).
    pub attempts: u32,
    /// When the next write is tried, if one is scheduled.
    pub retry_in: Option<Duration>,
}

/// An unpersisted account: its rotation that is not on disk, and why.
struct Pending {
    version: u64,
    /// Shared: with no state directory every rotated account has the same reason.
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

/// The state directory's advisory lock: held while the file is open.
struct DirLock {
    _file: fs::File,
}

/// The newest refresh token of every account whose token has rotated, in memory and (with
/// a directory) on disk; other accounts spend their config's token.
pub struct TokenStore {
    dir: Option<PathBuf>,
    records: Mutex<HashMap<Arc<str>, Record>>,
    /// A write holds its account's stripe, so writes of one account (a rotation and a
    /// retry) never interleave, and one older than the record's `written` is skipped.
    stripes: [Mutex<()>; WRITE_STRIPES],
    next_version: AtomicU64,
    unpersisted: Mutex<Unpersisted>,
    gauge: OnceLock<metrics::Gauge>,
    /// The directory's lock while writes are allowed; `None` once closed (or in memory).
    /// Writers hold it shared, so closing waits for a write under way and none follows.
    holder: RwLock<Option<DirLock>>,
}

impl TokenStore {
    /// A store that keeps rotated tokens in memory only (lost on restart).
    pub fn in_memory() -> Self {
        TokenStore {
            dir: None,
            records: Mutex::new(HashMap::new()),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            next_version: AtomicU64::new(0),
            unpersisted: Mutex::new(Unpersisted::default()),
            gauge: OnceLock::new(),
            holder: RwLock::new(None),
        }
    }

    /// Opens (creating, mode 0700) a state directory and loads every persisted token.
    /// Unreadable records are reported and skipped; stray temp files are removed.
    pub fn open(dir: &Path) -> Result<(Self, Vec<String>), StateError> {
        let tokens = dir.join("refresh-tokens");
        let mut warnings = Vec::new();
        let dir_existed = dir.exists();
        fs::create_dir_all(&tokens).map_err(io_err(&tokens))?;
        // Before anything is read: the holder may be writing.
        let lock = lock_dir(dir)?;
        // The tokens' own directory is ours: always private. The state directory itself may
        // be a volume root owned by root (emptyDir, PVC), where chmod is not permitted; it
        // is made private when we created it, and otherwise only tightened if we can.
        fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700)).map_err(io_err(&tokens))?;
        if !dir_existed {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        } else if fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(false)
        {
            if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                warnings.push(format!(
                    "{}: cannot make it private ({e}); the token files are private in {}",
                    dir.display(),
                    tokens.display()
                ));
            }
        }
        let mut records = HashMap::new();
        for entry in fs::read_dir(&tokens).map_err(io_err(&tokens))? {
            let path = entry.map_err(io_err(&tokens))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                // A write that never reached its rename: the previous file is intact.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match read_record(&path) {
                Ok((account, rec)) => {
                    records.insert(Arc::from(account.as_str()), rec);
                }
                Err(why) => warnings.push(format!("{}: {why}; ignored", path.display())),
            }
        }
        Ok((
            TokenStore {
                dir: Some(tokens),
                records: Mutex::new(records),
                holder: RwLock::new(Some(lock)),
                ..TokenStore::in_memory()
            },
            warnings,
        ))
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

    /// Whether `account`'s newest refresh token exists only in memory, and why (one
    /// lookup: the admin API asks per account).
    pub fn persist_status(&self, account: &str) -> Option<PersistStatus> {
        let u = self.unpersisted_lock();
        let p = u.accounts.get(account)?;
        Some(PersistStatus {
            error: p.error.to_string(),
            since: p.since,
            attempts: p.attempts,
            retry_in: u
                .next_round
                .map(|at| at.saturating_duration_since(tokio::time::Instant::now())),
        })
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
        // Single-step updates only: a poisoned lock still holds a whole map.
        self.unpersisted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_gauge(&self, u: &Unpersisted) {
        if let Some(g) = self.gauge.get() {
            g.set(u.accounts.len() as f64);
        }
    }

    /// Whether rotations survive a restart.
    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    /// How many accounts have a rotated token (persisted or in memory).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no account has a stored token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Record>> {
        // A panic while holding this lock cannot leave a record half-written in memory
        // (inserts are single operations), so a poisoned lock is still consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refresh token to spend for `account`, given the config's token (if it has
    /// one). Returns the token and the digest of the config token it descends from (pass
    /// it to `rotate`; `[0; 32]` without a config token), or `None` when there is neither
    /// a config token nor a stored one: the account waits for consent.
    pub fn current(
        &self,
        account: &Arc<str>,
        config_token: Option<&Secret>,
    ) -> Option<(Secret, [u8; 32])> {
        let Some(config_token) = config_token else {
            // Nothing in the config can supersede a stored token (a consented one, or its
            // rotated descendant).
            return self
                .lock()
                .get(account)
                .map(|r| (r.token.clone(), r.origin));
        };
        let origin = config_token.digest();
        let mut records = self.lock();
        Some(match records.get(account) {
            Some(r) if r.origin == origin => (r.token.clone(), origin),
            Some(_) => {
                // The operator put a new token in the config: it wins over the rotated
                // descendant of the old one (and that one need not be written any more).
                records.remove(account);
                drop(records);
                let mut u = self.unpersisted_lock();
                if u.accounts.remove(account).is_some() {
                    self.set_gauge(&u);
                }
                (config_token.clone(), origin)
            }
            // No rotation yet: the config's token, with no record (a record per account
            // would cost memory on maps where nothing rotates).
            None => (config_token.clone(), origin),
        })
    }

    /// Whether a refresh token is stored for `account` (in memory; no disk access).
    pub fn has_token(&self, account: &str) -> bool {
        self.lock().contains_key(account)
    }

    /// Re-reads `account`'s record from the directory into memory (another process, the
    /// `consent` command, may have written one); true if that changed the token or its
    /// origin. A missing or unreadable file changes nothing. Blocking file I/O: call it
    /// off the serving thread.
    pub fn reload_record(&self, account: &Arc<str>) -> Result<bool, StateError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let path = dir.join(file_name(account));
        let (stored_for, rec) = match read_record(&path) {
            Ok(r) => r,
            Err(RecordError::Read(crate::files::ReadError::Io(e)))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(false)
            }
            Err(RecordError::Read(crate::files::ReadError::Io(source))) => {
                return Err(StateError::Io { path, source })
            }
            Err(why) => {
                return Err(StateError::Io {
                    path,
                    source: std::io::Error::other(why.to_string()),
                })
            }
        };
        if *stored_for != **account {
            return Ok(false);
        }
        let mut records = self.lock();
        if records
            .get(account)
            .is_some_and(|r| r.origin == rec.origin && r.token == rec.token)
        {
            return Ok(false);
        }
        // The file is the newest version: on disk already, and newer than any write of
        // an older rotation still queued (`write_in_order` skips those).
        let version = self.next_version.fetch_add(1, Ordering::Relaxed) + 1;
        records.insert(
            account.clone(),
            Record {
                version,
                written: version,
                ..rec
            },
        );
        Ok(true)
    }

    /// Records a rotated refresh token: in memory (it is the one spent next, because the
    /// old token may already be dead at the provider), then durably when there is a
    /// directory. A failed write is returned for the log, and retried in the background
    /// until it succeeds; meanwhile the account is listed by [`TokenStore::unpersisted`].
    pub async fn rotate(
        self: &Arc<Self>,
        account: &Arc<str>,
        origin: [u8; 32],
        token: Secret,
    ) -> Result<(), StateError> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut records = self.lock();
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
        if self.dir.is_none() {
            static NO_DIR: OnceLock<Arc<str>> = OnceLock::new();
            let why = NO_DIR
                .get_or_init(|| Arc::from("no --state-dir: kept in memory only, lost on restart"));
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
            Err(e) => self.mark_unpersisted(account, version, e.to_string().into(), true),
        }
        result
    }

    /// Writes `jobs` on the blocking pool, each in its account's order; with `release`,
    /// then gives up the directory (no write follows). Results come back in job order.
    async fn write_all(
        self: &Arc<Self>,
        jobs: Vec<WriteJob>,
        release: bool,
    ) -> Vec<(Arc<str>, u64, Result<(), StateError>)> {
        let Some(dir) = self.dir.clone() else {
            return Vec::new();
        };
        let this = self.clone();
        let accounts: Vec<(Arc<str>, u64)> = jobs
            .iter()
            .map(|j| (j.account.clone(), j.version))
            .collect();
        let written = tokio::task::spawn_blocking(move || {
            let write = |held: bool, job: &WriteJob| {
                if !held {
                    return Err(StateError::Closed);
                }
                this.write_in_order(&dir, job)
            };
            if release {
                let mut holder = this.holder.write().unwrap_or_else(|p| p.into_inner());
                let out: Vec<_> = jobs.iter().map(|j| write(holder.is_some(), j)).collect();
                *holder = None;
                out
            } else {
                let holder = this.holder.read().unwrap_or_else(|p| p.into_inner());
                jobs.iter().map(|j| write(holder.is_some(), j)).collect()
            }
        })
        .await;
        match written {
            Ok(results) => accounts
                .into_iter()
                .zip(results)
                .map(|((a, v), r)| (a, v, r))
                .collect(),
            Err(e) => accounts
                .into_iter()
                .map(|(a, v)| {
                    let source = std::io::Error::other(format!("state writer failed: {e}"));
                    (
                        a,
                        v,
                        Err(StateError::Io {
                            path: PathBuf::from("(state writer)"),
                            source,
                        }),
                    )
                })
                .collect(),
        }
    }

    /// Writes one job unless a newer version of its account is already on disk. (An
    /// account whose record is gone was re-consented: a late write of its old chain is
    /// harmless, because at start a record of another origin loses to the config.)
    fn write_in_order(&self, dir: &Path, job: &WriteJob) -> Result<(), StateError> {
        let stripe = ring::digest::digest(&ring::digest::SHA256, job.account.as_bytes())
            .as_ref()
            .first()
            .map_or(0, |b| usize::from(*b) % WRITE_STRIPES);
        let _turn = self.stripes[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let newer_on_disk = self
            .lock()
            .get(&job.account)
            .is_some_and(|r| r.written >= job.version);
        if newer_on_disk {
            return Ok(());
        }
        write_record(dir, &job.account, job.origin, &job.token)?;
        if let Some(r) = self.lock().get_mut(&job.account) {
            r.written = r.written.max(job.version);
        }
        Ok(())
    }

    fn mark_persisted(&self, account: &Arc<str>, version: u64) {
        let mut u = self.unpersisted_lock();
        if let Some(p) = u.accounts.get(account).filter(|p| p.version <= version) {
            tracing::info!(account = %account, failed_attempts = p.attempts,
                "rotated refresh token written to the state directory after earlier failures");
            u.accounts.remove(account);
            self.set_gauge(&u);
        }
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
        let records = self.lock();
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
            for account in gone {
                u.accounts.remove(&account);
            }
            self.set_gauge(&u);
        }
        jobs
    }

    /// Retries the failed writes in rounds, with back-off, until none is left or the
    /// store is closed.
    async fn retry_unpersisted(self: Arc<Self>) {
        let mut delay = RETRY_FIRST;
        loop {
            self.unpersisted_lock().next_round = tokio::time::Instant::now().checked_add(delay);
            tokio::time::sleep(delay).await;
            let jobs = self.pending_jobs();
            let mut failed = 0usize;
            let mut first_error = None;
            for (account, version, result) in self.write_all(jobs, false).await {
                match result {
                    Ok(()) => self.mark_persisted(&account, version),
                    // Closed at shutdown: the final attempt is the shutdown's.
                    Err(StateError::Closed) => {}
                    Err(e) => {
                        failed += 1;
                        let e: Arc<str> = e.to_string().into();
                        first_error.get_or_insert_with(|| e.clone());
                        self.mark_unpersisted(&account, version, e, true);
                    }
                }
            }
            let closed = self
                .holder
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_none();
            {
                let mut u = self.unpersisted_lock();
                if u.accounts.is_empty() || closed {
                    u.retrying = false;
                    u.next_round = None;
                    return;
                }
            }
            delay = delay.saturating_mul(2).min(RETRY_MAX);
            tracing::warn!(
                accounts = failed,
                error = first_error.as_deref().unwrap_or(""),
                retry_in_ms = delay.as_millis() as u64,
                "rotated refresh tokens still not written to the state directory; they are kept in memory and used"
            );
        }
    }

    /// At shutdown: tries every unpersisted account's write once more, then releases the
    /// state directory (nothing is written after this). Returns the accounts whose newest
    /// refresh token is still only in memory, and why; the caller logs them.
    pub async fn close(self: &Arc<Self>) -> Vec<(Arc<str>, String)> {
        if self.dir.is_none() {
            return self
                .unpersisted_lock()
                .accounts
                .iter()
                .map(|(a, p)| (a.clone(), p.error.to_string()))
                .collect();
        }
        let jobs = self.pending_jobs();
        for (account, version, result) in self.write_all(jobs, true).await {
            match result {
                Ok(()) => self.mark_persisted(&account, version),
                Err(e) => {
                    let mut u = self.unpersisted_lock();
                    if let Some(p) = u.accounts.get_mut(&account) {
                        p.error = e.to_string().into();
                        p.attempts = p.attempts.saturating_add(1);
                    }
                }
            }
        }
        let u = self.unpersisted_lock();
        u.accounts
            .iter()
            .map(|(a, p)| (a.clone(), p.error.to_string()))
            .collect()
    }
}

/// Takes the state directory's lock (`flock` on `<dir>/lock`, which then holds our pid),
/// or names the process holding it.
fn lock_dir(dir: &Path) -> Result<DirLock, StateError> {
    let path = dir.join("lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Never a symlink's target; never block on a FIFO put there.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(io_err(&path))?;
    let meta = file.metadata().map_err(io_err(&path))?;
    if !meta.is_file() {
        return Err(StateError::Io {
            path,
            source: std::io::Error::other("not a regular file; remove it"),
        });
    }
    if let Err(e) = try_flock(&file) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(StateError::Io { path, source: e });
        }
        let mut text = String::new();
        let holder = (&file)
            .take(LOCK_FILE_MAX)
            .read_to_string(&mut text)
            .ok()
            .map(|_| text.trim().to_owned())
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        return Err(StateError::Locked {
            dir: dir.to_owned(),
            lock_file: path,
            holder,
        });
    }
    file.set_len(0).map_err(io_err(&path))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io_err(&path))?;
    Ok(DirLock { _file: file })
}

/// `flock(LOCK_EX | LOCK_NB)`: an exclusive lock of the open file, released when it is
/// closed (also when the process dies).
#[allow(unsafe_code)]
fn try_flock(file: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a file descriptor and flags, no pointers; the descriptor is
    // open for as long as `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The file name for an account: a digest, because account ids can hold any character.
fn file_name(account: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, account.as_bytes());
    format!("{}.json", hex(d.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a file in the state directory is not a usable record (it is then skipped).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Read(#[from] crate::files::ReadError),
    #[error("not a refresh-token record")]
    NotARecord,
    #[error("unknown record version {0}")]
    Version(u32),
    #[error("bad configTokenSha256")]
    Origin,
    #[error("empty refreshToken")]
    EmptyToken,
}

fn read_record(path: &Path) -> Result<(String, Record), RecordError> {
    // A record is a few KB; a FIFO or a device planted here must not block start-up.
    let text = crate::files::read_limited(
        path,
        crate::files::MAX_STATE_RECORD_BYTES,
        "a refresh-token record",
    )?;
    let rec: FileRecord = serde_json::from_slice(&text).map_err(|_| RecordError::NotARecord)?;
    if rec.version != 1 {
        return Err(RecordError::Version(rec.version));
    }
    let mut origin = [0u8; 32];
    if rec.config_token_sha256.len() != 64 {
        return Err(RecordError::Origin);
    }
    for (i, chunk) in rec.config_token_sha256.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| RecordError::Origin)?;
        origin[i] = u8::from_str_radix(s, 16).map_err(|_| RecordError::Origin)?;
    }
    if rec.refresh_token.is_empty() {
        return Err(RecordError::EmptyToken);
    }
    Ok((
        rec.account,
        Record {
            origin,
            token: Secret::new(rec.refresh_token),
            version: 0,
            written: 0,
        },
    ))
}

/// Atomically replaces one account's record: temp file (0600), fsync, rename, fsync dir.
fn write_record(
    dir: &Path,
    account: &str,
    origin: [u8; 32],
    token: &Secret,
) -> Result<(), StateError> {
    let name = file_name(account);
    let final_path = dir.join(&name);
    let tmp_path = dir.join(format!("{name}.tmp"));
    let record = FileRecord {
        version: 1,
        account: account.to_owned(),
        config_token_sha256: hex(&origin),
        refresh_token: token.expose().to_owned(),
        updated_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| StateError::Io {
        path: tmp_path.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(io_err(&tmp_path))?;
    f.write_all(&bytes).map_err(io_err(&tmp_path))?;
    f.sync_all().map_err(io_err(&tmp_path))?;
    drop(f);
    fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotation_survives_reopen_and_config_wins_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let acct: Arc<str> = Arc::from("a");
        let cfg = Secret::new("config-rt");
        {
            let (store, warnings) = TokenStore::open(dir.path()).unwrap();
            let store = Arc::new(store);
            assert!(warnings.is_empty());
            let (t, origin) = store.current(&acct, Some(&cfg)).unwrap();
            assert_eq!(t.expose(), "config-rt");
            store
                .rotate(&acct, origin, Secret::new("rt-2"))
                .await
                .unwrap();
            assert_eq!(store.current(&acct, Some(&cfg)).unwrap().0.expose(), "rt-2");
        }
        let (store, _) = TokenStore::open(dir.path()).unwrap();
        assert_eq!(store.current(&acct, Some(&cfg)).unwrap().0.expose(), "rt-2");
        // Operator re-consented: the config's new token wins over the persisted one.
        let (t, _) = store
            .current(&acct, Some(&Secret::new("reconsented")))
            .unwrap();
        assert_eq!(t.expose(), "reconsented");

        let meta = fs::metadata(dir.path().join("refresh-tokens").join(file_name("a"))).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn without_a_config_token_the_stored_one_is_spent_and_a_record_from_elsewhere_is_reloaded(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let acct: Arc<str> = Arc::from("a");
        let (store, _) = TokenStore::open(dir.path()).unwrap();
        let store = Arc::new(store);
        assert!(store.current(&acct, None).is_none(), "waits for consent");
        assert!(!store.has_token("a"));
        assert!(
            !store.reload_record(&acct).unwrap(),
            "no file: nothing changes"
        );
        // Another process (the `consent` command) writes a record.
        let tokens = dir.path().join("refresh-tokens");
        write_record(&tokens, "a", [0; 32], &Secret::new("consented")).unwrap();
        assert!(store.reload_record(&acct).unwrap());
        assert!(!store.reload_record(&acct).unwrap(), "read once");
        assert!(store.has_token("a"));
        let (t, origin) = store.current(&acct, None).unwrap();
        assert_eq!((t.expose(), origin), ("consented", [0; 32]));
        // Its rotation descends from it, and a queued write of it is not redone.
        store
            .rotate(&acct, origin, Secret::new("rt-2"))
            .await
            .unwrap();
        assert_eq!(store.current(&acct, None).unwrap().0.expose(), "rt-2");
        // A config token of another origin wins over it.
        let cfg = Secret::new("from-config");
        assert_eq!(
            store.current(&acct, Some(&cfg)).unwrap().0.expose(),
            "from-config"
        );
        // A record naming another account (a file copied by hand) is not taken.
        fs::copy(tokens.join(file_name("a")), tokens.join(file_name("b"))).unwrap();
        assert!(!store.reload_record(&Arc::from("b")).unwrap());
    }

    #[tokio::test]
    async fn an_older_rotation_written_late_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = TokenStore::open(dir.path()).unwrap();
        let tokens = dir.path().join("refresh-tokens");
        let job = |version, token: &str| WriteJob {
            account: Arc::from("a"),
            origin: [7; 32],
            token: Secret::new(token),
            version,
        };
        let remember = |version, token: &str| {
            let record = Record {
                origin: [7; 32],
                token: Secret::new(token),
                version,
                written: 0,
            };
            let mut records = store.lock();
            let written = records.get("a").map_or(0, |r| r.written);
            records.insert(Arc::from("a"), Record { written, ..record });
        };
        // A retry of rotation 1 that reaches the disk after rotation 2 was written.
        remember(1, "rt-1");
        remember(2, "rt-2");
        store.write_in_order(&tokens, &job(2, "rt-2")).unwrap();
        store.write_in_order(&tokens, &job(1, "rt-1")).unwrap();
        let (_, rec) = read_record(&tokens.join(file_name("a"))).unwrap();
        assert_eq!(rec.token.expose(), "rt-2");
        remember(3, "rt-3");
        store.write_in_order(&tokens, &job(3, "rt-3")).unwrap();
        let (_, rec) = read_record(&tokens.join(file_name("a"))).unwrap();
        assert_eq!(rec.token.expose(), "rt-3");
    }

    #[test]
    fn the_lock_names_its_holder_and_is_released_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = TokenStore::open(dir.path()).unwrap();
        let pid = std::process::id().to_string();
        let text = fs::read_to_string(dir.path().join("lock")).unwrap();
        assert_eq!(text.trim(), pid);
        match TokenStore::open(dir.path()) {
            Err(StateError::Locked { holder, .. }) => assert_eq!(holder, Some(pid)),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened twice"),
        }
        drop(store);
        assert!(TokenStore::open(dir.path()).is_ok());
    }

    #[test]
    fn torn_or_foreign_files_are_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("refresh-tokens");
        fs::create_dir_all(&tokens).unwrap();
        fs::write(tokens.join("x.json"), b"{\"version\":1,").unwrap();
        fs::write(tokens.join("y.json.tmp"), b"partial").unwrap();
        let (store, warnings) = TokenStore::open(dir.path()).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(store.is_empty());
        assert!(!tokens.join("y.json.tmp").exists());
    }

    #[test]
    fn an_unusable_record_says_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = "ab".repeat(32);
        let record = |version: u32, origin: &str, token: &str| {
            format!(
                r#"{{"version":{version},"account":"a","configTokenSha256":"{origin}","refreshToken":"{token}","updatedAtUnix":1}}"#
            )
        };
        let cases = [
            ("[1]".to_owned(), "not a refresh-token record"),
            (record(2, &good, "r"), "unknown record version 2"),
            (record(1, "abc", "r"), "bad configTokenSha256"),
            (record(1, &"zz".repeat(32), "r"), "bad configTokenSha256"),
            (record(1, &good, ""), "empty refreshToken"),
        ];
        for (i, (text, why)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("{i}.json"));
            fs::write(&path, text).unwrap();
            let e = read_record(&path).err().expect(why);
            assert_eq!(e.to_string(), *why, "{text}");
        }
        let missing = read_record(&dir.path().join("none.json")).err().unwrap();
        assert!(matches!(missing, RecordError::Read(_)), "{missing}");
        fs::write(dir.path().join("ok.json"), record(1, &good, "r")).unwrap();
        let (account, rec) = read_record(&dir.path().join("ok.json")).unwrap();
        assert_eq!((account.as_str(), rec.token.expose()), ("a", "r"));
    }
}
