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
use crate::provider::{
    ErrorCode, ExpiresIn, OAuthCode, OurCode, Provider, ProviderError, TokenGrant, TokenRequest,
};
use crate::state::{StateError, TokenStore};

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
    /// Credential sets fetched by this process: only a first fetch takes an access token
    /// kept in the store (a warm restart).
    warmed: Mutex<std::collections::HashSet<[u8; 16]>>,
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
            warmed: Mutex::new(std::collections::HashSet::new()),
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
            Grant::RefreshToken => Some(self.hold_account(&set.key.account).await),
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

    /// Holds the account's refresh lock in this process: a refresh of the account waits
    /// until it is dropped. Writing a consented token or re-reading the account's record
    /// under it, a refresh under way never writes its rotation over them afterwards.
    pub async fn hold_account<'a>(&'a self, account: &'a Arc<str>) -> impl Drop + 'a {
        let lock = self.account_lock(account);
        let mut held = HeldAccountLock {
            upstream: self,
            account,
            guard: None,
        };
        held.guard = Some(lock.lock_owned().await);
        held
    }

    /// [`Upstream::fetch`] once the account's lock (if its grant needs one) is held.
    ///
    /// A refresh token that may rotate is spent only under the account's lease in the
    /// state store (other processes may share it), after re-reading the stored record,
    /// and its rotation is written (compare-and-set) before the answer is used.
    async fn fetch_locked(
        &self,
        set: &CredentialSet,
    ) -> Result<(TokenGrant, SentAt), ProviderError> {
        let account = &set.key.account;
        let rotating = may_rotate(set);
        let _lease = if rotating {
            let lease = self.store.lock_account(account).await.map_err(|e| {
                tracing::warn!(account = %account, error = %e,
                    "refresh not sent: the account's lease in the state store could not be taken (a refresh token that may rotate is never spent without it); retried with back-off");
                ProviderError::transient(STATE_UNAVAILABLE)
            })?;
            match self.store.reload_record(account).await {
                Ok(_) => {}
                Err(StateError::Refused { .. }) => return Err(refused()),
                Err(e) => {
                    tracing::warn!(account = %account, error = %e,
                        "refresh not sent: the account's record could not be re-read from the state store; retried with back-off");
                    return Err(ProviderError::transient(STATE_UNAVAILABLE));
                }
            }
            Some(lease)
        } else {
            None
        };
        if self.store.refused(account).is_some() {
            return Err(refused());
        }
        if let Some(grant) = self.warm_from_store(set).await {
            return Ok(grant);
        }
        let spend = if set.grant == Grant::RefreshToken || set.refresh_token.is_some() {
            self.store.current(account, set.refresh_token.as_ref())
        } else {
            None
        };
        if set.grant == Grant::RefreshToken && spend.is_none() {
            // Nothing to spend: no call, the account waits for consent.
            return Err(consent_required());
        }
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
                match self.store.rotate(account, *origin, new.clone()).await {
                    Ok(()) => {}
                    Err(e @ StateError::Conflict { .. }) => {
                        // Our lease was lost (the store was unreachable for longer than
                        // it): another process rotated meanwhile. Its record is used.
                        tracing::error!(account = %account, error = %e,
                            "rotated refresh token not written: the stored record changed under the lease");
                        return Err(ProviderError::transient(STATE_UNAVAILABLE));
                    }
                    Err(e) => {
                        self.metrics.persist_failure();
                        tracing::error!(account = %account, error = %e,
                            "could not write a rotated refresh token to the state store; it is kept in memory and used, the account's lease is kept, and the write is retried (the account is lost if the sidecar stops before a write succeeds)");
                    }
                }
            }
        }
        self.keep_for_warm_restart(set, &grant, sent_at);
        Ok((grant, sent_at))
    }

    /// A fresh access token kept in the store by an earlier process, on this process's
    /// first fetch of the credential set (a warm restart); later fetches go upstream.
    async fn warm_from_store(&self, set: &CredentialSet) -> Option<(TokenGrant, SentAt)> {
        // Not while the store does not answer: a grant that needs no lease goes on at once.
        if !self.store.is_redis() || !self.store.health().reachable {
            return None;
        }
        let name = access_name(set);
        {
            let mut seen = self.warmed.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.insert(set.fingerprint) {
                return None;
            }
        }
        let (token, expires_at) = self.store.load_access(&name).await?;
        let now = std::time::SystemTime::now();
        let left = expires_at.duration_since(now).ok()?;
        // Aging tokens are fetched anew (as pre-warm would).
        if left < WARM_MIN_LEFT {
            return None;
        }
        Some((
            TokenGrant {
                access_token: Some(token),
                expires_in: ExpiresIn::Given(left),
                refresh_token: None,
            },
            SentAt {
                instant: tokio::time::Instant::now(),
                wall: now,
            },
        ))
    }

    /// Keeps a fetched access token in the store (Redis) for a warm restart.
    fn keep_for_warm_restart(&self, set: &CredentialSet, grant: &TokenGrant, sent: SentAt) {
        if !self.store.is_redis() {
            return;
        }
        self.warmed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(set.fingerprint);
        let (Some(token), ExpiresIn::Given(life)) = (&grant.access_token, grant.expires_in) else {
            return;
        };
        let Some(expires_at) = sent.wall.checked_add(life) else {
            return;
        };
        // In the background: the answer does not wait for the store (which may be down).
        let (store, name, token, account) = (
            self.store.clone(),
            access_name(set),
            token.clone(),
            set.key.account.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = store.save_access(&name, &token, expires_at).await {
                tracing::debug!(account = %account, error = %e, "access token not kept in the state store");
            }
        });
    }
}

/// A kept access token with less life left is fetched anew on a warm restart.
const WARM_MIN_LEFT: Duration = Duration::from_secs(120);

/// The store's name of a credential set's access token: its fingerprint (a digest over
/// everything that makes the set, secrets included), so a changed set never gets an old
/// token.
fn access_name(set: &CredentialSet) -> String {
    set.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether spending this set's grant may rotate a refresh token: only the refresh_token
/// grant, and not with Google (which never rotates them).
fn may_rotate(set: &CredentialSet) -> bool {
    set.grant == Grant::RefreshToken && !matches!(*set.provider, Provider::Google(_))
}

/// The error of a fetch refused because the account's stored record is refused.
fn refused() -> ProviderError {
    ProviderError {
        hint: Some("the account's stored refresh-token record is refused (tampered with, copied from another account, or sealed under a key no longer in --state-key-file); see the log and the admin API"),
        ..ProviderError::transient(STATE_REFUSED)
    }
}

/// The error code of a refresh not sent because the state store's lease or record could
/// not be had.
pub const STATE_UNAVAILABLE: ErrorCode = ErrorCode::Ours(OurCode::StateUnavailable);
/// The error code of a fetch refused because the stored record is refused.
pub const STATE_REFUSED: ErrorCode = ErrorCode::Ours(OurCode::StateRecordRefused);

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
pub const CONSENT_HINT: &str = "no refresh token yet: the mailbox owner must sign in; run `ee-auth-sidecar consent --config FILE ACCOUNT` with the sidecar's --state-dir or --state (it may run beside the sidecar), or press Start sign-in on the operator page /ui; the sidecar uses the stored token at once";

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
