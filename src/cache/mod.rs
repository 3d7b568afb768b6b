//! The token cache: one [`KeyEntry`] per credential key, owned by moka, plus what moka
//! lacks — refresh-ahead, single-flight across cold misses *and* refreshes,
//! stale-while-error, and back-off that keeps a failing identity provider from being
//! hammered.
//!
//! A hit is one atomic load of the entry's token and a freshness check; the answer body
//! was serialized when the token was stored and is handed out as a refcounted `Bytes`.
//! Requests reach entries through the route table built at each reload
//! ([`crate::shared::Routes`]); moka is the index that owns them, and its eviction
//! listener is the one place a removed or replaced key's entry is retired. Each fetch
//! runs in a task of its own, so a client hanging up cannot cancel it; background
//! refreshes are due dates in one queue per provider ([`refresh`]).

mod entry;
mod refresh;
pub mod schedule;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::status::KeyStatus;
pub use entry::{CachedToken, Flight, KeyEntry, KeyState};
use entry::{DueId, EntryState, ExpirySecond, Failure, FetchResult, StateCounts};

use crate::config::CredentialSet;
use crate::credentials::CredentialKey;
use crate::metrics::{CacheEvent, Metrics, RefreshOutcome, Snapshot};
use crate::protocol;
use crate::provider::{ErrorClass, ExpiresIn, OurCode, ProviderError};
use crate::upstream::Upstream;
use refresh::RefreshQueue;
use schedule::{later, Freshness, Policy};

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
    /// The entry asked for was retired (its key was removed or got new credentials)
    /// while the request held it: the current routes have its successor.
    #[error("token not available yet: the account's credentials changed")]
    Superseded,
}

/// No token yet, for a transient reason; `next_attempt_in` is when the key's next
/// attempt is due, if known.
fn unavailable(next_attempt_in: Option<Duration>, reason: &str) -> CacheError {
    CacheError::Unavailable {
        retry_after: schedule::retry_hint(next_attempt_in),
        reason: reason.into(),
    }
}

/// The answer to a request that would need a fetch once shutdown began.
fn shutting_down() -> CacheError {
    unavailable(None, "the sidecar is shutting down")
}

/// What a held request does next (see [`TokenCache::fetch_or_join`]).
enum Step {
    /// Wait for this fetch's result.
    Join(Flight, Source),
    /// Sleep until the back-off ends (or the deadline), or until an attempt starts.
    Sleep(Instant, tokio::sync::futures::OwnedNotified),
}

/// Bookkeeping shared with moka's eviction listener: the per-state counts and the
/// refresh queues. Lock order: an entry's state, then the queues map, then one queue;
/// an entry's state, then the counts. moka is never called under any of them.
#[derive(Default)]
struct Books {
    counts: Mutex<StateCounts>,
    /// Refresh queues by provider name, made (and their tasks started) on first use.
    queues: Mutex<HashMap<Arc<str>, Arc<RefreshQueue>>>,
}

impl Books {
    fn queues(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<RefreshQueue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the counts up to date with `st` (after any change of its state or token).
    fn settle(&self, st: &mut EntryState) {
        let now = st.counted_now();
        if st.counted != now {
            // Each update is a few single operations: a poisoned table is at worst off by one.
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            counts.update(st.counted, now);
            st.counted = now;
        }
    }

    fn unschedule(&self, entry: &KeyEntry, st: &mut EntryState) {
        if let Some(id) = st.due.take() {
            if let Some(queue) = self.queues().get(&entry.set().provider_name) {
                queue.remove(id);
            }
        }
    }

    /// Retires an entry moka let go of: no token, no queued refresh, no count, and no
    /// fetch result is stored in it from now on.
    fn retire(&self, entry: &KeyEntry) {
        let mut st = entry.lock();
        st.retired = true;
        entry.token.store(None);
        // The flight holds the entry (and will hold its answer): kept here, an unawaited
        // background refresh would keep both alive for good. Joined requests keep theirs.
        let flight = st.inflight.take();
        self.unschedule(entry, &mut st);
        st.wake();
        self.settle(&mut st);
        drop(st);
        drop(flight);
    }
}

/// Spare tokens at most: a refreshed token is written into a replaced one (its `Arc`
/// and, when no response still sends it, its answer buffer; see
/// [`protocol::ValidTokenAnswer::to_bytes`]) passed on through this pool.
const SPARE_TOKENS: usize = 64;

/// Tokens allocated together when no spare fits. Pre-warm (and a map that grows) would
/// otherwise allocate each long-lived token between the short-lived buffers of its own
/// fetch, and every such buffer freed leaves a hole among the tokens that nothing
/// long-lived fills: one hole per token, tens of MB at 100k accounts (BENCHMARKS.md, P5).
const TOKEN_BATCH: usize = 32;
const _: () = assert!(TOKEN_BATCH <= SPARE_TOKENS);

/// A spare is used for an answer at most this much smaller than its buffer.
const SPARE_SLACK_MAX: usize = 128;

/// The token cache.
pub struct TokenCache {
    /// The one index of entries. No capacity or expiry: an entry lives as long as its
    /// key is configured; an expired token is never served (checked on every hit).
    index: moka::sync::Cache<CredentialKey, Arc<KeyEntry>>,
    books: Arc<Books>,
    /// Set once shutdown began: no fetch starts any more.
    closing: AtomicBool,
    upstream: Arc<Upstream>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Providers already warned about an `expires_in` over [`schedule::MAX_LIFETIME`].
    long_lifetime_warned: Mutex<HashSet<Arc<str>>>,
    /// Spare tokens, oldest first, with their answer buffer's capacity.
    spare_tokens: Mutex<Vec<(usize, Arc<CachedToken>)>>,
}

impl Drop for TokenCache {
    fn drop(&mut self) {
        for queue in self.books.queues().values() {
            queue.close();
        }
    }
}

impl TokenCache {
    /// A cache fetching through `upstream` with the given timing rules, sized for
    /// `expected_keys` keys (tables grown by doubling leave their freed halves behind as
    /// holes in the heap).
    pub fn new(
        upstream: Arc<Upstream>,
        policy: Policy,
        metrics: Arc<Metrics>,
        expected_keys: usize,
    ) -> Arc<Self> {
        let books = Arc::new(Books::default());
        let listener = {
            let books = books.clone();
            move |_key: Arc<CredentialKey>, entry: Arc<KeyEntry>, _cause| books.retire(&entry)
        };
        Arc::new(TokenCache {
            index: moka::sync::Cache::builder()
                .initial_capacity(expected_keys)
                .eviction_listener(listener)
                .build(),
            books,
            closing: AtomicBool::new(false),
            upstream,
            policy,
            metrics,
            long_lifetime_warned: Mutex::default(),
            spare_tokens: Mutex::default(),
        })
    }

    /// The timing rules.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The upstream the cache fetches through.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// A new entry for `set`, which becomes its key's with [`TokenCache::commit`].
    pub fn new_entry(&self, set: &Arc<CredentialSet>) -> Arc<KeyEntry> {
        KeyEntry::new(set.clone())
    }

    /// Makes `entry` its key's entry; the one it replaces is retired (by moka's eviction
    /// listener, before this returns, taking that entry's lock: never call this, or any
    /// method that calls moka, while holding an entry's lock).
    pub fn commit(&self, entry: &Arc<KeyEntry>) {
        let key = &entry.set().key;
        if !self.index.get(key).is_some_and(|e| Arc::ptr_eq(&e, entry)) {
            self.index.insert(key.clone(), entry.clone());
        }
    }

    /// The key's entry for `set`'s credentials, made and committed if there is none
    /// (tools and tests; the sidecar's entries are made by its routes).
    pub fn install(&self, set: &Arc<CredentialSet>) -> Arc<KeyEntry> {
        match self.index.get(&set.key) {
            Some(e) if e.is_for(set) => e,
            _ => {
                let entry = self.new_entry(set);
                self.commit(&entry);
                entry
            }
        }
    }

    /// The key's entry, if it is configured.
    pub fn entry(&self, key: &CredentialKey) -> Option<Arc<KeyEntry>> {
        self.index.get(key)
    }

    /// Forgets a key at once: its entry is retired (token, queued refresh, any result
    /// still in flight).
    pub fn remove(&self, key: &CredentialKey) {
        self.index.invalidate(key);
    }

    /// Serves a token from `entry`: from memory when fresh, else by joining (or starting)
    /// the one fetch for its key, waiting at most the policy's `request_wait` — and, when
    /// a still-valid token is in hand, only as long as that token stays servable.
    pub async fn get(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
    ) -> Result<(Bytes, Source), CacheError> {
        if let Some(body) = self.hit(entry) {
            return Ok((body, Source::Hit));
        }
        let cached = entry.token.load_full();
        // With a valid (aging) token in hand, a slow or stalled provider must not turn it
        // into a 429 by making the request wait past the token's servable life: wait at
        // most half of what is left of it, so it can still be served stale afterwards.
        let servable_for = cached.as_ref().map_or(Duration::ZERO, |tok| {
            tok.expires_at.saturating_duration_since(later(
                Instant::now(),
                schedule::stale_floor(tok.min_life()),
            ))
        });
        let wait = if servable_for.is_zero() {
            self.policy.request_wait
        } else {
            self.policy.request_wait.min(servable_for / 2)
        };
        match self
            .fetch_or_join(entry, wait, servable_for.is_zero())
            .await
        {
            Ok((tok, source)) => {
                self.metrics.cache_event(match source {
                    Source::Joined => CacheEvent::Joined,
                    _ => CacheEvent::Miss,
                });
                Ok((tok.body.clone(), source))
            }
            // Stale tokens keep a small floor of life so none expires on its way to
            // EmailEngine or in its hands.
            Err(e) => match cached {
                Some(tok)
                    if !matches!(e, CacheError::Superseded)
                        && tok.expires_at
                            > later(Instant::now(), schedule::stale_floor(tok.min_life())) =>
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

    /// The entry's token if it is fresh: a load, a clock read and a refcount bump. The
    /// hot path tries this before anything else, with no reference to the entry taken.
    pub fn hit(&self, entry: &KeyEntry) -> Option<Bytes> {
        let token = entry.token.load();
        let token = token
            .as_ref()
            .filter(|t| t.freshness(Instant::now()) == Freshness::Fresh)?;
        self.metrics.cache_event(CacheEvent::Hit);
        Some(token.body.clone())
    }

    /// Joins the fetch under way for the key, or starts one unless the key is backing
    /// off after a failure; waits for it at most `wait`.
    ///
    /// With `hold` (no servable token in hand), a transient failure does not end the
    /// request: it waits, within `wait`, for the key's next attempt (started by the
    /// refresh queue when the back-off ends, or by a waiter) and its result, because
    /// EmailEngine retries only a 429, at most five times (README, "Provider outages").
    /// It never starts an attempt the back-off schedule does not allow. A permanent
    /// failure ends the request at once.
    async fn fetch_or_join(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        wait: Duration,
        hold: bool,
    ) -> Result<(Arc<CachedToken>, Source), CacheError> {
        let deadline = later(Instant::now(), wait);
        let mut source = None;
        let mut last_joined: Option<Flight> = None;
        loop {
            let step = {
                let mut st = entry.lock();
                if st.retired {
                    return Err(CacheError::Superseded);
                }
                st.used = true;
                self.books.settle(&mut st);
                let now = Instant::now();
                // An attempt may have succeeded between a wake-up and this look: take its
                // token rather than start another one.
                if let Some(tok) = entry.fresh(now) {
                    return Ok((tok, source.unwrap_or(Source::Joined)));
                }
                if let Some(f) = &st.inflight {
                    Step::Join(f.clone(), Source::Joined)
                } else if let Some(fail) = st.failure.as_ref().filter(|f| f.retry_at > now) {
                    let until = schedule::hold_until(now, deadline, fail.retry_at);
                    if !hold
                        || fail.error.class == ErrorClass::Permanent
                        || until <= now
                        || self.is_closing()
                    {
                        let retry_in = fail.retry_at.saturating_duration_since(now);
                        return Err(self.error_from(entry.set(), &fail.error, Some(retry_in)));
                    }
                    // Woken early when an attempt starts (the refresh queue's, an admin
                    // refresh, another request's), to join it.
                    let news = st.waiters.get_or_insert_with(Default::default).clone();
                    Step::Sleep(until, news.notified_owned())
                } else {
                    match self.start_flight(entry, &mut st, None) {
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
                    // A flight that ended without its entry learning it (its task was
                    // cancelled) would be joined again and again: once is enough.
                    if last_joined.as_ref().is_some_and(|l| l.ptr_eq(&flight)) {
                        return Err(unavailable(None, "the token fetch was lost; it is retried"));
                    }
                    last_joined = Some(flight.clone());
                    match tokio::time::timeout_at(deadline, flight).await {
                        // Removed or replaced while the fetch ran: its token is of
                        // credentials no longer configured.
                        Ok(Ok(_)) if entry.lock().retired => return Err(CacheError::Superseded),
                        Ok(Ok(tok)) => return Ok((tok, source)),
                        Ok(Err(e)) if !hold || e.class == ErrorClass::Permanent => {
                            return Err(self.error_from(entry.set(), &e, None))
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

    /// Starts the entry's fetch (caller holds its lock and checked none is running). A
    /// background refresh passes its queue's slot, given back when the fetch ends.
    /// Starts nothing once shutdown began ([`TokenCache::close`]).
    fn start_flight(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        st: &mut EntryState,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Option<Flight> {
        if self.is_closing() || st.retired {
            return None;
        }
        let fetch = self.clone().run_fetch(entry.clone());
        Some(self.spawn_flight(entry, st, slot, fetch))
    }

    /// Runs `fetch` in a task of its own as the entry's flight. A fetch that panics or is
    /// cancelled ends like one that failed: its flight gets an error and the key backs off
    /// and retries (a background refresh's flight may have nobody awaiting it; left
    /// "refreshing", every request would join a flight that is over).
    fn spawn_flight(
        self: &Arc<Self>,
        entry: &Arc<KeyEntry>,
        st: &mut EntryState,
        slot: Option<OwnedSemaphorePermit>,
        fetch: impl std::future::Future<Output = FetchResult> + Send + 'static,
    ) -> Flight {
        let (this, task_entry) = (self.clone(), entry.clone());
        let handle = tokio::spawn(async move {
            let result = match std::panic::AssertUnwindSafe(fetch).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    let set = task_entry.set();
                    tracing::error!(account = %set.key.account, provider = %set.provider_name,
                        "token fetch panicked; it counts as a transient failure and is retried");
                    let e = ProviderError {
                        hint: Some("an internal error; please report it"),
                        ..ProviderError::transient(OurCode::FetchTaskFailed)
                    };
                    Err(this.fetch_failed(&task_entry, e))
                }
            };
            drop(slot);
            result
        });
        let (cache, flight_entry) = (Arc::downgrade(self), entry.clone());
        let flight = async move {
            match handle.await {
                Ok(r) => r,
                Err(_) => {
                    let e = ProviderError::transient(OurCode::FetchTaskFailed);
                    match cache.upgrade() {
                        Some(cache) => Err(cache.fetch_failed(&flight_entry, e)),
                        None => Err(Arc::new(e)),
                    }
                }
            }
        }
        .boxed()
        .shared();
        st.inflight = Some(flight.clone());
        st.wake();
        self.books.settle(st);
        flight
    }

    /// One upstream fetch and its bookkeeping; runs in its own task.
    async fn run_fetch(self: Arc<Self>, entry: Arc<KeyEntry>) -> FetchResult {
        let set = entry.set();
        let (grant, sent) = match self.upstream.fetch(set).await {
            Ok(fetched) => fetched,
            Err(e) => return Err(self.fetch_failed(&entry, e)),
        };
        // A rotated refresh token in this answer is kept already (`Upstream::fetch`),
        // whatever is wrong with the rest of it.
        let refused = |hint| ProviderError {
            hint: Some(hint),
            ..ProviderError::transient(OurCode::InvalidResponse)
        };
        let Some(access_token) = grant.access_token.as_ref() else {
            return Err(self.fetch_failed(&entry, refused("token response has no access_token")));
        };
        let answer = match protocol::ValidTokenAnswer::new(&set.user, access_token) {
            Ok(answer) => answer,
            Err(e) => {
                let hint = match e {
                    protocol::AnswerError::AccessToken => {
                        "the access token is longer than EmailEngine accepts"
                    }
                    protocol::AnswerError::AccessTokenCharacters => {
                        "the access token has characters a bearer token may not contain (RFC 6750)"
                    }
                    _ => "the answer would not pass EmailEngine's validation",
                };
                return Err(self.fetch_failed(&entry, refused(hint)));
            }
        };
        let lifetime = match grant.expires_in {
            ExpiresIn::Unusable => {
                let hint = "expires_in is not a number of seconds of at least 1";
                return Err(self.fetch_failed(&entry, refused(hint)));
            }
            ExpiresIn::Given(l) if l > schedule::MAX_LIFETIME => {
                self.warn_long_lifetime(set, l);
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
        let tok = self.new_token(&answer, later(sent.instant, lifetime), plan.min_life);
        self.metrics.refresh(&set.provider_name, RefreshOutcome::Ok);
        let replaced = {
            let mut st = entry.lock();
            if st.retired {
                // Removed or replaced meanwhile: the waiters get it, nobody else.
                None
            } else {
                // One swap: a request sees the old token or the new one, never none.
                let replaced = entry.token.swap(Some(tok.clone()));
                st.inflight = None;
                st.failure = None;
                st.last_ok = Some(SystemTime::now());
                st.expires = Some(tok.expires_at);
                self.books.settle(&mut st);
                self.schedule(&entry, &mut st, later(sent.instant, plan.refresh_after));
                replaced
            }
        };
        if let Some(old) = replaced {
            self.recycle(old);
        }
        Ok(tok)
    }

    /// A token for `answer`, written into a spare one whose buffer fits (a replaced
    /// token, or one of a batch allocated together).
    fn new_token(
        &self,
        answer: &protocol::ValidTokenAnswer<'_>,
        expires_at: Instant,
        min_life: Duration,
    ) -> Arc<CachedToken> {
        let len = answer.byte_len();
        let mut tok = {
            let mut pool = self.spare_tokens();
            let fits = |cap: usize| cap >= len && cap - len <= SPARE_SLACK_MAX;
            match pool.iter().rposition(|(cap, _)| fits(*cap)) {
                // `remove`, not `swap_remove`: the pool stays oldest first.
                Some(i) => pool.remove(i).1,
                None => {
                    let cap = protocol::answer_capacity(len);
                    let blank =
                        || CachedToken::new(protocol::blank_answer(cap), expires_at, min_life);
                    let first = Arc::new(blank());
                    // The oldest spares make room: they fit nothing lately.
                    let excess = (pool.len() + TOKEN_BATCH - 1).saturating_sub(SPARE_TOKENS);
                    pool.drain(..excess);
                    pool.extend((1..TOKEN_BATCH).map(|_| (cap, Arc::new(blank()))));
                    first
                }
            }
        };
        // Only tokens nothing else held went into the pool, and nothing can have cloned
        // one since.
        match Arc::get_mut(&mut tok) {
            Some(t) => {
                let previous = std::mem::take(&mut t.body);
                t.renew(answer.to_bytes(Some(previous)), expires_at, min_life);
                tok
            }
            None => Arc::new(CachedToken::new(
                answer.to_bytes(None),
                expires_at,
                min_life,
            )),
        }
    }

    fn spare_tokens(&self) -> MutexGuard<'_, Vec<(usize, Arc<CachedToken>)>> {
        self.spare_tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a replaced token for the next refresh, once nothing reads it (a response
    /// still sending its answer keeps the buffer; the token is then let go). Freeing each
    /// token and allocating its successor elsewhere leaves holes that other allocations
    /// split, until tens of MB of heap are unusable (BENCHMARKS.md, P5).
    fn recycle(&self, mut old: Arc<CachedToken>) {
        let Some(t) = Arc::get_mut(&mut old) else {
            return;
        };
        // The buffer's true capacity: what an answer may be held to (a lower bound would
        // let buffers drift, each reuse taking a shorter answer than the last).
        let Ok(buf) = std::mem::take(&mut t.body).try_into_mut() else {
            return;
        };
        let cap = buf.capacity();
        t.body = buf.freeze();
        let mut spare = self.spare_tokens();
        if spare.len() >= SPARE_TOKENS {
            spare.remove(0);
        }
        spare.push((cap, old));
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
        entry: &Arc<KeyEntry>,
        e: ProviderError,
    ) -> Arc<ProviderError> {
        let set = entry.set();
        let mut st = entry.lock();
        if e.code == crate::upstream::SHUTTING_DOWN && self.upstream.is_closed() {
            // Never sent: shutdown began while it waited its turn. Not a provider
            // failure, nothing to retry in this process.
            st.inflight = None;
            self.books.settle(&mut st);
            tracing::debug!(account = %set.key.account, "refresh not sent: shutting down");
            return Arc::new(e);
        }
        self.metrics.refresh(
            &set.provider_name,
            match e.class {
                ErrorClass::Transient => RefreshOutcome::Transient,
                ErrorClass::Permanent => RefreshOutcome::Permanent,
            },
        );
        if st.retired {
            // Every failed refresh gets its log line, but nothing is retried.
            tracing::warn!(account = %set.key.account, provider = %set.provider_name,
                class = e.class.as_str(), code = %e.code,
                provider_code = e.provider_code.as_deref().unwrap_or(""),
                hint = e.hint.unwrap_or(""), redirect_host = e.redirect_host.as_deref(),
                "token refresh failed (for credentials replaced since; not retried)");
            return Arc::new(e);
        }
        let consecutive = st.failure.as_ref().map_or(0, |f| f.consecutive) + 1;
        let delay = match e.class {
            ErrorClass::Permanent => self.policy.permanent_retry,
            ErrorClass::Transient => {
                schedule::backoff(consecutive, e.retry_after, &self.policy, fastrand::f64())
            }
        };
        let retry_at = later(Instant::now(), delay);
        tracing::warn!(account = %set.key.account, provider = %set.provider_name,
            class = e.class.as_str(), code = %e.code,
            provider_code = e.provider_code.as_deref().unwrap_or(""),
            hint = e.hint.unwrap_or(""), redirect_host = e.redirect_host.as_deref(),
            consecutive, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "token refresh failed");
        st.inflight = None;
        if st.expires.is_some_and(|at| at <= Instant::now()) {
            // Never servable again: free it rather than keep it until a refresh succeeds.
            entry.token.store(None);
            st.expires = None;
        }
        st.failure = Some(Box::new(Failure {
            error: e.clone(),
            at: SystemTime::now(),
            retry_at,
            consecutive,
        }));
        self.books.settle(&mut st);
        self.schedule(entry, &mut st, retry_at);
        Arc::new(e)
    }

    /// (Re)arms the entry's background refresh (caller holds its lock).
    fn schedule(self: &Arc<Self>, entry: &Arc<KeyEntry>, st: &mut EntryState, at: Instant) {
        self.books.unschedule(entry, st);
        if self.is_closing() {
            return;
        }
        let queue = {
            let mut queues = self.books.queues();
            queues
                .entry(entry.set().provider_name.clone())
                .or_insert_with(|| {
                    let queue = Arc::new(RefreshQueue::new(self.upstream.provider_cap()));
                    // Holds the cache weakly: dropping the cache closes the queue and ends it.
                    let cache = Arc::downgrade(self);
                    tokio::spawn(queue.clone().run(move |id, entry, slot| {
                        cache
                            .upgrade()
                            .map(|c| c.background_refresh(id, &entry, slot))
                            .is_some()
                    }));
                    queue
                })
                .clone()
        };
        st.due = Some(queue.insert(at, entry.clone()));
    }

    fn background_refresh(
        self: &Arc<Self>,
        id: DueId,
        entry: &Arc<KeyEntry>,
        slot: OwnedSemaphorePermit,
    ) {
        let mut st = entry.lock();
        // Only the queue entry the key still points at: a rescheduled key has removed
        // its old one, but it may have been taken just before.
        if st.due == Some(id) {
            st.due = None;
            if st.inflight.is_none() {
                let _detached = self.start_flight(entry, &mut st, Some(slot));
            }
        }
    }

    /// Makes sure a token for `entry` is there or on its way, without waiting: pre-warm,
    /// and accounts added or changed by a reload. Returns the fetch to await, if one runs.
    pub fn warm(self: &Arc<Self>, entry: &Arc<KeyEntry>) -> Option<Flight> {
        let mut st = entry.lock();
        if st.retired {
            return None;
        }
        st.used = true;
        self.books.settle(&mut st);
        if let Some(f) = &st.inflight {
            return Some(f.clone());
        }
        let now = Instant::now();
        let has_token = st.expires.is_some_and(|at| at > now);
        let backing_off = st.failure.as_ref().is_some_and(|f| f.retry_at > now);
        if has_token || backing_off {
            return None;
        }
        self.start_flight(entry, &mut st, None)
    }

    /// Fetches a new token for `entry` now, even if the cached one is fresh (admin
    /// action); joins a fetch already under way.
    pub async fn force_refresh(self: &Arc<Self>, entry: &Arc<KeyEntry>) -> Result<(), CacheError> {
        let flight = {
            let mut st = entry.lock();
            if st.retired {
                return Err(CacheError::Superseded);
            }
            st.used = true;
            self.books.settle(&mut st);
            match &st.inflight {
                Some(f) => f.clone(),
                None => {
                    let flight = self
                        .start_flight(entry, &mut st, None)
                        .ok_or_else(shutting_down)?;
                    st.forced_at = Some(Instant::now());
                    flight
                }
            }
        };
        // An operator's explicit refresh waits for its answer even where requests are
        // answered at once (`--request-wait 0s`).
        let wait = self.policy.request_wait.max(Duration::from_secs(10));
        match tokio::time::timeout(wait, flight).await {
            Ok(Ok(_)) if entry.lock().retired => Err(CacheError::Superseded),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.error_from(entry.set(), &e, None)),
            Err(_) => Err(unavailable(
                None,
                "the identity provider has not answered yet",
            )),
        }
    }

    /// How long until a forced refresh of every one of `entries` may start a new upstream
    /// call, when one was started less than `interval` ago; `None` if all may go now. An
    /// entry with a fetch under way needs no wait: a forced refresh joins that fetch.
    pub fn forced_refresh_wait(
        &self,
        entries: &[Arc<KeyEntry>],
        interval: Duration,
    ) -> Option<Duration> {
        let now = Instant::now();
        entries
            .iter()
            .filter_map(|e| {
                let st = e.lock();
                st.inflight.is_none().then_some(st.forced_at).flatten()
            })
            .map(|at| interval.saturating_sub(now.saturating_duration_since(at)))
            .filter(|wait| !wait.is_zero())
            .max()
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Begins shutdown: from this instant no fetch starts (requests, refresh queues,
    /// pre-warm, reloads, admin refreshes) and no upstream call is sent; calls already
    /// sent go on ([`Upstream::drain`] waits for them).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.upstream.close();
        for queue in self.books.queues().values() {
            queue.close();
        }
        // Requests held through a back-off stop waiting for an attempt that will not
        // start: each checks `closing` under its entry's lock before it sleeps.
        for (_, entry) in self.index.iter() {
            entry.lock().wake();
        }
    }

    /// Runs moka's pending housekeeping now (after a mass insert such as pre-warm), so
    /// that the first requests do not pay for it.
    pub fn run_pending_tasks(&self) {
        self.index.run_pending_tasks();
    }

    /// Whether the cache tracks `key`: it is configured and was asked for.
    pub fn is_tracked(&self, key: &CredentialKey) -> bool {
        self.index.get(key).is_some_and(|e| e.is_used())
    }

    /// The configured keys (asked for or not; see [`TokenCache::is_tracked`]).
    pub fn keys(&self) -> Vec<CredentialKey> {
        self.index.iter().map(|(k, _)| (*k).clone()).collect()
    }

    /// The status of `set`'s key if it is tracked under these credentials (O(1)).
    pub fn status_of(&self, set: &CredentialSet) -> Option<KeyStatus> {
        self.index
            .get(&set.key)
            .filter(|e| e.is_for(set))
            .and_then(|e| e.status())
    }

    /// Status of every tracked key, sorted by account (walks every key: for tests and
    /// tools, not for the serving thread).
    pub fn status(&self) -> Vec<KeyStatus> {
        let mut out: Vec<KeyStatus> = self.index.iter().filter_map(|(_, e)| e.status()).collect();
        out.sort_by(|a, b| a.account.cmp(&b.account).then(a.scopes.cmp(&b.scopes)));
        out
    }

    /// Tracked keys per state and the shortest remaining token life, from counts kept as
    /// keys change (no walk over the keys).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let counts = self.books.counts.lock().unwrap_or_else(|p| p.into_inner());
        // The second under way may still hold live tokens: it is the first one looked at.
        let min_remaining = counts
            .expiries
            .range(ExpirySecond::of(now)..)
            .next()
            .map(|(second, _)| Duration::from_secs(second.remaining_from(now).as_secs()));
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

    /// `n` accounts on one provider whose token endpoint is `token_url`.
    fn sets_with(n: usize, token_url: &str, rt: &str) -> Vec<Arc<CredentialSet>> {
        let accounts: serde_json::Map<String, serde_json::Value> = (0..n)
            .map(|i| {
                let account = serde_json::json!({"user": "u@example.com", "provider": "p", "refreshToken": rt});
                (format!("a{i}"), account)
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

    fn sets(n: usize) -> Vec<Arc<CredentialSet>> {
        sets_with(n, "http://127.0.0.1:1/t", "r")
    }

    /// A cache whose provider cannot be reached: any upstream call fails at once.
    fn offline_cache(policy: Policy) -> Arc<TokenCache> {
        let metrics = Arc::new(Metrics::new());
        let http = crate::upstream::http_client(Duration::from_secs(1)).unwrap();
        let store = Arc::new(crate::state::TokenStore::in_memory());
        let upstream = Arc::new(Upstream::new(http, store, 4, metrics.clone()));
        TokenCache::new(upstream, policy, metrics, 1)
    }

    #[tokio::test]
    async fn new_tokens_come_from_one_batch_and_replaced_ones_are_written_into() {
        let cache = offline_cache(Policy::default());
        use crate::secret::Secret;
        let (long, short) = (Secret::new("t".repeat(2000)), Secret::new("t".repeat(1000)));
        let answer = |t| protocol::ValidTokenAnswer::new("u@example.com", t).unwrap();
        let at = Instant::now() + Duration::from_secs(60);
        let life = Duration::from_secs(1);
        let first = cache.new_token(&answer(&long), at, life);
        // No spare fitted: the rest of a batch, all of the first one's size, waits.
        let spares: Vec<usize> = cache.spare_tokens().iter().map(|(cap, _)| *cap).collect();
        assert_eq!(spares.len(), TOKEN_BATCH - 1);
        assert!(spares
            .iter()
            .all(|cap| *cap == protocol::answer_capacity(first.body.len())));
        // The next ones take spares; the answer is the one asked for.
        let second = cache.new_token(&answer(&long), at, life);
        assert_eq!(cache.spare_tokens().len(), TOKEN_BATCH - 2);
        assert_eq!(second.body, answer(&long).to_bytes(None));
        // A much shorter answer does not take a 2 KB buffer: a batch of its own size.
        let small = cache.new_token(&answer(&short), at, life);
        assert_eq!(small.body, answer(&short).to_bytes(None));
        let pool = cache.spare_tokens().len();
        assert_eq!(pool, (2 * TOKEN_BATCH - 3).min(SPARE_TOKENS));
        // A replaced token goes back and is written into (its own buffer, no new one).
        let buffer = second.body.as_ptr();
        cache.recycle(second);
        assert_eq!(cache.spare_tokens().len(), (pool + 1).min(SPARE_TOKENS));
        let again = cache.new_token(&answer(&long), at, life);
        assert_eq!(again.body.as_ptr(), buffer);
        assert_eq!(again.body, answer(&long).to_bytes(None));
        // Never past the pool's bound.
        for _ in 0..3 * SPARE_TOKENS {
            let t = cache.new_token(&answer(&short), at, life);
            assert!(cache.spare_tokens().len() <= SPARE_TOKENS);
            cache.recycle(t);
            cache.recycle(cache.new_token(&answer(&long), at, life));
        }
        assert!(cache.spare_tokens().len() <= SPARE_TOKENS);
        drop((first, small, again));
    }

    #[tokio::test]
    async fn a_spare_buffer_is_held_to_its_true_capacity_so_buffers_do_not_drift() {
        use crate::secret::Secret;
        let cache = offline_cache(Policy::default());
        let token = |n| Secret::new("t".repeat(n));
        let (t2000, t1900, t1800) = (token(2000), token(1900), token(1800));
        let answer = |t| protocol::ValidTokenAnswer::new("u@example.com", t).unwrap();
        let at = Instant::now() + Duration::from_secs(60);
        let life = Duration::from_secs(1);
        let first = cache.new_token(&answer(&t2000), at, life);
        let buffer = first.body.as_ptr();
        cache.recycle(first);
        // 100 bytes shorter: within the slack of that buffer, which takes it.
        let shorter = cache.new_token(&answer(&t1900), at, life);
        assert_eq!(shorter.body.as_ptr(), buffer);
        cache.recycle(shorter);
        // Another 100 bytes shorter is too far below the buffer's true size, however
        // short its last answer was.
        let shortest = cache.new_token(&answer(&t1800), at, life);
        assert_ne!(shortest.body.as_ptr(), buffer);
        assert_eq!(shortest.body, answer(&t1800).to_bytes(None));
        // A token whose answer a response still holds is not kept.
        let held = shortest.body.clone();
        let before = cache.spare_tokens().len();
        cache.recycle(shortest);
        assert_eq!(cache.spare_tokens().len(), before);
        drop(held);
    }

    const BODY: &[u8] = b"{\"user\":\"u\",\"accessToken\":\"t\"}";

    /// Stores a token that lives `life` in `entry`, as a finished fetch would.
    fn store_token(cache: &Arc<TokenCache>, entry: &Arc<KeyEntry>, life: Duration) {
        let mut st = entry.lock();
        let expires_at = Instant::now() + life;
        entry.token.store(Some(Arc::new(CachedToken::new(
            Bytes::from_static(BODY),
            expires_at,
            Duration::from_secs(60),
        ))));
        st.used = true;
        st.inflight = None;
        st.failure = None;
        st.expires = Some(expires_at);
        cache.books.settle(&mut st);
        cache.schedule(entry, &mut st, expires_at);
        st.wake();
    }

    fn queued(cache: &TokenCache) -> usize {
        cache.books.queues().values().map(|q| q.len()).sum()
    }

    #[tokio::test]
    async fn the_refresh_queue_hands_out_what_is_due_in_order() {
        let q = RefreshQueue::new(1);
        let e: Vec<_> = sets(3).into_iter().map(KeyEntry::new).collect();
        let now = Instant::now();
        let late = q.insert(now + Duration::from_secs(30), e[0].clone());
        let early = q.insert(now + Duration::from_secs(10), e[1].clone());
        let gone = q.insert(now + Duration::from_secs(20), e[2].clone());
        q.remove(gone);
        let nothing_due = q.take_due(now).map(|(id, _)| id);
        assert_eq!(nothing_due, Err(Some(now + Duration::from_secs(10))));
        let then = now + Duration::from_secs(30);
        let mut got = Vec::new();
        while let Ok((id, entry)) = q.take_due(then) {
            got.push((id, entry.set().key.clone()));
        }
        let expected = vec![
            (early, e[1].set().key.clone()),
            (late, e[0].set().key.clone()),
        ];
        assert_eq!(
            got, expected,
            "earliest first; a removed one never comes out"
        );
        assert_eq!(q.take_due(then).map(|(id, _)| id), Err(None));
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn the_refresh_queue_forgets_removed_and_retired_entries() {
        let q = RefreshQueue::new(1);
        let now = Instant::now();
        let e: Vec<_> = sets(300).into_iter().map(KeyEntry::new).collect();
        let ids: Vec<_> = e
            .iter()
            .enumerate()
            .map(|(i, entry)| q.insert(now + Duration::from_secs(i as u64), entry.clone()))
            .collect();
        // Most removed (enough to compact the heap), and one entry nobody holds any more.
        for id in &ids[..250] {
            q.remove(*id);
        }
        let mut e = e;
        let retired = e.remove(260);
        let weak = Arc::downgrade(&retired);
        drop(retired);
        assert!(
            weak.upgrade().is_none(),
            "the queue does not keep an entry alive"
        );
        assert_eq!(q.len(), 50);
        let mut got = Vec::new();
        while let Ok((id, _)) = q.take_due(now + Duration::from_secs(300)) {
            got.push(id);
        }
        let expected: Vec<_> = ids[250..]
            .iter()
            .copied()
            .filter(|id| *id != ids[260])
            .collect();
        assert_eq!(
            got, expected,
            "in order, without the removed and the retired"
        );
    }

    #[tokio::test]
    async fn an_entry_earlier_than_all_others_wakes_the_queue() {
        let q = RefreshQueue::new(1);
        let e: Vec<_> = sets(2).into_iter().map(KeyEntry::new).collect();
        let now = Instant::now();
        q.insert(now + Duration::from_secs(60), e[0].clone());
        // The first insert was the earliest: it left a wake-up permit. Consume it.
        q.changed.notified().await;
        q.insert(now + Duration::from_secs(90), e[1].clone());
        let woke = tokio::time::timeout(Duration::from_millis(1), q.changed.notified()).await;
        assert!(woke.is_err(), "a later entry does not wake the queue");
        q.insert(now + Duration::from_secs(5), e[1].clone());
        let woke = tokio::time::timeout(Duration::from_millis(1), q.changed.notified()).await;
        assert!(woke.is_ok(), "an earlier entry does");
    }

    /// A removed key's entry is retired by moka's listener before `remove` returns:
    /// nothing serves, refreshes or counts it any more, and a fetch that ends on it
    /// afterwards stores nothing.
    #[tokio::test]
    async fn removing_a_key_retires_its_entry_in_one_step() {
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        let entry = cache.install(&set);
        store_token(&cache, &entry, Duration::from_secs(3600));
        assert_eq!(cache.get(&entry).await.unwrap().1, Source::Hit);
        assert_eq!(queued(&cache), 1);
        assert_eq!(cache.snapshot().accounts_by_state[0], ("ok", 1));

        cache.remove(&set.key);
        assert!(entry.token.load().is_none(), "its token is gone");
        assert_eq!(queued(&cache), 0, "its refresh is unqueued");
        assert_eq!(cache.snapshot().accounts_by_state[0], ("ok", 0));
        assert!(cache.entry(&set.key).is_none());
        assert!(matches!(
            cache.get(&entry).await,
            Err(CacheError::Superseded)
        ));
        assert!(cache.warm(&entry).is_none(), "no fetch starts on it");
        // A fetch result landing on it now (one started before the removal) is not kept.
        let upstream_answer = ProviderError::transient(crate::provider::ErrorCode::Http(503));
        let _ = cache.fetch_failed(&entry, upstream_answer);
        assert_eq!(queued(&cache), 0, "a failure on it schedules no retry");
        assert!(entry.status().is_some_and(|s| s.last_error.is_none()));
    }

    #[tokio::test]
    async fn new_credentials_for_a_key_retire_the_old_entry_and_keep_the_new_one() {
        let cache = offline_cache(Policy::default());
        let old_set = sets(1).remove(0);
        let new_set = sets_with(1, "http://127.0.0.1:1/t", "rotated-by-operator").remove(0);
        assert_eq!(old_set.key, new_set.key);
        let old = cache.install(&old_set);
        store_token(&cache, &old, Duration::from_secs(3600));
        let new = cache.new_entry(&new_set);
        cache.commit(&new);
        assert!(
            old.token.load().is_none(),
            "the old credentials' token is never served"
        );
        assert!(matches!(cache.get(&old).await, Err(CacheError::Superseded)));
        assert!(Arc::ptr_eq(&cache.entry(&new_set.key).unwrap(), &new));
        // Committing the current entry again changes nothing (it is not retired).
        cache.commit(&new);
        store_token(&cache, &new, Duration::from_secs(3600));
        assert_eq!(cache.get(&new).await.unwrap().1, Source::Hit);
        assert_eq!(cache.snapshot().accounts_by_state[0], ("ok", 1));
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
        let entry = cache.install(&sets(1).remove(0));
        // A first attempt fails (nothing listens at the token URL): the key backs off
        // 2-4 s, within the held request's 5 s.
        let first = cache.warm(&entry).expect("a fetch starts");
        assert!(first.await.is_err());
        let held = tokio::spawn({
            let (cache, entry) = (cache.clone(), entry.clone());
            async move { cache.get(&entry).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The retry started and succeeded before the woken request took the lock.
        store_token(&cache, &entry, Duration::from_secs(3600));
        let got = tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .expect("answered at once, not at the end of its hold")
            .unwrap();
        let (body, _) = got.expect("the token the attempt stored");
        assert_eq!(&body[..], BODY);
        assert!(
            entry.lock().inflight.is_none(),
            "no second refresh was started"
        );
    }

    fn state_of(entry: &KeyEntry) -> (&'static str, Option<crate::status::ErrorStatus>) {
        let s = entry.status().expect("tracked");
        (s.state, s.last_error)
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
        let entry = cache.install(&sets(1).remove(0));
        let flight = {
            let mut st = entry.lock();
            st.used = true;
            cache.spawn_flight(&entry, &mut st, None, async {
                panic!("a fetch that panics")
            })
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
        let (state, error) = state_of(&entry);
        assert_eq!(state, "failing_transient");
        assert_eq!(error.map(|e| e.code).as_deref(), Some("fetch_task_failed"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (state, error) = state_of(&entry);
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
        let e = tokio::time::timeout(Duration::from_secs(10), cache.get(&entry))
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
        let url = refusing_token_endpoint().await;
        let entry = cache.install(&sets_with(1, &url, "r").remove(0));
        let e = tokio::time::timeout(Duration::from_secs(10), cache.get(&entry))
            .await
            .expect("answered")
            .expect_err("the grant is refused");
        assert!(matches!(e, CacheError::Failed { .. }), "{e}");
        let (state, error) = state_of(&entry);
        assert_eq!(state, "failed_permanent");
        let error = error.expect("the failure is recorded");
        assert_eq!(error.code, "invalid_grant");
        assert!(error.retry_in_seconds > 86_400 * 365, "{error:?}");
    }

    /// The per-state counts and the shortest token life, recounted from every entry.
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
        let (kept, counted) = (cache.snapshot(), recount(cache));
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
        cache.snapshot().accounts_by_state[state as usize].1
    }

    #[tokio::test]
    async fn per_state_counts_stay_exact_through_every_transition() {
        let cache = offline_cache(Policy {
            request_wait: Duration::from_secs(2),
            ..Policy::default()
        });
        let e: Vec<_> = sets(4).iter().map(|s| cache.install(s)).collect();
        assert_counts_exact(&cache, "configured, never asked for");

        // Tokens stored: ok, and the shortest life is the earliest expiry.
        store_token(&cache, &e[0], Duration::from_secs(3600));
        store_token(&cache, &e[1], Duration::from_secs(600));
        assert_eq!(count_of(&cache, KeyState::Ok), 2);
        assert_counts_exact(&cache, "two tokens");
        assert!(cache.snapshot().min_remaining.unwrap() <= Duration::from_secs(600));

        // A fetch under way: refreshing; it fails (the provider is unreachable):
        // failing_transient.
        let flight = cache.warm(&e[2]).expect("a fetch starts");
        assert_eq!(count_of(&cache, KeyState::Refreshing), 1);
        assert_counts_exact(&cache, "fetch under way");
        assert!(flight.await.is_err());
        assert_eq!(count_of(&cache, KeyState::FailingTransient), 1);
        assert_eq!(count_of(&cache, KeyState::Refreshing), 0);
        assert_counts_exact(&cache, "transient failure");

        // A forced refresh of a key with a token: refreshing, then failing.
        let _ = cache.force_refresh(&e[1]).await;
        assert_eq!(count_of(&cache, KeyState::FailingTransient), 2);
        assert_counts_exact(&cache, "forced refresh failed");

        // A permanent failure recorded for a key.
        let permanent = ProviderError {
            class: ErrorClass::Permanent,
            ..ProviderError::transient(crate::provider::OAuthCode::InvalidGrant)
        };
        let _ = cache.fetch_failed(&e[0], permanent);
        assert_eq!(count_of(&cache, KeyState::FailedPermanent), 1);
        assert_counts_exact(&cache, "permanent failure");

        // New credentials for a key: the old entry leaves every count.
        let changed = sets_with(4, "http://127.0.0.1:1/t", "other").remove(1);
        cache.commit(&cache.new_entry(&changed));
        assert_counts_exact(&cache, "credentials replaced");

        // Removing keys takes them out of every count and of the expiries.
        for entry in &e {
            cache.remove(&entry.set().key);
        }
        assert_counts_exact(&cache, "all removed");
        let empty = cache.snapshot();
        assert!(empty.accounts_by_state.iter().all(|(_, n)| *n == 0));
        assert_eq!(empty.min_remaining, None);
    }

    /// A fetch of `entry` that answers with a token once `released` fires.
    fn held_fetch(
        cache: &Arc<TokenCache>,
        entry: &Arc<KeyEntry>,
        released: tokio::sync::oneshot::Receiver<()>,
    ) -> Flight {
        let answer = Arc::new(CachedToken::new(
            Bytes::from_static(BODY),
            Instant::now() + Duration::from_secs(3600),
            Duration::from_secs(60),
        ));
        let mut st = entry.lock();
        st.used = true;
        cache.spawn_flight(entry, &mut st, None, async move {
            let _ = released.await;
            Ok(answer)
        })
    }

    /// Review finding: a retired entry kept its flight, and the flight kept the entry
    /// (and, once done, its answer): a background refresh under way when a reload removed
    /// or changed its key kept the old credentials and an access token in memory for good.
    #[tokio::test]
    async fn a_retired_entry_with_a_fetch_under_way_is_freed_when_the_fetch_ends() {
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        let entry = cache.install(&set);
        let (release, released) = tokio::sync::oneshot::channel();
        // Nobody awaits it, as with a background refresh.
        drop(held_fetch(&cache, &entry, released));
        let weak = Arc::downgrade(&entry);
        cache.remove(&set.key);
        drop(entry);
        release.send(()).unwrap();
        for _ in 0..200 {
            // moka lets go of a removed value at its next housekeeping.
            cache.run_pending_tasks();
            if weak.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the retired entry (old credentials, its answer) is still in memory");
    }

    /// Review finding: a request that joined a fetch, whose key was then removed or got
    /// new credentials, was given that fetch's token.
    #[tokio::test]
    async fn a_request_joined_to_a_fetch_of_retired_credentials_is_not_given_its_token() {
        let cache = offline_cache(Policy::default());
        let set = sets(1).remove(0);
        let entry = cache.install(&set);
        let (release, released) = tokio::sync::oneshot::channel();
        let _flight = held_fetch(&cache, &entry, released);
        let waiting = tokio::spawn({
            let (cache, entry) = (cache.clone(), entry.clone());
            async move { cache.get(&entry).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        cache.remove(&set.key);
        release.send(()).unwrap();
        let got = waiting.await.unwrap();
        assert!(matches!(got, Err(CacheError::Superseded)), "{got:?}");
        let forced =
            tokio::time::timeout(Duration::from_secs(5), cache.force_refresh(&entry)).await;
        assert!(
            matches!(forced, Ok(Err(CacheError::Superseded))),
            "{forced:?}"
        );
    }
}
