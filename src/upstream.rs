//! One upstream token fetch, with the rules that span providers: refresh tokens are
//! spent one at a time per account, the newest one is persisted before anything from
//! the answer is used, and each provider gets at most N concurrent calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::CredentialSet;
use crate::metrics::Metrics;
use crate::provider::{Grant, ProviderError, TokenGrant, TokenRequest};
use crate::state::TokenStore;

/// The HTTP client and the shared limits for token fetches.
pub struct Upstream {
    http: reqwest::Client,
    store: Arc<TokenStore>,
    provider_cap: usize,
    caps: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    account_locks: Mutex<HashMap<Arc<str>, AccountLock>>,
    metrics: Arc<Metrics>,
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
        }
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
        self.fetch_locked(set).await
    }

    /// [`Upstream::fetch`] once the account's lock (if its grant needs one) is held.
    async fn fetch_locked(
        &self,
        set: &CredentialSet,
    ) -> Result<(TokenGrant, SentAt), ProviderError> {
        let account = &set.key.account;
        let spend = set
            .refresh_token
            .as_ref()
            .map(|config_token| self.store.current(account, config_token));
        let permit = self
            .cap(&set.provider_name)
            .acquire_owned()
            .await
            .map_err(|_| ProviderError::transient("shutting_down"))?;
        let req = TokenRequest {
            grant: set.grant,
            scopes: &set.scopes,
            scopes_explicit: set.scopes_explicit,
            refresh_token: spend.as_ref().map(|(t, _)| t),
            subject: &set.user,
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
                        "could not persist a rotated refresh token; it is kept in memory and will be lost on restart");
                }
            }
        }
        Ok((grant, sent_at))
    }
}

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
