//! One upstream token fetch, with the rules that span providers: refresh tokens are
//! spent one at a time per account, the newest one is persisted before anything from
//! the answer is used, and each provider gets at most N concurrent calls.
//!
//! Every call sent is registered until its answer (and a rotated token's write) is
//! done: shutdown closes the gate — no call is sent after that — and waits for the
//! registered ones, naming those still unanswered when its grace runs out.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::config::CredentialSet;
use crate::credentials::Grant;
use crate::metrics::Metrics;
use crate::provider::{ErrorCode, OAuthCode, OurCode, ProviderError, TokenGrant, TokenRequest};
use crate::state::TokenStore;

/// The HTTP client and the shared limits for token fetches.
pub struct Upstream {
    http: reqwest::Client,
    store: Arc<TokenStore>,
    provider_cap: usize,
    caps: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    account_locks: Mutex<HashMap<Arc<str>, AccountLock>>,
    metrics: Arc<Metrics>,
    calls: Mutex<Calls>,
    /// How many calls are registered, for [`Upstream::drain`] to wait on.
    calls_count: watch::Sender<usize>,
    /// Accounts that need a new refresh token (`pickup` looks for theirs).
    awaiting: Arc<Awaiting>,
}

/// Calls sent to providers and not finished yet; `closing` once shutdown began.
#[derive(Default)]
struct Calls {
    closing: bool,
    next_id: u64,
    sent: HashMap<u64, SentCall>,
}

/// A call under way, as shutdown reports it when it is not answered in time.
#[derive(Clone, Debug)]
pub struct SentCall {
    /// The account.
    pub account: Arc<str>,
    /// The provider's name in the config.
    pub provider: Arc<str>,
    /// The grant: a refresh_token call may have rotated the account's token.
    pub grant: Grant,
}

/// A registered call; dropping it (when the fetch and its write are done, or the fetch
/// is cancelled) unregisters it.
struct CallGuard<'a> {
    upstream: &'a Upstream,
    id: u64,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut calls = self.upstream.calls_lock();
        calls.sent.remove(&self.id);
        self.upstream.calls_count.send_replace(calls.sent.len());
    }
}

/// Builds the HTTP client for identity providers: rustls with the ring provider and
/// the webpki roots, certificate verification always on, bounded timeouts, and no
/// redirects: following one would re-send the refresh token, client secret or assertion
/// to whatever host the `Location` names (a 3xx is reported as an error instead).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("ee-auth-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
}

impl Upstream {
    /// Fetches through `http`, persisting rotations in `store`, at most `provider_cap`
    /// concurrent calls per provider.
    pub fn new(
        http: reqwest::Client,
        store: Arc<TokenStore>,
        provider_cap: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Upstream {
            http,
            store,
            provider_cap: provider_cap.max(1),
            caps: Mutex::new(HashMap::new()),
            account_locks: Mutex::new(HashMap::new()),
            metrics,
            calls: Mutex::new(Calls::default()),
            calls_count: watch::Sender::new(0),
            awaiting: Arc::default(),
        }
    }

    /// The accounts that wait for a refresh token (no token at all, or `invalid_grant`).
    pub fn awaiting(&self) -> Arc<Awaiting> {
        self.awaiting.clone()
    }

    fn calls_lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        // Single-step updates: a poisoned map is still whole.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a call about to be sent, unless shutdown began.
    fn begin_call(&self, set: &CredentialSet) -> Option<CallGuard<'_>> {
        let mut calls = self.calls_lock();
        if calls.closing {
            return None;
        }
        let id = calls.next_id;
        calls.next_id = calls.next_id.wrapping_add(1);
        calls.sent.insert(
            id,
            SentCall {
                account: set.key.account.clone(),
                provider: set.provider_name.clone(),
                grant: set.grant,
            },
        );
        self.calls_count.send_replace(calls.sent.len());
        Some(CallGuard { upstream: self, id })
    }

    /// Closes the gate: from now on no call is sent (a fetch that gets this far fails
    /// with `shutting_down`). Calls already sent go on.
    pub fn close(&self) {
        self.calls_lock().closing = true;
    }

    /// Whether [`Upstream::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.calls_lock().closing
    }

    /// Waits until every call sent has finished (its rotated token written), or until
    /// `deadline`; returns the calls still under way then.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> Vec<SentCall> {
        let mut count = self.calls_count.subscribe();
        let _ = tokio::time::timeout_at(deadline, count.wait_for(|n| *n == 0)).await;
        self.calls_lock().sent.values().cloned().collect()
    }

    /// How many concurrent calls one provider may get.
    pub fn provider_cap(&self) -> usize {
        self.provider_cap
    }

    fn cap(&self, provider: &Arc<str>) -> Arc<Semaphore> {
        let mut caps = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        caps.entry(provider.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.provider_cap)))
            .clone()
    }

    fn account_locks(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, AccountLock>> {
        self.account_locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn account_lock(&self, account: &Arc<str>) -> AccountLock {
        self.account_locks()
            .entry(account.clone())
            .or_default()
            .clone()
    }

    /// Drops the account's lock from the map once nobody holds or waits for it: locks
    /// exist only while a refresh is under way, not one per account forever. Every clone
    /// is made under the map's lock, so a count of 1 (the map's own) cannot race a taker.
    fn release_account_lock(&self, account: &Arc<str>) {
        let mut locks = self.account_locks();
        if locks
            .get(account)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(account);
        }
    }

    /// Fetches one token for `set`.
    ///
    /// For the refresh_token grant the account's lock is held across the upstream call on
    /// purpose: two credential sets of one account must not spend the same refresh token
    /// concurrently (a rotating provider would revoke one of them). This is off the
    /// request hot path; cached tokens are served without it.
    ///
    /// Returns the grant and when the request went out (after any queueing): the
    /// token's lifetime counts from then, which is safe (the provider issues it later)
    /// without losing the time spent waiting for the account lock or the provider cap.
    pub async fn fetch(&self, set: &CredentialSet) -> Result<(TokenGrant, SentAt), ProviderError> {
        let _held = match set.grant {
            Grant::RefreshToken => {
                let lock = self.account_lock(&set.key.account);
                let mut held = HeldAccountLock {
                    upstream: self,
                    account: &set.key.account,
                    guard: None,
                };
                held.guard = Some(lock.lock_owned().await);
                Some(held)
            }
            _ => None,
        };
        let result = self.fetch_locked(set).await;
        if set.grant == Grant::RefreshToken {
            match &result {
                Ok(_) => self.awaiting.remove(&set.key.account),
                Err(e) if waits_for_a_token(e) => self.awaiting.add(&set.key.account),
                Err(_) => {}
            }
        }
        result
    }

    /// [`Upstream::fetch`] once the account's lock (if its grant needs one) is held.
    async fn fetch_locked(
        &self,
        set: &CredentialSet,
    ) -> Result<(TokenGrant, SentAt), ProviderError> {
        let account = &set.key.account;
        let spend = match set.grant {
            Grant::RefreshToken => match self.store.current(account, set.refresh_token.as_ref()) {
                Some(spend) => Some(spend),
                // Nothing to spend: no call, the account waits for consent.
                None => return Err(consent_required()),
            },
            _ => None,
        };
        let permit = self
            .cap(&set.provider_name)
            .acquire_owned()
            .await
            .map_err(|_| ProviderError::transient(SHUTTING_DOWN))?;
        let req = TokenRequest {
            grant: set.grant,
            scopes: &set.scopes,
            scopes_explicit: set.scopes_explicit,
            refresh_token: spend.as_ref().map(|(t, _)| t),
            subject: &set.user,
        };
        // Registered until the answer is handled and a rotated token written: shutdown
        // waits for exactly these.
        let Some(_call) = self.begin_call(set) else {
            return Err(ProviderError::transient(SHUTTING_DOWN));
        };
        let started = std::time::Instant::now();
        let sent_at = SentAt {
            instant: tokio::time::Instant::now(),
            wall: std::time::SystemTime::now(),
        };
        let result = set.provider.fetch(&self.http, &req).await;
        drop(permit);
        self.metrics
            .upstream_latency(&set.provider_name, started.elapsed());
        let grant = result?;
        if let (Some(new), Some((old, origin))) = (&grant.refresh_token, &spend) {
            if new != old {
                if let Err(e) = self.store.rotate(account, *origin, new.clone()).await {
                    self.metrics.persist_failure();
                    tracing::error!(account = %account, error = %e,
                        "could not write a rotated refresh token to the state directory; it is kept in memory and used, and the write is retried (the account is lost if the sidecar stops before a write succeeds)");
                }
            }
        }
        Ok((grant, sent_at))
    }
}

/// The error code of a fetch refused because shutdown began.
pub const SHUTTING_DOWN: ErrorCode = ErrorCode::Ours(OurCode::ShuttingDown);

/// Serializes refresh-token spends of one account.
type AccountLock = Arc<tokio::sync::Mutex<()>>;

/// An account's refresh lock, held; dropping it (also when the fetch is cancelled)
/// unlocks it and removes it from the map if nobody else holds or waits for it.
struct HeldAccountLock<'a> {
    upstream: &'a Upstream,
    account: &'a Arc<str>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for HeldAccountLock<'_> {
    fn drop(&mut self) {
        self.guard.take();
        self.upstream.release_account_lock(self.account);
    }
}

/// When a token request was sent, on the monotonic and the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct SentAt {
    /// Monotonic (tokio's clock, so paused-time tests move it).
    pub instant: tokio::time::Instant,
    /// Wall clock, for status pages.
    pub wall: std::time::SystemTime,
}

/// What a `refresh_token` fetch answers when there is no refresh token to spend.
pub fn consent_required() -> ProviderError {
    ProviderError {
        class: crate::provider::ErrorClass::Permanent,
        hint: Some(CONSENT_HINT),
        ..ProviderError::transient(OurCode::ConsentRequired)
    }
}

/// What the operator does about an account waiting for consent.
pub const CONSENT_HINT: &str = "no refresh token yet: the mailbox owner must sign in; run `ee-auth-sidecar consent --config FILE --state-dir DIR ACCOUNT` (the sidecar's state directory) or press Start sign-in on the operator page /ui; the sidecar uses the stored token at once";

/// Whether a failure means the account needs a new refresh token from a person.
pub fn waits_for_a_token(e: &ProviderError) -> bool {
    matches!(
        e.code,
        ErrorCode::Ours(OurCode::ConsentRequired) | ErrorCode::Provider(OAuthCode::InvalidGrant)
    )
}

/// The accounts waiting for a refresh token, ordered so that rounds can take turns.
#[derive(Default)]
pub struct Awaiting {
    accounts: Mutex<BTreeSet<Arc<str>>>,
}

impl Awaiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Arc<str>>> {
        // Single-step updates: a poisoned set is still whole.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `account` waits for a token.
    pub fn add(&self, account: &Arc<str>) {
        let mut a = self.lock();
        if !a.contains(account) {
            a.insert(account.clone());
        }
    }

    /// `account` has a working token (a cheap check first: nearly every call is for an
    /// account that is not waiting).
    pub fn remove(&self, account: &str) {
        let mut a = self.lock();
        if !a.is_empty() {
            a.remove(account);
        }
    }

    /// How many accounts wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` waiting accounts after `after` (from the start when `None` or past
    /// the end), in order.
    pub fn batch(&self, after: Option<&Arc<str>>, max: usize) -> Vec<Arc<str>> {
        let a = self.lock();
        let tail: Vec<Arc<str>> = match after {
            Some(last) => a
                .range::<Arc<str>, _>((Bound::Excluded(last), Bound::Unbounded))
                .take(max)
                .cloned()
                .collect(),
            None => a.iter().take(max).cloned().collect(),
        };
        if tail.is_empty() && after.is_some() {
            return a.iter().take(max).cloned().collect();
        }
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_take_turns_and_wrap_around() {
        let a = Awaiting::default();
        for id in ["a", "b", "c", "d", "e"] {
            a.add(&Arc::from(id));
        }
        let first = a.batch(None, 2);
        assert_eq!(first, vec![Arc::from("a"), Arc::from("b")]);
        let second = a.batch(first.last(), 2);
        assert_eq!(second, vec![Arc::from("c"), Arc::from("d")]);
        let third = a.batch(second.last(), 2);
        assert_eq!(third, vec![Arc::<str>::from("e")]);
        // Past the end: from the start again.
        assert_eq!(a.batch(third.last(), 2), first);
        a.remove("a");
        a.remove("zzz");
        assert_eq!(a.len(), 4);
        assert_eq!(
            a.batch(Some(&Arc::from("a")), 1),
            vec![Arc::<str>::from("b")]
        );
    }
}
