//! One credential key's record: its token, read by a hit with one atomic load, and the
//! coordination state behind a short per-key lock (never held across an await).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::schedule::{self, Freshness};
use crate::config::CredentialSet;
use crate::provider::{ErrorClass, ErrorCode, OurCode, ProviderError};
use crate::status::{rfc3339, ErrorStatus, KeyStatus};

/// A token as served: the answer serialized once, and its timing.
#[derive(Debug)]
pub struct CachedToken {
    /// `{"user","accessToken"}`.
    pub body: Bytes,
    /// When it expires (measured from when the request was sent, to be safe).
    pub expires_at: Instant,
    /// Served as fresh only with at least this much life left: whole milliseconds,
    /// rounded up (a token is kept for every key, so its size counts).
    min_life_ms: u32,
}

impl CachedToken {
    /// A token served as fresh while it has at least `min_life` left.
    pub fn new(body: Bytes, expires_at: Instant, min_life: Duration) -> Self {
        CachedToken {
            body,
            expires_at,
            min_life_ms: millis_up(min_life),
        }
    }

    /// The least life left with which it is served as fresh.
    pub fn min_life(&self) -> Duration {
        Duration::from_millis(u64::from(self.min_life_ms))
    }

    /// Makes this token, whose answer buffer was taken, a new one.
    pub(super) fn renew(&mut self, body: Bytes, expires_at: Instant, min_life: Duration) {
        *self = CachedToken::new(body, expires_at, min_life);
    }

    pub(super) fn freshness(&self, now: Instant) -> Freshness {
        schedule::freshness(self.expires_at.checked_duration_since(now), self.min_life())
    }
}

fn millis_up(d: Duration) -> u32 {
    u32::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u32::MAX)
}

pub(super) type FetchResult = Result<Arc<CachedToken>, Arc<ProviderError>>;
/// A fetch under way, awaitable by any number of callers.
pub type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// An entry of a refresh queue: when, and a sequence number that makes it unique.
pub(super) type DueId = (Instant, u64);

/// The record of one credential key, made for one version of its credentials: new
/// credentials for the key make a new record. Owned by the cache's index (moka); when
/// moka lets go of it (the key was removed or got new credentials) it is retired, and a
/// retired record never stores a token, starts a fetch or comes back.
pub struct KeyEntry {
    set: Arc<CredentialSet>,
    pub(super) token: ArcSwapOption<CachedToken>,
    state: Mutex<EntryState>,
}

#[derive(Default)]
pub(super) struct EntryState {
    pub retired: bool,
    /// Asked for, warmed or refreshed at least once: shown with its full status and
    /// counted (a set nobody asked for is `idle`).
    pub used: bool,
    pub inflight: Option<Flight>,
    /// Rare: boxed to keep the record small.
    pub failure: Option<Box<Failure>>,
    pub last_ok: Option<SystemTime>,
    /// Expiry of the stored token (the wall-clock time shown is derived from it).
    pub expires: Option<Instant>,
    /// The key's entry in its provider's refresh queue.
    pub due: Option<DueId>,
    /// Requests held through a back-off, woken when the key's next attempt starts.
    pub waiters: Option<Arc<Notify>>,
    /// When a forced refresh (admin API) last started an upstream call.
    pub forced_at: Option<Instant>,
    /// What [`StateCounts`] counts this record as (see [`EntryState::counted_now`]).
    pub counted: Option<Counted>,
}

/// The last failure of a key and when to try again.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub error: ProviderError,
    pub at: SystemTime,
    pub retry_at: Instant,
    pub consecutive: u32,
}

impl KeyEntry {
    pub(super) fn new(set: Arc<CredentialSet>) -> Arc<Self> {
        Arc::new(KeyEntry {
            set,
            token: ArcSwapOption::empty(),
            state: Mutex::default(),
        })
    }

    /// The credentials this record was made for.
    pub fn set(&self) -> &Arc<CredentialSet> {
        &self.set
    }

    /// Whether this record was made for `set`'s credentials (a changed secret, scope or
    /// provider means another record).
    pub fn is_for(&self, set: &CredentialSet) -> bool {
        self.set.fingerprint == set.fingerprint
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, EntryState> {
        // Every critical section leaves the state whole before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored token if it is fresh.
    pub(super) fn fresh(&self, now: Instant) -> Option<Arc<CachedToken>> {
        self.token
            .load_full()
            .filter(|t| t.freshness(now) == Freshness::Fresh)
    }

    /// Whether the key was ever asked for under these credentials.
    pub fn is_used(&self) -> bool {
        self.lock().used
    }

    /// The key's status, or `None` while nobody asked for it (O(1): one short lock).
    pub fn status(&self) -> Option<KeyStatus> {
        let st = self.lock();
        st.used.then(|| st.status(&self.set, Instant::now()))
    }
}

impl EntryState {
    pub fn state(&self) -> KeyState {
        if self.inflight.is_some() {
            return KeyState::Refreshing;
        }
        match self
            .failure
            .as_ref()
            .map(|f| (f.error.class, &f.error.code))
        {
            Some((_, ErrorCode::Ours(OurCode::ConsentRequired))) => KeyState::NeedsConsent,
            Some((ErrorClass::Permanent, _)) => KeyState::FailedPermanent,
            Some((ErrorClass::Transient, _)) => KeyState::FailingTransient,
            None => KeyState::Ok,
        }
    }

    /// What the counts should hold for this record now: nothing once retired or while
    /// unused.
    pub fn counted_now(&self) -> Option<Counted> {
        (self.used && !self.retired).then(|| Counted {
            state: self.state(),
            expires: self.expires.map(ExpirySecond::of),
        })
    }

    /// Wakes the requests held on the key: each looks at it again.
    pub fn wake(&mut self) {
        if let Some(waiters) = self.waiters.take() {
            waiters.notify_waiters();
        }
    }

    fn status(&self, set: &CredentialSet, now: Instant) -> KeyStatus {
        let remaining = self.expires.and_then(|at| at.checked_duration_since(now));
        let remaining = remaining.filter(|r| !r.is_zero());
        KeyStatus {
            account: set.key.account.to_string(),
            provider: set.provider_name.to_string(),
            grant: set.grant.as_str(),
            scopes: set.scopes.clone(),
            state: self.state().as_str(),
            token_expires_at: remaining.map(|r| {
                rfc3339(
                    SystemTime::now()
                        .checked_add(r)
                        .unwrap_or(SystemTime::now()),
                )
            }),
            token_remaining_seconds: remaining.map(|r| r.as_secs()),
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

/// The state of a key, as the admin API and the `ee_auth_accounts` gauge show it.
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
    /// No refresh token yet: the mailbox owner must consent (`consent` command).
    NeedsConsent,
}

impl KeyState {
    /// Every state, in the order of [`StateCounts`]' table.
    pub const ALL: [KeyState; 5] = [
        KeyState::Ok,
        KeyState::Refreshing,
        KeyState::FailingTransient,
        KeyState::FailedPermanent,
        KeyState::NeedsConsent,
    ];

    /// The name shown in the admin API and as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Ok => "ok",
            KeyState::Refreshing => "refreshing",
            KeyState::FailingTransient => "failing_transient",
            KeyState::FailedPermanent => "failed_permanent",
            KeyState::NeedsConsent => "needs_consent",
        }
    }
}

/// What one record contributes to [`StateCounts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Counted {
    state: KeyState,
    expires: Option<ExpirySecond>,
}

/// A token's expiry to the whole second, counted from the first one asked for: the
/// counts need only the shortest remaining life in seconds, and tokens expiring in the
/// same second share one entry of [`StateCounts::expiries`] instead of one each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ExpirySecond(u32);

impl ExpirySecond {
    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    /// The second `at` falls in (instants before the base count as its first second).
    pub fn of(at: Instant) -> Self {
        let secs = at.saturating_duration_since(Self::base()).as_secs();
        ExpirySecond(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// Time from `now` to this second's start: at most a second short of the life left
    /// to the tokens in it (never more), zero once the second has begun.
    pub fn remaining_from(self, now: Instant) -> Duration {
        let start = Self::base().checked_add(Duration::from_secs(u64::from(self.0)));
        start.map_or(Duration::MAX, |s| s.saturating_duration_since(now))
    }
}

/// Keys per state and the expiry of every stored token, kept as records change rather
/// than recounted: a scrape reads four numbers and the first entry of a tree.
#[derive(Default)]
pub(super) struct StateCounts {
    pub by_state: [u64; KeyState::ALL.len()],
    /// Second of expiry -> how many stored tokens expire in it.
    pub expiries: BTreeMap<ExpirySecond, u32>,
}

impl StateCounts {
    /// Moves a record from what it was counted as to what it is now.
    pub fn update(&mut self, before: Option<Counted>, now: Option<Counted>) {
        if let Some(c) = before {
            let n = &mut self.by_state[c.state as usize];
            *n = n.saturating_sub(1);
            if let Some(at) = c.expires {
                if let std::collections::btree_map::Entry::Occupied(mut e) = self.expiries.entry(at)
                {
                    *e.get_mut() = e.get().saturating_sub(1);
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
            }
        }
        if let Some(c) = now {
            let n = &mut self.by_state[c.state as usize];
            *n = n.saturating_add(1);
            if let Some(at) = c.expires {
                let n = self.expiries.entry(at).or_default();
                *n = n.saturating_add(1);
            }
        }
    }
}
