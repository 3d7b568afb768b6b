//! Hot reload of the config file and the secret files it references.
//!
//! Kubernetes updates Secret and ConfigMap volumes by writing a new timestamped directory
//! and swapping the `..data` symlink; no event ever names the file we read, and a watch
//! on the file itself goes deaf after the first swap. So we watch the *directories*
//! (both where a path is and where its symlinks lead), ignore which entry an event names,
//! debounce a burst into one reload (bounded: a busy directory cannot postpone it for
//! good), and let the content digest decide whether anything changed. A periodic re-read
//! backs the watcher up (inotify can overflow, and some network filesystems send no
//! events), and SIGHUP asks for a re-read at once (the daemon convention).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch as watch_channel};
use tokio::time::Instant;

use crate::config;
use crate::credentials::{ConfigError, ConfigErrors};
use crate::options::check_listen;
use crate::priority::{at_low_priority, release_freed_memory};
use crate::shared::{now_rfc3339, Changes, Routes, Sidecar};

/// Directories whose changes may change the config: each file's own directory and the
/// directory its symlink chain ends in.
pub fn watched_dirs(config_path: &Path, secret_files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for file in std::iter::once(config_path).chain(secret_files.iter().map(PathBuf::as_path)) {
        if let Some(parent) = file.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            dirs.insert(parent.to_path_buf());
        }
        if let Ok(real) = std::fs::canonicalize(file) {
            if let Some(parent) = real.parent() {
                dirs.insert(parent.to_path_buf());
            }
        }
    }
    dirs
}

/// Whether an event can mean new content. notify's inotify backend also reports every
/// `open()` (and reads), including our own re-read of the file: counting those would make
/// each reload schedule the next one, forever. A finished write (`Close(Write)`) counts.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

fn make_watcher(dirs: &BTreeSet<PathBuf>, tx: mpsc::Sender<()>) -> Option<RecommendedWatcher> {
    // notify calls back on its own thread; try_send never blocks it, and a full channel
    // already means a reload is pending.
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| changes_content(&e.kind)) {
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the file watcher; relying on the periodic re-read");
            return None;
        }
    };
    for dir in dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; relying on the periodic re-read");
        }
    }
    Some(watcher)
}

/// However busy a watched directory is, a change waits at most this long after the
/// event that started its debounce: a directory where some file is written every 100 ms
/// never has 200 ms of quiet, and must not hold back config changes for good.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// The longest periodic re-read interval (the CLI refuses longer ones; this keeps the
/// timer's arithmetic in range for any [`crate::Options`]).
pub const MAX_RELOAD_INTERVAL: Duration = Duration::from_secs(86_400);

/// Why a reload runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// File events (debounced), the periodic re-read, or a re-check after the watched
    /// directories changed.
    Routine,
    /// SIGHUP: the operator asked, so the outcome is logged even when nothing changed.
    Hangup,
}

use crate::cache::schedule::later;

/// Waits for `quiet` without an event, but no longer than [`MAX_DEBOUNCE`] (or `quiet`,
/// if longer) after the first one. False if shutdown began meanwhile.
async fn debounce(
    rx: &mut mpsc::Receiver<()>,
    quiet: Duration,
    shutdown: &mut watch_channel::Receiver<bool>,
) -> bool {
    let cap = later(Instant::now(), MAX_DEBOUNCE.max(quiet));
    loop {
        let until = later(Instant::now(), quiet).min(cap);
        tokio::select! {
            event = tokio::time::timeout_at(until, rx.recv()) => match event {
                Ok(Some(())) if Instant::now() < cap => {}
                _ => return true,
            },
            _ = shutdown.changed() => return false,
        }
    }
}

/// SIGHUP, registered when the watcher starts (the binary registers it earlier too, so
/// that one arriving during start-up does not kill the process).
fn hangup_signal() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; it will not reload the config");
            None
        }
    }
}

async fn next_hangup(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts watching now and returns the loop to spawn: it reloads on change, on SIGHUP and
/// every `reload_interval` until shutdown. The watcher is created before this returns, so
/// a change made after it cannot be missed.
pub fn watch(
    sidecar: Arc<Sidecar>,
    mut shutdown: watch_channel::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let options = sidecar.options().clone();
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let mut dirs = watched_dirs(&options.config_path, &sidecar.config().secret_files);
    let watcher = make_watcher(&dirs, tx.clone());
    let mut hangup = hangup_signal();
    async move {
        // Held for the life of the loop: dropping it ends the inotify watches.
        let mut _watcher = watcher;
        let period = options
            .reload_interval
            .clamp(Duration::from_millis(100), MAX_RELOAD_INTERVAL);
        let mut tick = tokio::time::interval_at(later(Instant::now(), period), period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recheck = false;
        loop {
            let trigger = if recheck {
                Trigger::Routine
            } else {
                tokio::select! {
                    Some(()) = rx.recv() => {
                        // Debounce: a burst becomes one reload, within a bounded time.
                        if !debounce(&mut rx, options.reload_debounce, &mut shutdown).await {
                            return;
                        }
                        Trigger::Routine
                    }
                    _ = tick.tick() => Trigger::Routine,
                    Some(()) = next_hangup(&mut hangup) => {
                        tracing::info!(file = %options.config_path.display(), "SIGHUP received; re-reading the config");
                        Trigger::Hangup
                    }
                    _ = shutdown.changed() => return,
                }
            };
            let result = sidecar.reload().await;
            if trigger == Trigger::Hangup {
                // A change is logged by the reload itself ("config reloaded"), and a new
                // error too; say what became of the operator's request in the other cases.
                match &result {
                    Ok(true) => {}
                    Ok(false) => tracing::info!("SIGHUP: config unchanged; nothing to apply"),
                    Err(e) => tracing::warn!(
                        errors = e.errors.len(),
                        "SIGHUP: the config file is invalid; keeping the previous config (see config.lastError in /v1/accounts)"
                    ),
                }
            }
            let failed = result.is_err();
            // The periodic re-read is a backstop for quiet periods, not a second reload
            // right after this one.
            tick.reset();
            // Watch what the file on disk refers to now, even if it was unchanged or
            // invalid: a broken config may name a secret file that is yet to be created
            // in a directory the running config never used.
            let mut files = sidecar.config().secret_files.clone();
            if failed {
                let path = options.config_path.clone();
                let named =
                    tokio::task::spawn_blocking(move || crate::config::referenced_files(&path))
                        .await
                        .unwrap_or_default();
                files.extend(named);
            }
            let new_dirs = watched_dirs(&options.config_path, &files);
            recheck = new_dirs != dirs;
            if recheck {
                // Replacing the watcher drops the old one (and its inotify watches). What
                // changed in the new directories before they were watched is caught by
                // re-reading once more, at once.
                _watcher = make_watcher(&new_dirs, tx.clone());
                dirs = new_dirs;
            }
        }
    }
}

impl Sidecar {
    /// Re-reads the config file and, if it changed and is valid, swaps in its routes and
    /// applies the differences to the cache. An invalid config changes nothing.
    pub async fn reload(self: &Arc<Self>) -> Result<bool, ConfigErrors> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = std::time::Instant::now();
        let path = self.options.config_path.clone();
        // Files byte-for-byte as the config in use was built from them: nothing to parse.
        // Only when the last attempt succeeded; a broken file is re-parsed (and its error
        // deduplicated) until it is fixed.
        let current = self.routes.load_full();
        let last_failed = self.reload_status_lock().last_error.is_some();
        let (cache, options) = (self.cache.clone(), self.options.clone());
        // Parsing, validating and routing 100k accounts takes most of a second of CPU:
        // kept off the serving thread.
        let loaded = at_low_priority(move || {
            if !last_failed && current.config().files_unchanged(&path) {
                return Ok(None);
            }
            let config = config::load(&path)?;
            if config.fingerprint == current.config().fingerprint {
                return Ok(Some(None));
            }
            check_listen(&options, &config).map_err(|e| ConfigErrors {
                file: path.clone(),
                errors: vec![ConfigError::new("auth", e.to_string())],
            })?;
            Ok(Some(Some(Routes::build(
                Arc::new(config),
                &cache,
                Some(&current),
            ))))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigErrors {
                file: self.options.config_path.clone(),
                errors: vec![ConfigError::new("(file)", format!("loader failed: {e}"))],
            })
        });
        match loaded {
            Ok(None) => Ok(false),
            Ok(Some(None)) => {
                // The file is back to the config in use (an operator reverted a bad
                // edit): the error shown is no longer true.
                let mut st = self.reload_status_lock();
                if st.last_error.take().is_some() {
                    st.last_error_at = None;
                    tracing::info!(file = %self.options.config_path.display(), "config file is valid again and unchanged from the one in use");
                }
                Ok(false)
            }
            Ok(Some(Some((routes, changes)))) => {
                let accounts = routes.config().accounts.len();
                let old = self.routes.swap(Arc::new(routes));
                self.metrics.reload(true);
                {
                    let mut st = self.reload_status_lock();
                    st.last_success_at = Some(now_rfc3339());
                    st.last_error = None;
                    st.last_error_at = None;
                }
                self.apply(changes, accounts, started);
                // Freeing a big map (and the parse's garbage) takes a while: off the
                // serving thread, and not part of the reload's time.
                tokio::spawn(at_low_priority(move || {
                    drop(old);
                    release_freed_memory();
                }));
                Ok(true)
            }
            Err(errors) => {
                let messages: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
                let mut st = self.reload_status_lock();
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

    fn reload_status_lock(&self) -> std::sync::MutexGuard<'_, crate::shared::ReloadStatus> {
        self.reload_status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the cache in line with routes just swapped in: new entries become their
    /// keys' (retiring the ones they replace), removed keys are retired, and new or
    /// changed accounts are warmed in the background. Unchanged keys keep their entries
    /// and cause no upstream call. A request that still holds the old routes finds a
    /// retired entry and asks the new routes ([`crate::cache::CacheError::Superseded`]).
    fn apply(self: &Arc<Self>, changes: Changes, accounts: usize, started: std::time::Instant) {
        for entry in &changes.commit {
            self.cache.commit(entry);
        }
        for key in &changes.removed {
            self.cache.remove(key);
        }
        tracing::info!(
            accounts,
            removed_sets = changes.removed.len(),
            changed_sets = changes.commit.len(),
            warming_sets = changes.warm.len(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "config reloaded"
        );
        if !changes.warm.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.warm_all(changes.warm).await });
        }
    }
}
