//! The token cache: moka as the concurrent index from key to token cell, plus what moka
//! lacks — refresh-ahead, single-flight across cold misses *and* refreshes,
//! stale-while-error, and back-off that keeps a failing identity provider from being
//! hammered.
//!
//! Hot path: the credential set remembers the cell moka gave it ([`TokenMemo`]), so a
//! repeat hit is a pointer load, a short lock of the cell, a fingerprint compare and a
//! freshness check; the answer body was serialized when the token was stored and is
//! handed out as a refcounted `Bytes`. A set's first request, and any that finds no
//! token through its remembered cell, looks the key up in moka.
//!
//! Everything that coordinates fetches lives in one `std::sync::Mutex<HashMap>` of key
//! records, touched only on misses, refreshes and failures, and never held across an
//! await. Each fetch runs in its own task, so a client hanging up cannot cancel it.
//! Background refreshes are due dates in one ordered queue per provider, each watched by
//! one task that starts at most as many refreshes at a time as the provider may have
//! calls: a sleeping task per key would cost ~400 bytes each, and so would every started
//! refresh waiting for the provider (with 100k keys due together, tens of MB).

pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::CredentialSet;
use crate::credentials::CredentialKey;
use crate::metrics::{CacheEvent, Metrics, RefreshOutcome, Snapshot};
use crate::protocol;
use crate::provider::{ErrorClass, ExpiresIn, OurCode, ProviderError};
use crate::upstream::Upstream;
use schedule::{Freshness, Policy};

/// A token as served: the pre-serialized answer and its timing (a clone is a refcount
/// bump on the body and a copy of the rest).
#[derive(Debug, Clone)]
pub struct CachedToken {
    /// `{"user","accessToken"}`, serialized once.
    pub body: Bytes,
    /// The credential set's fingerprint at fetch time: a token from superseded
    /// credentials is never served.
    pub fingerprint: [u8; 32],
    /// When it expires (measured from when the request was sent, to be safe).
    pub expires_at: Instant,
    /// Served as fresh only with at least this much life left.
    pub min_life: Duration,
}

/// How a request was answered from the cache (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A fresh cached token.
    Hit,
    /// Waited for a fetch that was already under way.
    Joined,
    /// Started the fetch and waited for it.
    Miss,
    /// The refresh failed; a still-valid older token was served.
    Stale,
}

/// Why no token could be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// Not available yet (provider down, fetch under way, backing off): EmailEngine
    /// should retry after `retry_after`.
    #[error("token not available yet: {reason}")]
    Unavailable {
        /// When to retry.
        retry_after: Duration,
        /// Why, safe to show.
        reason: String,
    },
    /// The provider refused the grant; a person must act.
    #[error("token refresh failed permanently: {error}")]
    Failed {
        /// The provider's name in the config.
        provider: Arc<str>,
        /// The error.
        error: ProviderError,
    },
}

use schedule::later;

type FetchResult = Result<CachedToken, Arc<ProviderError>>;
/// A fetch under way, awaitable by any number of callers.
pub type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// The last failure of a key and when to try again.
#[derive(Debug, Clone)]
struct Failure {
    error: ProviderError,
    at: SystemTime,
    retry_at: Instant,
    consecutive: u32,
}

/// Where a key's current token lives: shared by the key's record, its moka entry, and
/// the credential sets that remember it ([`TokenMemo`]).
///
/// Rule: a cell is emptied before its record leaves the key map ([`TokenCache::remove`]),
/// and only a record still in the map writes a token into its cell. So a cell that is no
/// longer its key's holds no token, and a set remembering it goes back to moka.
///
/// A refresh replaces the token in place, so moka's entry is written once per key rather
/// than once per refresh: each moka write allocates ~230 bytes, and with 100k keys
/// refreshed every few minutes that churn fragments the heap (BENCHMARKS.md, P5). The
/// lock is held to copy a token out, or to write a refreshed answer into its
/// predecessor's buffer (a few µs), never across an await.
type TokenCell = Arc<Mutex<Option<CachedToken>>>;

fn cell_lock(cell: &TokenCell) -> MutexGuard<'_, Option<CachedToken>> {
    // Reads and writes are single assignments: a poisoned cell still holds a whole token.
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// Looks at the token in `cell`: the answer if it was fetched with `set`'s credentials
/// and is fresh (a refcount bump, nothing else copied); else that token, aging or
/// expired, for the slow path to judge; else nothing.
fn read_cell(cell: &TokenCell, set: &CredentialSet) -> Result<Bytes, Option<CachedToken>> {
    let guard = cell_lock(cell);
    let Some(tok) = guard.as_ref().filter(|t| t.fingerprint == set.fingerprint) else {
        return Err(None);
    };
    let remaining = tok.expires_at.checked_duration_since(Instant::now());
    if schedule::freshness(remaining, tok.min_life) == Freshness::Fresh {
        Ok(tok.body.clone())
    } else {
        Err(Some(tok.clone()))
    }
}

/// The token in `cell`, if it was fetched with `set`'s credentials and is fresh.
fn fresh_in(cell: &TokenCell, set: &CredentialSet) -> Option<CachedToken> {
    let guard = cell_lock(cell);
    let tok = guard
        .as_ref()
        .filter(|t| t.fingerprint == set.fingerprint)?;
    let remaining = tok.expires_at.checked_duration_since(Instant::now());
    (schedule::freshness(remaining, tok.min_life) == Freshness::Fresh).then(|| tok.clone())
}

/// The token cell a credential set found in moka last, kept in the set (see
/// [`CredentialSet::token_cell`]) so that a repeat hit reads the cell directly.
///
/// moka's lookup with its read bookkeeping (an access-order queue for an eviction we do
/// not use) cost ~0.8 µs of CPU per hit under load, mostly CPU cache misses: 7 % of the
/// request (BENCHMARKS.md, P1). moka stays the index for everything but a fresh hit: a
/// set's first request, and any that finds no fresh token through its remembered cell,
/// look the key up there and remember the cell moka has. Opaque outside the cache.
#[derive(Default)]
pub struct TokenMemo(arc_swap::ArcSwapOption<Mutex<Option<CachedToken>>>);

impl TokenMemo {
    /// Whether `cell` is the one remembered.
    fn holds(&self, cell: &TokenCell) -> bool {
        self.0.load().as_ref().is_some_and(|r| Arc::ptr_eq(r, cell))
    }

    /// Remembers `cell` from now on, unless it already is the one remembered.
    fn remember(&self, cell: &TokenCell) {
        if !self.holds(cell) {
            self.0.store(Some(cell.clone()));
        }
    }
}

impl std::fmt::Debug for TokenMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token: only whether a cell is remembered.
        let remembered = self.0.load().is_some();
        f.debug_struct("TokenMemo")
            .field("remembered", &remembered)
            .finish()
    }
}

/// Coordination state of one key. One per tracked key, so kept small: the failure
/// (rare) is boxed.
struct KeyRecord {
    set: Arc<CredentialSet>,
    /// The key's token; the same cell for as long as the record lives.
    cell: TokenCell,
    /// Whether the first stored token has started putting `cell` into moka (later
    /// tokens then only write the cell; a request that finds no entry puts it back).
    published: bool,
    /// Bumped whenever the key's credentials are replaced or removed: results of older
    /// fetches are then not stored.
    generation: u64,
    inflight: Option<Flight>,
    failure: Option<Box<Failure>>,
    last_ok: Option<SystemTime>,
    /// Expiry of the stored token of this generation.
    expires: Option<(Instant, SystemTime)>,
    /// This key's entry in the refresh queue, if a refresh is due.
    due: Option<DueId>,
    /// Requests held through a back-off, woken when the key's next attempt starts (made
    /// by the first such request, taken by the attempt).
    waiters: Option<Arc<Notify>>,
    /// When a forced refresh (admin API) last started an upstream call for this key.
    forced_at: Option<Instant>,
    /// What [`StateCounts`] counts this record as; brought up to date by
    /// [`TokenCache::settle`] after every change of state or token.
    counted: Option<Counted>,
}

impl KeyRecord {
    fn new(set: Arc<CredentialSet>, generation: u64) -> Self {
        KeyRecord {
            set,
            cell: TokenCell::default(),
            published: false,
            generation,
            inflight: None,
            failure: None,
            last_ok: None,
            expires: None,
            due: None,
            waiters: None,
            forced_at: None,
            counted: None,
        }
    }

    fn state(&self) -> KeyState {
        if self.inflight.is_some() {
            return KeyState::Refreshing;
        }
        match self.failure.as_ref().map(|f| f.error.class) {
            Some(ErrorClass::Permanent) => KeyState::FailedPermanent,
            Some(ErrorClass::Transient) => KeyState::FailingTransient,
            None => KeyState::Ok,
        }
    }

    fn counted_now(&self) -> Counted {
        Counted {
            state: self.state(),
            expires: self.expires.map(|(at, _)| at),
        }
    }

    fn status(&self, now: Instant) -> KeyStatus {
        let token = self.expires.filter(|(at, _)| *at > now);
        KeyStatus {
            account: self.set.key.account.to_string(),
            provider: self.set.provider_name.to_string(),
            grant: self.set.grant.as_str(),
            scopes: self.set.scopes.clone(),
            state: self.state().as_str(),
            token_expires_at: token.map(|(_, wall)| rfc3339(wall)),
            token_remaining_seconds: token.map(|(at, _)| (at - now).as_secs()),
            last_refresh_at: self.last_ok.map(rfc3339),
            last_error: self.failure.as_ref().map(|f| ErrorStatus {
                class: f.error.class.as_str(),
                code: f.error.code.to_string(),
                provider_code: f.error.provider_code.clone(),
                hint: f.error.hint,
                redirect_host: f.error.redirect_host.clone(),
                at: rfc3339(f.at),
                consecutive_failures: f.consecutive,
                retry_in_seconds: f.retry_at.saturating_duration_since(now).as_secs(),
            }),
        }
    }
}

/// The state of a tracked key, as the admin API and the `ee_auth_accounts` gauge show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// No fetch under way and the last one (if any) succeeded.
    Ok,
    /// A fetch is under way.
    Refreshing,
    /// The last fetch failed transiently; it is retried with back-off.
    FailingTransient,
    /// The provider refused the grant; a person must act.
    FailedPermanent,
}

impl KeyState {
    /// Every state, in the order of [`StateCounts`]' table.
    pub const ALL: [KeyState; 4] = [
        KeyState::Ok,
        KeyState::Refreshing,
        KeyState::FailingTransient,
        KeyState::FailedPermanent,
    ];

    /// The name shown in the admin API and as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Ok => "ok",
            KeyState::Refreshing => "refreshing",
            KeyState::FailingTransient => "failing_transient",
            KeyState::FailedPermanent => "failed_permanent",
        }
    }
}

/// What one record contributes to [`StateCounts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counted {
    state: KeyState,
    expires: Option<Instant>,
}

/// Tracked keys per state, and the expiry of every stored token in order, kept as
/// records change rather than recounted: a scrape of `/metrics` with 100k keys reads
/// four numbers and the first entry of a tree.
#[derive(Default)]
struct StateCounts {
    by_state: [u64; KeyState::ALL.len()],
    /// Token expiry -> how many stored tokens expire then.
    expiries: BTreeMap<Instant, u32>,
}

impl StateCounts {
    fn add(&mut self, c: Counted) {
        let n = &mut self.by_state[c.state as usize];
        *n = n.saturating_add(1);
        if let Some(at) = c.expires {
            let n = self.expiries.entry(at).or_default();
            *n = n.saturating_add(1);
        }
    }

    fn sub(&mut self, c: Counted) {
        let n = &mut self.by_state[c.state as usize];
        *n = n.saturating_sub(1);
        if let Some(at) = c.expires {
            if let std::collections::btree_map::Entry::Occupied(mut e) = self.expiries.entry(at) {
                *e.get_mut() = e.get().saturating_sub(1);
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

/// What a held request does next (see [`TokenCache::fetch_or_join`]).
enum Step {
    /// Wait for this fetch's result.
    Join(Flight, Source),
    /// Sleep until the back-off ends (or the deadline), or until an attempt starts.
    Sleep(Instant, tokio::sync::futures::OwnedNotified),
}

/// Wakes the requests held on a key (its attempt started, or the key was reset or
/// removed): each looks at the key again.
fn wake(waiters: &mut Option<Arc<Notify>>) {
    if let Some(waiters) = waiters.take() {
        waiters.notify_waiters();
    }
}

/// No token yet, for a transient reason; `next_attempt_in` is when the key's next
/// attempt is due, if known.
fn unavailable(next_attempt_in: Option<Duration>, reason: &str) -> CacheError {
    CacheError::Unavailable {
        retry_after: schedule::retry_hint(next_attempt_in),
        reason: reason.into(),
    }
}

/// An entry of the refresh queue: when, and a sequence number that makes it unique.
type DueId = (Instant, u64);

/// A provider's refresh queue: when each of its keys' next background refresh (or retry)
/// is due, and the slots that bound how many of them run at once.
///
/// Lock order: moka's per-key lock (inside `and_compute_with`), then the cache's key map
/// lock, then the map of queues, then a queue's own lock; a queue's task never holds its
/// queue's lock while it starts a refresh. A token cell's lock is taken alone or
/// innermost. moka is never called under any of our locks.
struct RefreshQueue {
    /// Each entry names the key by its credential set (a pointer, not a copy of the key)
    /// and the generation it was queued for.
    due: Mutex<BTreeMap<DueId, (Arc<CredentialSet>, u64)>>,
    next_seq: std::sync::atomic::AtomicU64,
    /// Background refreshes of this provider under way at most: a refresh started beyond
    /// the provider's call cap would only wait for it, holding its whole fetch in memory.
    slots: Arc<Semaphore>,
    /// Wakes the queue's task when an entry earlier than all others arrives, or when
    /// the cache is dropped.
    changed: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl RefreshQueue {
    fn new(slots: usize) -> Self {
        RefreshQueue {
            due: Mutex::default(),
            next_seq: std::sync::atomic::AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            changed: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<DueId, (Arc<CredentialSet>, u64)>> {
        // Inserts and removals are single operations: a poisoned queue is still whole.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, at: Instant, set: Arc<CredentialSet>, generation: u64) -> DueId {
        let id = (
            at,
            self.next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let mut due = self.lock();
        due.insert(id, (set, generation));
        if due.first_key_value().is_some_and(|(first, _)| *first == id) {
            self.changed.notify_one();
        }
        id
    }

    fn remove(&self, id: DueId) {
        self.lock().remove(&id);
    }

    /// Takes the earliest entry if it is due by `now`; otherwise says when the next one is.
    #[allow(clippy::type_complexity)]
    fn take_due(&self, now: Instant) -> Result<(DueId, Arc<CredentialSet>, u64), Option<Instant>> {
        let mut due = self.lock();
        match due.first_entry() {
            Some(entry) if entry.key().0 <= now => {
                let (id, (set, generation)) = entry.remove_entry();
                Ok((id, set, generation))
            }
            Some(entry) => Err(Some(entry.key().0)),
            None => Err(None),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// State of one credential set, for the admin API and the metrics.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The account id.
    pub account: String,
    /// Provider name.
    pub provider: String,
    /// Grant.
    pub grant: &'static str,
    /// Scopes.
    pub scopes: Vec<String>,
    /// ok, refreshing, failing_transient or failed_permanent.
    pub state: &'static str,
    /// When the current token expires (RFC 3339), if there is one.
    pub token_expires_at: Option<String>,
    /// Seconds of life left on the current token.
    pub token_remaining_seconds: Option<u64>,
    /// When the last refresh succeeded (RFC 3339).
    pub last_refresh_at: Option<String>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<ErrorStatus>,
}

/// The last error of a key (codes only, never a description or a secret).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorStatus {
    /// transient or permanent.
    pub class: &'static str,
    /// OAuth2 or our error code.
    pub code: String,
    /// Provider code (AADSTS…).
    pub provider_code: Option<String>,
    /// What to do.
    pub hint: Option<&'static str>,
    /// Where the token endpoint redirected to (host and port only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_host: Option<Box<str>>,
    /// When it happened (RFC 3339).
    pub at: String,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Seconds until the next attempt.
    pub retry_in_seconds: u64,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The token cache.
pub struct TokenCache {
    /// The index from key to token cell, read without taking `keys`' lock: a set's first
    /// request and every request that finds no fresh token through its [`TokenMemo`].
    tokens: moka::future::Cache<CredentialKey, TokenCell>,
    keys: Mutex<HashMap<CredentialKey, KeyRecord>>,
    /// Counts of `keys` by state; taken inside `keys`' lock, or alone.
    counts: Mutex<StateCounts>,
    /// Refresh queues by provider name, made (and their tasks started) on first use.
    refreshes: Mutex<HashMap<Arc<str>, Arc<RefreshQueue>>>,
    next_generation: std::sync::atomic::AtomicU64,
    /// Set once shutdown began: no fetch starts any more.
    closing: std::sync::atomic::AtomicBool,
    upstream: Arc<Upstream>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Providers already warned about an `expires_in` over [`schedule::MAX_LIFETIME`].
    long_lifetime_warned: Mutex<std::collections::HashSet<Arc<str>>>,
}

/// The answer to a request that would need a fetch once shutdown began.
fn shutting_down() -> CacheError {
    CacheError::Unavailable {
        retry_after: Duration::from_secs(1),
        reason: "the sidecar is shutting down".into(),
    }
}

impl Drop for TokenCache {
    fn drop(&mut self) {
        let queues = self.refreshes.get_mut().unwrap_or_else(|p| p.into_inner());
        for queue in queues.values() {
            queue
                .closed
                .store(true, std::sync::atomic::Ordering::Release);
            queue.changed.notify_one();
        }
    }
}

impl TokenCache {
    /// A cache fetching through `upstream` with the given timing rules, sized for
    /// `expected_keys` keys: tables grown by doubling while 100k keys are warmed leave
    /// their freed halves behind as holes in the heap.
    pub fn new(
        upstream: Arc<Upstream>,
        policy: Policy,
        metrics: Arc<Metrics>,
        expected_keys: usize,
    ) -> Arc<Self> {
        Arc::new(TokenCache {
            // No moka expiry: an entry lives as long as its key's record; an expired token
            // is never served (checked on every hit) and is dropped from its cell when its
            // refresh fails.
            tokens: moka::future::Cache::builder()
                .initial_capacity(expected_keys)
                .build(),
            keys: Mutex::new(HashMap::with_capacity(expected_keys)),
            counts: Mutex::default(),
            refreshes: Mutex::default(),
            next_generation: std::sync::atomic::AtomicU64::new(1),
            closing: std::sync::atomic::AtomicBool::new(false),
            upstream,
            policy,
            metrics,
            long_lifetime_warned: Mutex::default(),
        })
    }

    /// The timing rules.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CredentialKey, KeyRecord>> {
        // Every critical section leaves the map consistent before it can panic.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counts(&self) -> MutexGuard<'_, StateCounts> {
        // Each update is a few single operations: a poisoned table is at worst off by one.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the counts up to date with `rec` (call after any change to its fetch,
    /// failure or token; caller holds the key map's lock).
    fn settle(&self, rec: &mut KeyRecord) {
        let now = rec.counted_now();
        if rec.counted != Some(now) {
            let mut counts = self.counts();
            if let Some(before) = rec.counted {
                counts.sub(before);
            }
            counts.add(now);
            rec.counted = Some(now);
        }
    }

    /// Takes a record that left the key map out of the counts.
    fn uncount(&self, rec: &mut KeyRecord) {
        if let Some(before) = rec.counted.take() {
            self.counts().sub(before);
        }
    }

    fn generation(&self) -> u64 {
        self.next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Serves a token for `set`: from memory when fresh, else by joining (or starting)
    /// the one fetch for its key, waiting at most the policy's `request_wait` — and, when
    /// a still-valid token is in hand, only as long as that token stays servable.
    pub async fn get(
        self: &Arc<Self>,
        set: &Arc<CredentialSet>,
    ) -> Result<(Bytes, Source), CacheError> {
        // The cell this set found last time: nothing but a pointer load when it is there.
        let mut cached = {
            let remembered = set.token_cell.0.load();
            match remembered.as_ref().map(|cell| read_cell(cell, set)) {
                Some(Ok(body)) => return Ok(self.hit(body)),
                Some(Err(found)) => found,
                None => None,
            }
        };
        // No fresh token through the remembered cell (none remembered yet; its token
        // is aging, or of other credentials; the key's record was replaced): ask the
        // index, and remember the cell it has.
        let cell = match self.tokens.get(&set.key).await {
            Some(cell) => Some(cell),
            None => self.unlisted_cell(&set.key).await,
        };
        if let Some(cell) = cell {
            set.token_cell.remember(&cell);
            match read_cell(&cell, set) {
                Ok(body) => return Ok(self.hit(body)),
                Err(found) => cached = found,
            }
        }
        // With a valid (aging) token in hand, a slow or stalled provider must not turn it
        // into a 429 by making the request wait past the token's servable life: wait at
        // most half of what is left of it, so it can still be served stale afterwards.
        let servable_for = cached.as_ref().map_or(Duration::ZERO, |tok| {
            tok.expires_at
                .saturating_duration_since(Instant::now() + schedule::stale_floor(tok.min_life))
        });
        let wait = if servable_for.is_zero() {
            self.policy.request_wait
        } else {
            self.policy.request_wait.min(servable_for / 2)
        };
        let result = self.fetch_or_join(set, wait, servable_for.is_zero()).await;
        match result {
            Ok((tok, source)) => {
                self.metrics.cache_event(match source {
                    Source::Joined => CacheEvent::Joined,
                    _ => CacheEvent::Miss,
                });
                Ok((tok.body.clone(), source))
            }
            Err(e) => match cached {
                // Stale tokens keep a small floor of life so none expires on its way to
                // EmailEngine or in its hands.
                Some(tok)
                    if tok.expires_at
                        > later(Instant::now(), schedule::stale_floor(tok.min_life)) =>
                {
                    self.metrics.cache_event(CacheEvent::StaleServed);
                    Ok((tok.body.clone(), Source::Stale))
                }
                _ => {
                    self.metrics.cache_event(CacheEvent::Miss);
                    Err(e)
                }
            },
        }
    }

    fn hit(&self, body: Bytes) -> (Bytes, Source) {
        self.metrics.cache_event(CacheEvent::Hit);
        (body, Source::Hit)
    }

    /// Joins the fetch under way for the key, or starts one unless the key is backing
    /// off after a failure; waits for it at most `wait`.
    ///
    /// With `hold` (no servable token in hand), a transient failure does not end the
    /// request: it waits, within `wait`, for the key's next attempt (started by the
    /// refresh queue when the back-off ends, or by a waiter) and its result, because
    /// EmailEngine retries only a 429, at most five times: one request that spans the
    /// sidecar's own retries saves EmailEngine's (see the README, "Provider outages").
    /// It never starts an attempt the back-off schedule does not allow. A permanent
    /// failure ends the request at once.
    async fn fetch_or_join(
        self: &Arc<Self>,
        set: &Arc<CredentialSet>,
        wait: Duration,
        hold: bool,
    ) -> Result<(CachedToken, Source), CacheError> {
        let deadline = Instant::now()
            .checked_add(wait)
            .unwrap_or_else(Instant::now);
        let mut source = None;
        let mut first_look = true;
        let mut last_joined: Option<Flight> = None;
        loop {
            let step = {
                let mut keys = self.lock();
                let now = Instant::now();
                let rec = if std::mem::take(&mut first_look) {
                    self.record_for(&mut keys, set)
                } else {
                    // After the first look, only the record this request started with:
                    // a key removed or replaced meanwhile is answered from the new config
                    // by the client's next request, never brought back by this one.
                    match keys
                        .get_mut(&set.key)
                        .filter(|r| r.set.fingerprint == set.fingerprint)
                    {
                        Some(rec) => rec,
                        None => return Err(unavailable(None, "the account's credentials changed")),
                    }
                };
                // An attempt may have started and succeeded between the wake-up and this
                // look: take its token rather than start another one.
                if let Some(tok) = fresh_in(&rec.cell, set) {
                    return Ok((tok, source.unwrap_or(Source::Joined)));
                }
                if let Some(f) = &rec.inflight {
                    Step::Join(f.clone(), Source::Joined)
                } else if let Some(fail) = rec.failure.as_ref().filter(|f| f.retry_at > now) {
                    let until = schedule::hold_until(now, deadline, fail.retry_at);
                    if !hold
                        || fail.error.class == ErrorClass::Permanent
                        || until <= now
                        || self.is_closing()
                    {
                        return Err(self.failure_error(set, fail, now));
                    }
                    // Woken early when an attempt starts (the refresh queue's, an admin
                    // refresh, another request's), to join it.
                    let news = rec.waiters.get_or_insert_with(Default::default).clone();
                    Step::Sleep(until, news.notified_owned())
                } else {
                    match self.start_flight(rec, None) {
                        Some(f) => Step::Join(f, Source::Miss),
                        None => return Err(shutting_down()),
                    }
                }
            };
            match step {
                Step::Sleep(until, news) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        () = news => {}
                    }
                }
                Step::Join(flight, joined_as) => {
                    let source = *source.get_or_insert(joined_as);
                    // A flight that ended without its record learning it (its task was
                    // cancelled) would be joined again and again: once is enough.
                    if last_joined.as_ref().is_some_and(|l| l.ptr_eq(&flight)) {
                        return Err(unavailable(None, "the token fetch was lost; it is retried"));
                    }
                    last_joined = Some(flight.clone());
                    match tokio::time::timeout_at(deadline, flight).await {
                        Ok(Ok(tok)) => return Ok((tok, source)),
                        Ok(Err(e)) if !hold || e.class == ErrorClass::Permanent => {
                            return Err(self.error_from(set, &e, None))
                        }
                        // Transient: the failure is recorded with its back-off; the next
                        // turn waits for the attempt after it, or answers at the deadline.
                        Ok(Err(_)) => {}
                        Err(_) => {
                            return Err(unavailable(
                                None,
                                "the identity provider has not answered yet",
                            ))
                        }
                    }
                }
            }
        }
    }

    /// The record for `set`'s key, reset if the credentials changed since it was made.
    fn record_for<'a>(
        &self,
        keys: &'a mut HashMap<CredentialKey, KeyRecord>,
        set: &Arc<CredentialSet>,
    ) -> &'a mut KeyRecord {
        let generation = self.generation();
        let rec = keys
            .entry(set.key.clone())
            .or_insert_with(|| KeyRecord::new(set.clone(), generation));
        if rec.set.fingerprint != set.fingerprint {
            // Forget everything about the old credentials, their token included; the
            // cell (and so moka's entry) stays the key's.
            self.unschedule(rec);
            cell_lock(&rec.cell).take();
            wake(&mut rec.waiters);
            rec.set = set.clone();
            rec.generation = generation;
            rec.inflight = None;
            rec.failure = None;
            rec.last_ok = None;
            rec.expires = None;
        }
        self.settle(rec);
        rec
    }

    fn failure_error(&self, set: &CredentialSet, fail: &Failure, now: Instant) -> CacheError {
        self.error_from(
            set,
            &fail.error,
            Some(fail.retry_at.saturating_duration_since(now)),
        )
    }

    fn error_from(
        &self,
        set: &CredentialSet,
        e: &ProviderError,
        retry_in: Option<Duration>,
    ) -> CacheError {
        match e.class {
            ErrorClass::Permanent => CacheError::Failed {
                provider: set.provider_name.clone(),
                error: e.clone(),
            },
            ErrorClass::Transient => CacheError::Unavailable {
                retry_after: schedule::retry_hint(retry_in.or(e.retry_after)),
                reason: format!("the identity provider failed: {e}"),
            },
        }
    }

    /// Starts the fetch for a record (caller holds the lock and checked none is running).
    /// A background refresh passes its queue's slot, given back when the fetch ends.
    /// Starts nothing once shutdown began ([`TokenCache::close`]): `None`.
    fn start_flight(
        self: &Arc<Self>,
        rec: &mut KeyRecord,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Option<Flight> {
        // Read under the key map's lock, which `close` takes to set it: a flight is either
        // started before shutdown began, or not at all.
        if self.is_closing() {
            return None;
        }
        let fetch = self.clone().run_fetch(rec.set.clone(), rec.generation);
        Some(self.spawn_flight(rec, slot, fetch))
    }

    /// Runs `fetch` in a task of its own as the record's flight. A fetch that panics ends
    /// like one that failed: its flight gets an error and the key backs off and retries.
    /// Caught in the task itself, because a background refresh's flight may have nobody
    /// awaiting it; left in place, it would keep the key "refreshing" for good, every
    /// request joining a flight that has already failed.
    fn spawn_flight(
        self: &Arc<Self>,
        rec: &mut KeyRecord,
        slot: Option<OwnedSemaphorePermit>,
        fetch: impl std::future::Future<Output = FetchResult> + Send + 'static,
    ) -> Flight {
        let this = self.clone();
        let set = rec.set.clone();
        let generation = rec.generation;
        let handle = tokio::spawn(async move {
            let result = match std::panic::AssertUnwindSafe(fetch).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    tracing::error!(account = %set.key.account, provider = %set.provider_name,
                        "token fetch panicked; it counts as a transient failure and is retried");
                    let e = ProviderError {
                        hint: Some("an internal error; please report it"),
                        ..ProviderError::transient(OurCode::FetchTaskFailed)
                    };
                    Err(this.fetch_failed(&set, generation, e))
                }
            };
            drop(slot);
            result
        });
        let (cache, set, generation) = (Arc::downgrade(self), rec.set.clone(), rec.generation);
        let flight = async move {
            match handle.await {
                Ok(r) => r,
                // Cancelled (or its panic handling panicked): recorded as a failure, so
                // the key is not left "refreshing" behind a flight that is over.
                Err(_) => {
                    let e = ProviderError::transient(OurCode::FetchTaskFailed);
                    match cache.upgrade() {
                        Some(cache) => Err(cache.fetch_failed(&set, generation, e)),
                        None => Err(Arc::new(e)),
                    }
                }
            }
        }
        .boxed()
        .shared();
        rec.inflight = Some(flight.clone());
        wake(&mut rec.waiters);
        self.settle(rec);
        flight
    }

    /// One upstream fetch and its bookkeeping; runs in its own task.
    async fn run_fetch(self: Arc<Self>, set: Arc<CredentialSet>, generation: u64) -> FetchResult {
        let (grant, sent) = match self.upstream.fetch(&set).await {
            Ok(fetched) => fetched,
            Err(e) => return Err(self.fetch_failed(&set, generation, e)),
        };
        // A rotated refresh token in this answer is kept already (`Upstream::fetch`),
        // whatever is wrong with the rest of it.
        let Some(access_token) = grant.access_token.as_ref() else {
            let e = ProviderError {
                hint: Some("token response has no access_token"),
                ..ProviderError::transient(OurCode::InvalidResponse)
            };
            return Err(self.fetch_failed(&set, generation, e));
        };
        let answer = match protocol::ValidTokenAnswer::new(&set.user, access_token) {
            Ok(answer) => answer,
            Err(e) => {
                let e = ProviderError {
                    hint: Some(match e {
                        protocol::AnswerError::AccessToken => {
                            "the access token is longer than EmailEngine accepts"
                        }
                        protocol::AnswerError::AccessTokenCharacters => {
                            "the access token has characters a bearer token may not contain (RFC 6750)"
                        }
                        _ => "the answer would not pass EmailEngine's validation",
                    }),
                    ..ProviderError::transient(OurCode::InvalidResponse)
                };
                return Err(self.fetch_failed(&set, generation, e));
            }
        };
        let lifetime = match grant.expires_in {
            ExpiresIn::Unusable => {
                let e = ProviderError {
                    hint: Some("expires_in is not a number of seconds of at least 1"),
                    ..ProviderError::transient(OurCode::InvalidResponse)
                };
                return Err(self.fetch_failed(&set, generation, e));
            }
            ExpiresIn::Given(l) if l > schedule::MAX_LIFETIME => {
                self.warn_long_lifetime(&set, l);
                schedule::MAX_LIFETIME
            }
            ExpiresIn::Given(l) => l,
            ExpiresIn::Absent => {
                tracing::info!(account = %set.key.account, provider = %set.provider_name,
                    assumed_seconds = self.policy.default_lifetime.as_secs(),
                    "token response has no expires_in; assuming a conservative lifetime");
                self.policy.default_lifetime
            }
        };
        let plan = schedule::plan(lifetime, &self.policy, fastrand::f64());
        let token = |body| CachedToken {
            body,
            fingerprint: set.fingerprint,
            expires_at: later(sent.instant, lifetime),
            min_life: plan.min_life,
        };
        self.metrics.refresh(&set.provider_name, RefreshOutcome::Ok);
        let (tok, unpublished) = {
            let mut keys = self.lock();
            match keys.get_mut(&set.key) {
                Some(rec) if rec.generation == generation => {
                    let tok = {
                        // Swapped under the cell's lock: a request sees the old token or
                        // the new one, never none.
                        let mut cell = cell_lock(&rec.cell);
                        let previous = cell.take().map(|t| t.body);
                        let tok = token(answer.to_bytes(previous));
                        *cell = Some(tok.clone());
                        tok
                    };
                    rec.inflight = None;
                    rec.failure = None;
                    rec.last_ok = Some(SystemTime::now());
                    let wall = sent.wall.checked_add(lifetime).unwrap_or(sent.wall);
                    rec.expires = Some((tok.expires_at, wall));
                    self.settle(rec);
                    self.schedule(rec, later(sent.instant, plan.refresh_after));
                    let unpublished =
                        (!std::mem::replace(&mut rec.published, true)).then(|| rec.cell.clone());
                    (tok, unpublished)
                }
                // Replaced or removed meanwhile: the waiters get it, nobody else.
                _ => (token(answer.to_bytes(None)), None),
            }
        };
        if let Some(cell) = unpublished {
            self.publish(&set.key, &cell).await;
        }
        Ok(tok)
    }

    /// Logs, once per provider, that its tokens' lifetime is clamped.
    fn warn_long_lifetime(&self, set: &CredentialSet, lifetime: Duration) {
        let first = self
            .long_lifetime_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(set.provider_name.clone());
        if first {
            tracing::warn!(provider = %set.provider_name, account = %set.key.account,
                expires_in_seconds = lifetime.as_secs(),
                max_seconds = schedule::MAX_LIFETIME.as_secs(),
                "token response has an expires_in over the maximum; its tokens are refreshed as if they lived 24 hours (logged once per provider)");
        }
    }

    /// Records a failed fetch (log line, back-off, retry) and returns its error.
    fn fetch_failed(
        self: &Arc<Self>,
        set: &CredentialSet,
        generation: u64,
        e: ProviderError,
    ) -> Arc<ProviderError> {
        let mut keys = self.lock();
        if e.code == crate::upstream::SHUTTING_DOWN && self.upstream.is_closed() {
            // Never sent: shutdown began while it waited its turn. Not a provider
            // failure, nothing to retry in this process.
            if let Some(rec) = keys
                .get_mut(&set.key)
                .filter(|r| r.generation == generation)
            {
                rec.inflight = None;
                self.settle(rec);
            }
            tracing::debug!(account = %set.key.account, "refresh not sent: shutting down");
            return Arc::new(e);
        }
        let outcome = match e.class {
            ErrorClass::Transient => RefreshOutcome::Transient,
            ErrorClass::Permanent => RefreshOutcome::Permanent,
        };
        self.metrics.refresh(&set.provider_name, outcome);
        if let Some(rec) = keys
            .get_mut(&set.key)
            .filter(|r| r.generation == generation)
        {
            let consecutive = rec.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
            let delay = match e.class {
                ErrorClass::Permanent => self.policy.permanent_retry,
                ErrorClass::Transient => {
                    schedule::backoff(consecutive, e.retry_after, &self.policy, fastrand::f64())
                }
            };
            let retry_at = later(Instant::now(), delay);
            tracing::warn!(
                account = %set.key.account,
                provider = %set.provider_name,
                class = e.class.as_str(),
                code = %e.code,
                provider_code = e.provider_code.as_deref().unwrap_or(""),
                hint = e.hint.unwrap_or(""),
                redirect_host = e.redirect_host.as_deref(),
                consecutive,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "token refresh failed"
            );
            rec.inflight = None;
            if rec.expires.is_some_and(|(at, _)| at <= Instant::now()) {
                // Never servable again: free it rather than keep it until the
                // refresh finally succeeds.
                cell_lock(&rec.cell).take();
                rec.expires = None;
            }
            rec.failure = Some(Box::new(Failure {
                error: e.clone(),
                at: SystemTime::now(),
                retry_at,
                consecutive,
            }));
            self.settle(rec);
            self.schedule(rec, retry_at);
        } else {
            // The credentials were replaced or removed meanwhile: nothing to retry,
            // but every failed refresh still gets its log line.
            tracing::warn!(
                account = %set.key.account,
                provider = %set.provider_name,
                class = e.class.as_str(),
                code = %e.code,
                provider_code = e.provider_code.as_deref().unwrap_or(""),
                hint = e.hint.unwrap_or(""),
                redirect_host = e.redirect_host.as_deref(),
                "token refresh failed (for credentials replaced since; not retried)"
            );
        }
        Arc::new(e)
    }

    /// Puts a key's cell into moka, if its record still holds that cell. The check and
    /// the insert are one step under moka's lock for the key, and [`TokenCache::remove`]
    /// takes the entry out under the same lock: a removal racing a publish can never
    /// leave an entry without a record, or take out a newer record's entry.
    async fn publish(&self, key: &CredentialKey, cell: &TokenCell) {
        use moka::ops::compute::Op;
        self.tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| {
                // moka is never called under the key map's lock, so taking it here
                // cannot deadlock.
                let current = self
                    .lock()
                    .get(key)
                    .is_some_and(|rec| Arc::ptr_eq(&rec.cell, cell));
                std::future::ready(match entry {
                    _ if current => Op::Put(cell.clone()),
                    Some(e) if Arc::ptr_eq(e.value(), cell) => Op::Remove,
                    _ => Op::Nop,
                })
            })
            .await;
    }

    /// The cell of a tracked key that holds a token but has no moka entry yet (its first
    /// token is stored and its publish has not landed, or was cancelled), put into moka:
    /// without it, the key would be served from the miss path, and its token could not
    /// be served stale.
    async fn unlisted_cell(&self, key: &CredentialKey) -> Option<TokenCell> {
        let cell = {
            let keys = self.lock();
            let rec = keys.get(key)?;
            if cell_lock(&rec.cell).is_none() {
                return None;
            }
            rec.cell.clone()
        };
        self.publish(key, &cell).await;
        Some(cell)
    }

    /// The refresh queue of a provider, made and its task started on first use (the
    /// cache may be built outside the runtime; this runs inside it).
    fn queue(self: &Arc<Self>, provider: &Arc<str>) -> Arc<RefreshQueue> {
        let mut queues = self.refreshes.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(provider.clone())
            .or_insert_with(|| {
                let queue = Arc::new(RefreshQueue::new(self.upstream.provider_cap()));
                tokio::spawn(Self::run_refreshes(queue.clone(), Arc::downgrade(self)));
                queue
            })
            .clone()
    }

    /// Removes the key's queued refresh, if any (caller holds the key map's lock, or owns
    /// the record after taking it out of the map).
    fn unschedule(&self, rec: &mut KeyRecord) {
        if let Some(id) = rec.due.take() {
            let queues = self.refreshes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(queue) = queues.get(&rec.set.provider_name) {
                queue.remove(id);
            }
        }
    }

    /// (Re)arms the key's background refresh (caller holds the key map's lock).
    fn schedule(self: &Arc<Self>, rec: &mut KeyRecord, at: Instant) {
        self.unschedule(rec);
        let queue = self.queue(&rec.set.provider_name);
        rec.due = Some(queue.insert(at, rec.set.clone(), rec.generation));
    }

    /// A refresh queue's task: takes a free slot, sleeps until the earliest due refresh
    /// (or until an earlier one is queued) and starts it with that slot. It holds the
    /// cache only weakly; dropping the cache closes the queue and ends it.
    async fn run_refreshes(queue: Arc<RefreshQueue>, cache: std::sync::Weak<Self>) {
        while !queue.is_closed() {
            // A running refresh holds the cache until just before it gives its slot
            // back, so once the cache is dropped every slot returns at once: this wait
            // cannot outlive it, and the loop then sees the queue closed.
            let Ok(slot) = queue.slots.clone().acquire_owned().await else {
                return;
            };
            // `notify_one` keeps a permit when nobody waits: an entry queued between
            // `take_due` and the wait below still wakes us.
            let due = loop {
                if queue.is_closed() {
                    return;
                }
                match queue.take_due(Instant::now()) {
                    Ok(due) => break due,
                    Err(Some(at)) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = queue.changed.notified() => {}
                        }
                    }
                    Err(None) => queue.changed.notified().await,
                }
            };
            let Some(this) = cache.upgrade() else { return };
            let (id, set, generation) = due;
            this.background_refresh(&set.key, generation, id, slot);
        }
    }

    fn background_refresh(
        self: &Arc<Self>,
        key: &CredentialKey,
        generation: u64,
        id: DueId,
        slot: OwnedSemaphorePermit,
    ) {
        let mut keys = self.lock();
        if let Some(rec) = keys.get_mut(key) {
            // Only the entry the record still points at: a rescheduled or reset key has
            // removed its old one, but it may have been taken just before.
            if rec.due == Some(id) {
                rec.due = None;
                if rec.generation == generation && rec.inflight.is_none() {
                    let _detached = self.start_flight(rec, Some(slot));
                }
            }
        }
    }

    /// Makes sure a token for `set` is there or on its way, without waiting: pre-warm,
    /// and accounts added or changed by a reload. Returns the fetch to await, if one runs.
    pub fn warm(self: &Arc<Self>, set: &Arc<CredentialSet>) -> Option<Flight> {
        let mut keys = self.lock();
        let now = Instant::now();
        let rec = self.record_for(&mut keys, set);
        if let Some(f) = &rec.inflight {
            return Some(f.clone());
        }
        let has_token = rec.expires.is_some_and(|(at, _)| at > now);
        let backing_off = rec.failure.as_ref().is_some_and(|f| f.retry_at > now);
        if has_token || backing_off {
            return None;
        }
        self.start_flight(rec, None)
    }

    /// Fetches a new token for `set` now, even if the cached one is fresh (admin action);
    /// joins a fetch already under way.
    pub async fn force_refresh(
        self: &Arc<Self>,
        set: &Arc<CredentialSet>,
    ) -> Result<(), CacheError> {
        let flight = {
            let mut keys = self.lock();
            let rec = self.record_for(&mut keys, set);
            match &rec.inflight {
                Some(f) => f.clone(),
                None => {
                    let flight = self.start_flight(rec, None).ok_or_else(shutting_down)?;
                    rec.forced_at = Some(Instant::now());
                    flight
                }
            }
        };
        // An operator's explicit refresh waits for its answer even where requests are
        // answered at once (`--request-wait 0s`).
        let wait = self.policy.request_wait.max(Duration::from_secs(10));
        match tokio::time::timeout(wait, flight).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.error_from(set, &e, None)),
            Err(_) => Err(unavailable(
                None,
                "the identity provider has not answered yet",
            )),
        }
    }

    /// How long until a forced refresh of every one of `sets` may start a new upstream
    /// call, when one was started less than `interval` ago; `None` if all may go now. A
    /// set with a fetch under way needs no wait: a forced refresh joins that fetch.
    pub fn forced_refresh_wait(
        &self,
        sets: &[&Arc<CredentialSet>],
        interval: Duration,
    ) -> Option<Duration> {
        let now = Instant::now();
        let keys = self.lock();
        sets.iter()
            .filter_map(|s| keys.get(&s.key))
            .filter(|rec| rec.inflight.is_none())
            .filter_map(|rec| rec.forced_at)
            .map(|at| interval.saturating_sub(now.saturating_duration_since(at)))
            .filter(|wait| !wait.is_zero())
            .max()
    }

    /// Forgets a key at once: its token, its queued refresh, any result still in flight.
    pub async fn remove(&self, key: &CredentialKey) {
        let Some(mut rec) = self.lock().remove(key) else {
            return;
        };
        self.uncount(&mut rec);
        self.unschedule(&mut rec);
        wake(&mut rec.waiters);
        // Credential sets of older configs may remember this cell: emptied, it sends
        // them to the index instead of serving a token of a removed key.
        cell_lock(&rec.cell).take();
        // Only this record's cell: a request still holding the old config may already
        // have made a new record, and published its cell.
        self.unlist(key, &rec.cell).await;
    }

    /// Takes `key`'s moka entry out if it is `cell`, under moka's lock for the key.
    async fn unlist(&self, key: &CredentialKey, cell: &TokenCell) {
        use moka::ops::compute::Op;
        self.tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| {
                std::future::ready(match entry {
                    Some(e) if Arc::ptr_eq(e.value(), cell) => Op::Remove,
                    _ => Op::Nop,
                })
            })
            .await;
    }

    /// Replaces a key's credentials: if they differ from the ones the key's token was
    /// fetched with, drops that token and fetches anew in the background (when the key
    /// was in use).
    pub async fn replace(self: &Arc<Self>, set: &Arc<CredentialSet>) {
        // `warm` finds the record's credentials changed and resets it, token and all;
        // the key's moka entry stays (it is the key's cell, not the token).
        if self.is_tracked(&set.key) {
            self.warm(set);
        }
    }

    /// Fetches under way.
    pub fn in_flight(&self) -> Vec<Flight> {
        self.lock()
            .values()
            .filter_map(|r| r.inflight.clone())
            .collect()
    }

    fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Begins shutdown: from this instant no fetch starts (requests, refresh queues,
    /// pre-warm, reloads, admin refreshes) and no upstream call is sent; calls already
    /// sent go on ([`Upstream::drain`] waits for them).
    pub fn close(&self) {
        {
            let mut keys = self.lock();
            self.closing
                .store(true, std::sync::atomic::Ordering::Release);
            // Requests held through a back-off stop waiting for an attempt that will not
            // start (answered 429 at once, see `fetch_or_join`).
            for rec in keys.values_mut() {
                wake(&mut rec.waiters);
            }
        }
        self.upstream.close();
        let queues = self.refreshes.lock().unwrap_or_else(|p| p.into_inner());
        for queue in queues.values() {
            queue
                .closed
                .store(true, std::sync::atomic::Ordering::Release);
            queue.changed.notify_one();
        }
    }

    /// The upstream the cache fetches through.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Runs moka's pending housekeeping now (after a mass insert such as pre-warm), so
    /// that the first requests do not pay for it.
    pub async fn run_pending_tasks(&self) {
        self.tokens.run_pending_tasks().await;
    }

    /// Whether the cache tracks `key` (it was fetched or requested under these credentials).
    pub fn is_tracked(&self, key: &CredentialKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Keys currently tracked.
    pub fn keys(&self) -> Vec<CredentialKey> {
        self.lock().keys().cloned().collect()
    }

    /// Status of every tracked key, sorted by account (walks every key: for tests and
    /// tools, not for the serving thread).
    pub fn status(&self) -> Vec<KeyStatus> {
        let now = Instant::now();
        let keys = self.lock();
        let mut out: Vec<KeyStatus> = keys.values().map(|rec| rec.status(now)).collect();
        drop(keys);
        out.sort_by(|a, b| a.account.cmp(&b.account).then(a.scopes.cmp(&b.scopes)));
        out
    }

    /// Status of each of `keys` (`None` for a key the cache does not track), under one
    /// short hold of the key map's lock.
    pub fn status_of(&self, keys: &[&CredentialKey]) -> Vec<Option<KeyStatus>> {
        let now = Instant::now();
        let map = self.lock();
        keys.iter()
            .map(|k| map.get(*k).map(|rec| rec.status(now)))
            .collect()
    }

    /// Tracked keys per state and the shortest remaining token life, from counts kept as
    /// keys change (no walk over the keys).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let counts = self.counts();
        let min_remaining = counts
            .expiries
            .range((std::ops::Bound::Excluded(now), std::ops::Bound::Unbounded))
            .next()
            .map(|(at, _)| Duration::from_secs(at.saturating_duration_since(now).as_secs()));
        Snapshot {
            accounts_by_state: KeyState::ALL
                .iter()
                .map(|s| (s.as_str(), counts.by_state[*s as usize]))
                .collect(),
            min_remaining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(n: usize) -> Vec<Arc<CredentialSet>> {
        sets_with(n, "http://127.0.0.1:1/t", "r")
    }

    /// `n` accounts on one provider whose token endpoint is `token_url`.
    fn sets_at(n: usize, token_url: &str) -> Vec<Arc<CredentialSet>> {
        sets_with(n, token_url, "r")
    }

    fn sets_with_refresh_token(n: usize, rt: &str) -> Vec<Arc<CredentialSet>> {
        sets_with(n, "http://127.0.0.1:1/t", rt)
    }

    fn sets_with(n: usize, token_url: &str, rt: &str) -> Vec<Arc<CredentialSet>> {
        let accounts: serde_json::Map<String, serde_json::Value> = (0..n)
            .map(|i| {
                (
                    format!("a{i}"),
                    serde_json::json!({"user": "u@example.com", "provider": "p", "refreshToken": rt}),
                )
            })
            .collect();
        let text = serde_json::json!({
            "providers": {"p": {"type": "oauth2", "tokenUrl": token_url, "clientId": "c"}},
            "accounts": accounts,
        })
        .to_string();
        let config = crate::config::parse(text.as_bytes(), std::path::Path::new("/")).unwrap();
        let mut out: Vec<_> = config.credential_sets().cloned().collect();
        out.sort_by(|a, b| a.key.account.cmp(&b.key.account));
        out
    }

    #[tokio::test]
    async fn the_refresh_queue_hands_out_what_is_due_in_order() {
        let q = RefreshQueue::new(1);
        let s = sets(3);
        let now = Instant::now();
        let late = q.insert(now + Duration::from_secs(30), s[0].clone(), 1);
        let early = q.insert(now + Duration::from_secs(10), s[1].clone(), 2);
        let gone = q.insert(now + Duration::from_secs(20), s[2].clone(), 3);
        q.remove(gone);

        let nothing_due = q.take_due(now).map(|(id, _, _)| id);
        assert_eq!(nothing_due, Err(Some(now + Duration::from_secs(10))));

        let then = now + Duration::from_secs(30);
        let mut got = Vec::new();
        while let Ok((id, set, g)) = q.take_due(then) {
            got.push((id, set.key.clone(), g));
        }
        assert_eq!(
            got,
            vec![(early, s[1].key.clone(), 2), (late, s[0].key.clone(), 1)],
            "due entries come out earliest first; a removed one never does"
        );
        assert_eq!(q.take_due(then).map(|(id, _, _)| id), Err(None));
        assert!(q.lock().is_empty());
    }

    #[tokio::test]
    async fn an_entry_earlier_than_all_others_wakes_the_queue() {
        let q = RefreshQueue::new(1);
        let s = sets(2);
        let now = Instant::now();
        q.insert(now + Duration::from_secs(60), s[0].clone(), 1);
        // The first insert was the earliest: it left a wake-up permit. Consume it.
        q.changed.notified().await;
        q.insert(now + Duration::from_secs(90), s[1].clone(), 1);
        let woke = tokio::time::timeout(Duration::from_millis(1), q.changed.notified()).await;
        assert!(woke.is_err(), "a later entry does not wake the queue");
        q.insert(now + Duration::from_secs(5), s[1].clone(), 2);
        let woke = tokio::time::timeout(Duration::from_millis(1), q.changed.notified()).await;
        assert!(woke.is_ok(), "an earlier entry does");
    }

    /// A cache whose provider cannot be reached: any upstream call fails at once.
    fn offline_cache(policy: Policy) -> Arc<TokenCache> {
        let metrics = Arc::new(Metrics::new());
        let http = crate::upstream::http_client(Duration::from_secs(1)).unwrap();
        let store = Arc::new(crate::state::TokenStore::in_memory());
        let upstream = Arc::new(Upstream::new(http, store, 4, metrics.clone()));
        TokenCache::new(upstream, policy, metrics, 1)
    }

    /// Puts a token that lives `life` into `set`'s record, as a finished fetch would, but
    /// leaves moka without the entry: the state a lost or not yet landed publish leaves.
    fn token_without_entry(cache: &Arc<TokenCache>, set: &Arc<CredentialSet>, life: Duration) {
        let mut keys = cache.lock();
        let rec = cache.record_for(&mut keys, set);
        *cell_lock(&rec.cell) = Some(CachedToken {
            body: Bytes::from_static(b"{\"user\":\"u\",\"accessToken\":\"t\"}"),
            fingerprint: set.fingerprint,
            expires_at: Instant::now() + life,
            min_life: Duration::from_secs(60),
        });
        rec.expires = Some((Instant::now() + life, SystemTime::now() + life));
        rec.published = true;
        cache.settle(rec);
    }

    /// Review finding: a request held through a back-off is woken when an attempt starts,
    /// but may only look again after that attempt succeeded. It must take that token, not
    /// start another refresh (which would spend the refresh token once more).
    #[tokio::test]
    async fn a_held_request_woken_after_an_attempt_succeeded_takes_its_token() {
        let cache = offline_cache(Policy {
            backoff_base: Duration::from_secs(4),
            backoff_max: Duration::from_secs(4),
            request_wait: Duration::from_secs(5),
            ..Policy::default()
        });
        let set = sets(1).remove(0);
        // A first attempt fails (nothing listens at the token URL): the key backs off
        // 2-4 s, within the held request's 5 s.
        let first = cache.warm(&set).expect("a fetch starts");
        assert!(first.await.is_err());
        let held = tokio::spawn({
            let (cache, set) = (cache.clone(), set.clone());
            async move { cache.get(&set).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The retry started and succeeded before the woken request took the lock.
        {
            let mut keys = cache.lock();
            let rec = keys.get_mut(&set.key).expect("tracked");
            *cell_lock(&rec.cell) = Some(CachedToken {
                body: Bytes::from_static(b"{\"user\":\"u\",\"accessToken\":\"t\"}"),
                fingerprint: set.fingerprint,
                expires_at: Instant::now() + Duration::from_secs(3600),
                min_life: Duration::from_secs(60),
            });
            rec.failure = None;
            rec.expires = Some((
                Instant::now() + Duration::from_secs(3600),
                SystemTime::now() + Duration::from_secs(3600),
            ));
            cache.settle(rec);
            wake(&mut rec.waiters);
        }
        let got = tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .expect("answered at once, not at the end of its hold")
            .unwrap();
        let (body, _) = got.expect("the token the attempt stored");
        assert_eq!(&body[..], b"{\"user\":\"u\",\"accessToken\":\"t\"}");
        assert!(
            cache.in_flight().is_empty(),
            "no second refresh was started"
        );
    }

    #[tokio::test]
    async fn a_token_whose_moka_entry_is_missing_is_served_and_its_entry_put_back() {
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        assert!(cache.tokens.get(&set.key).await.is_none());

        let (body, source) = cache.get(&set).await.unwrap();
        assert_eq!(source, Source::Hit, "served from the record, no fetch");
        assert_eq!(&body[..], br#"{"user":"u","accessToken":"t"}"#);
        assert!(
            cache.tokens.get(&set.key).await.is_some(),
            "the entry is back: the next request is an ordinary hit"
        );
    }

    #[tokio::test]
    async fn an_aging_token_without_its_moka_entry_is_still_served_stale() {
        let cache = offline_cache(Policy {
            request_wait: Duration::from_secs(2),
            ..Policy::default()
        });
        let set = sets(1).remove(0);
        // Under the minimum life (60 s) but valid: a refresh is tried, the provider is
        // unreachable, and the aging token is what EmailEngine gets.
        token_without_entry(&cache, &set, Duration::from_secs(30));
        let (body, source) = cache.get(&set).await.unwrap();
        assert_eq!(source, Source::Stale);
        assert_eq!(&body[..], br#"{"user":"u","accessToken":"t"}"#);
    }

    #[tokio::test]
    async fn a_set_remembers_its_cell_and_goes_back_to_the_index_when_the_record_is_new() {
        // Offline provider: any fetch fails, so every `Hit` below was served from memory.
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        assert_eq!(cache.get(&set).await.unwrap().1, Source::Hit);
        let first = cache.lock().get(&set.key).unwrap().cell.clone();
        assert!(
            set.token_cell.holds(&first),
            "the set remembers the cell it found"
        );
        // With moka's entry gone, a hit can only have come through the remembered cell
        // (a lookup in moka would have put the entry back).
        cache.tokens.invalidate(&set.key).await;
        assert_eq!(cache.get(&set).await.unwrap().1, Source::Hit);
        assert!(cache.tokens.get(&set.key).await.is_none());
        cache.publish(&set.key, &first).await;

        // The key is removed and comes back with a new record (a new cell); the set
        // still points at the old, emptied one.
        cache.remove(&set.key).await;
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        let second = cache.lock().get(&set.key).unwrap().cell.clone();
        assert!(!Arc::ptr_eq(&first, &second));
        let (body, source) = cache.get(&set).await.unwrap();
        assert_eq!(source, Source::Hit, "found through the index, not fetched");
        assert_eq!(&body[..], br#"{"user":"u","accessToken":"t"}"#);
        assert!(set.token_cell.holds(&second), "and remembered from then on");
    }

    #[tokio::test]
    async fn a_removed_key_is_not_served_through_a_remembered_cell() {
        let cache = offline_cache(Policy {
            request_wait: Duration::from_millis(200),
            ..Policy::default()
        });
        let set = sets(1).remove(0);
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        assert_eq!(cache.get(&set).await.unwrap().1, Source::Hit);
        // A request holding the config from before the removal asks again: the token of
        // the removed key is gone, so it must fetch (and the provider is unreachable).
        cache.remove(&set.key).await;
        assert!(cache.get(&set).await.is_err());
    }

    /// The record's state as the admin API shows it.
    fn state_of(
        cache: &Arc<TokenCache>,
        set: &Arc<CredentialSet>,
    ) -> (&'static str, Option<ErrorStatus>) {
        let status = cache.status();
        let s = status
            .iter()
            .find(|s| s.account == *set.key.account)
            .expect("tracked");
        (s.state, s.last_error.clone())
    }

    #[tokio::test]
    async fn a_fetch_task_that_panics_ends_its_flight_with_an_error_and_the_key_retries() {
        let cache = offline_cache(Policy {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            // Answered after a short hold rather than riding the retries for 20 s.
            request_wait: Duration::from_millis(200),
            ..Policy::default()
        });
        let set = sets(1).remove(0);
        let flight = {
            let mut keys = cache.lock();
            let rec = cache.record_for(&mut keys, &set);
            cache.spawn_flight(rec, None, async { panic!("a fetch that panics") })
        };
        let e = tokio::time::timeout(Duration::from_secs(5), flight)
            .await
            .expect("the flight ends")
            .expect_err("with an error");
        assert_eq!(
            e.code,
            crate::provider::ErrorCode::Ours(OurCode::FetchTaskFailed)
        );
        // Not stuck "refreshing" behind the dead flight: the failure is recorded and
        // retried after the back-off, by the refresh queue and by the next request.
        let (state, error) = state_of(&cache, &set);
        assert_eq!(state, "failing_transient");
        assert_eq!(error.map(|e| e.code).as_deref(), Some("fetch_task_failed"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (state, error) = state_of(&cache, &set);
            let error = error.expect("still failing: the provider is unreachable");
            if state != "refreshing" && error.code != "fetch_task_failed" {
                assert!(error.consecutive_failures >= 2, "{error:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no retry after the panic: {state} {error:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = tokio::time::timeout(Duration::from_secs(10), cache.get(&set))
            .await
            .expect("a request is answered")
            .expect_err("the provider is unreachable");
        assert!(
            matches!(e, CacheError::Unavailable { .. }),
            "an ordinary transient failure: {e}"
        );
    }

    /// A token endpoint on loopback that answers every call `400 invalid_grant`.
    async fn refusing_token_endpoint() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    let _ = conn.read(&mut buf).await;
                    let body = r#"{"error":"invalid_grant"}"#;
                    let head = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all((head + body).as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_permanent_retry_beyond_the_clock_s_range_is_clamped_not_a_panic() {
        // `now + permanent_retry` overflows the clock (`--permanent-retry 500000000000y`):
        // that must neither kill the fetch task nor leave the key "refreshing" for good.
        let cache = offline_cache(Policy {
            permanent_retry: Duration::from_secs(500_000_000_000 * 31_557_600),
            request_wait: Duration::from_secs(5),
            ..Policy::default()
        });
        let set = sets_at(1, &refusing_token_endpoint().await).remove(0);
        let e = tokio::time::timeout(Duration::from_secs(10), cache.get(&set))
            .await
            .expect("answered")
            .expect_err("the grant is refused");
        assert!(matches!(e, CacheError::Failed { .. }), "{e}");
        let (state, error) = state_of(&cache, &set);
        assert_eq!(state, "failed_permanent");
        let error = error.expect("the failure is recorded");
        assert_eq!(error.code, "invalid_grant");
        assert!(error.retry_in_seconds > 86_400 * 365, "{error:?}");
    }

    #[tokio::test]
    async fn removing_a_key_removes_only_its_own_moka_entry() {
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        cache.get(&set).await.unwrap();
        cache.remove(&set.key).await;
        assert!(!cache.is_tracked(&set.key));
        assert!(cache.tokens.get(&set.key).await.is_none());

        // A removal that took the old record out, then a request still holding the old
        // config that made and published a new one, then the removal's moka step: the
        // new record's entry stays.
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        cache.get(&set).await.unwrap();
        let old_cell = cache.lock().remove(&set.key).unwrap().cell;
        token_without_entry(&cache, &set, Duration::from_secs(3600));
        let new_cell = cache.lock().get(&set.key).unwrap().cell.clone();
        cache.publish(&set.key, &new_cell).await;
        cache.unlist(&set.key, &old_cell).await;
        let entry = cache
            .tokens
            .get(&set.key)
            .await
            .expect("new record's entry kept");
        assert!(Arc::ptr_eq(&entry, &new_cell));
        // And a publish of the old cell, landing late, does not displace it.
        cache.publish(&set.key, &old_cell).await;
        let entry = cache.tokens.get(&set.key).await.unwrap();
        assert!(Arc::ptr_eq(&entry, &new_cell));
    }

    /// The per-state counts and the shortest token life, recounted from every record.
    fn recount(cache: &TokenCache) -> Snapshot {
        let status = cache.status();
        let accounts_by_state = KeyState::ALL
            .iter()
            .map(|st| {
                let n = status.iter().filter(|s| s.state == st.as_str()).count();
                (st.as_str(), n as u64)
            })
            .collect();
        let min_remaining = status
            .iter()
            .filter_map(|s| s.token_remaining_seconds)
            .min()
            .map(Duration::from_secs);
        Snapshot {
            accounts_by_state,
            min_remaining,
        }
    }

    fn assert_counts_exact(cache: &TokenCache, step: &str) {
        let kept = cache.snapshot();
        let counted = recount(cache);
        assert_eq!(
            kept.accounts_by_state, counted.accounts_by_state,
            "{step}: per-state counts"
        );
        assert_eq!(
            kept.min_remaining, counted.min_remaining,
            "{step}: min remaining"
        );
    }

    fn count_of(cache: &TokenCache, state: KeyState) -> u64 {
        cache
            .snapshot()
            .accounts_by_state
            .into_iter()
            .find(|(s, _)| *s == state.as_str())
            .map_or(0, |(_, n)| n)
    }

    #[tokio::test]
    async fn per_state_counts_stay_exact_through_every_transition() {
        let cache = offline_cache(Policy {
            request_wait: Duration::from_secs(2),
            ..Policy::default()
        });
        let s = sets(4);
        assert_counts_exact(&cache, "empty");

        // Tokens stored: ok, and the shortest life is the earliest expiry.
        token_without_entry(&cache, &s[0], Duration::from_secs(3600));
        token_without_entry(&cache, &s[1], Duration::from_secs(600));
        assert_eq!(count_of(&cache, KeyState::Ok), 2);
        assert_counts_exact(&cache, "two tokens");
        assert!(cache.snapshot().min_remaining.unwrap() <= Duration::from_secs(600));

        // A fetch under way: refreshing; it fails (the provider is unreachable):
        // failing_transient, with its token kept (still valid).
        let flight = cache.warm(&s[2]).expect("a fetch starts");
        assert_eq!(count_of(&cache, KeyState::Refreshing), 1);
        assert_counts_exact(&cache, "fetch under way");
        assert!(flight.await.is_err());
        assert_eq!(count_of(&cache, KeyState::FailingTransient), 1);
        assert_eq!(count_of(&cache, KeyState::Refreshing), 0);
        assert_counts_exact(&cache, "transient failure");

        // A forced refresh of a key with a token: refreshing, then failing.
        let _ = cache.force_refresh(&s[1]).await;
        assert_eq!(count_of(&cache, KeyState::FailingTransient), 2);
        assert_counts_exact(&cache, "forced refresh failed");

        // A permanent failure recorded for a key.
        let generation = cache.lock().get(&s[0].key).unwrap().generation;
        let permanent = ProviderError {
            class: ErrorClass::Permanent,
            ..ProviderError::transient(crate::provider::OAuthCode::InvalidGrant)
        };
        let _ = cache.fetch_failed(&s[0], generation, permanent);
        assert_eq!(count_of(&cache, KeyState::FailedPermanent), 1);
        assert_counts_exact(&cache, "permanent failure");

        // New credentials for a key reset it: ok, no token.
        let changed = sets_with_refresh_token(4, "other").remove(1);
        assert_ne!(changed.fingerprint, s[1].fingerprint);
        {
            let mut keys = cache.lock();
            cache.record_for(&mut keys, &changed);
        }
        assert_counts_exact(&cache, "credentials replaced");

        // Removing keys takes them out of every count and of the expiries.
        for set in &s {
            cache.remove(&set.key).await;
        }
        assert_counts_exact(&cache, "all removed");
        let empty = cache.snapshot();
        assert!(empty.accounts_by_state.iter().all(|(_, n)| *n == 0));
        assert_eq!(empty.min_remaining, None);
    }
}
