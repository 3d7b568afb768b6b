//! The state requests read: the routes (the config in use, and for each account the
//! cache entries that serve it) behind one `ArcSwap`, and the rest the server, the
//! reloader and the lifecycle share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::cache::{KeyEntry, TokenCache};
use crate::config::{AccountKind, Config};
use crate::credentials::CredentialKey;
use crate::metrics::Metrics;
use crate::options::Options;
use crate::protocol::Proto;
use crate::state::TokenStore;

/// How one account is answered. One pointer wide: the route table has an entry per
/// account, so its size counts 100,000 times.
#[derive(Clone)]
pub enum Route {
    /// A password or static-token account: the answer, serialized once.
    Fixed(Box<Bytes>),
    /// An OAuth2 account: the entry serving each `proto`.
    OAuth(ProtoEntries),
}

/// The entry serving each `proto`: most accounts serve every protocol with one.
#[derive(Clone)]
pub enum ProtoEntries {
    /// One entry for no `proto` and every protocol.
    One(Arc<KeyEntry>),
    /// The entry serving no `proto`, then one per [`Proto::ALL`].
    Per(Box<[Arc<KeyEntry>; 4]>),
}

impl ProtoEntries {
    fn new(entries: [Arc<KeyEntry>; 4]) -> Self {
        if entries.iter().all(|e| Arc::ptr_eq(e, &entries[0])) {
            let [one, ..] = entries;
            ProtoEntries::One(one)
        } else {
            ProtoEntries::Per(Box::new(entries))
        }
    }

    /// The entry that serves `proto`.
    pub fn get(&self, proto: Option<Proto>) -> &Arc<KeyEntry> {
        match self {
            ProtoEntries::One(e) => e,
            ProtoEntries::Per(per) => &per[proto.map_or(0, |p| p as usize + 1)],
        }
    }

    /// Every entry, each once.
    fn distinct(&self) -> Vec<&Arc<KeyEntry>> {
        match self {
            ProtoEntries::One(e) => vec![e],
            ProtoEntries::Per(per) => {
                let mut out: Vec<&Arc<KeyEntry>> = Vec::with_capacity(4);
                for e in per.iter() {
                    if !out.iter().any(|o| Arc::ptr_eq(o, e)) {
                        out.push(e);
                    }
                }
                out
            }
        }
    }
}

impl Route {
    /// The entry of the account's credential set with this key.
    pub fn entry_of(&self, key: &CredentialKey) -> Option<&Arc<KeyEntry>> {
        match self {
            Route::Fixed(_) => None,
            Route::OAuth(ProtoEntries::One(e)) => (e.set().key == *key).then_some(e),
            Route::OAuth(ProtoEntries::Per(per)) => per.iter().find(|e| e.set().key == *key),
        }
    }
}

/// The config in use and the route of each of its accounts, swapped as one.
pub struct Routes {
    config: Arc<Config>,
    accounts: HashMap<Arc<str>, Route>,
}

/// What making a config's routes changes in the cache.
#[derive(Default)]
pub struct Changes {
    /// New entries, to become their keys' (replacing and retiring the old ones).
    pub commit: Vec<Arc<KeyEntry>>,
    /// Keys the config no longer has.
    pub removed: Vec<CredentialKey>,
    /// Entries to fetch before anyone asks: the pre-warmed sets of new and changed
    /// accounts, and new credentials of keys that were in use.
    pub warm: Vec<Arc<KeyEntry>>,
}

impl Routes {
    /// The routes of `config`: accounts unchanged since `previous` keep their route (an
    /// account's digest covers all its sets, so nearly all of a big map costs one
    /// lookup); the others get the cache's entry for each set, a new one where the
    /// credentials changed.
    pub fn build(
        config: Arc<Config>,
        cache: &TokenCache,
        previous: Option<&Routes>,
    ) -> (Routes, Changes) {
        let mut changes = Changes::default();
        let mut accounts = HashMap::with_capacity(config.accounts.len());
        let none = crate::config::Accounts::default();
        let before = previous.map_or(&none, |p| &p.config.accounts);
        for (account, old) in config.accounts.with_counterparts(before) {
            let id = &account.id;
            let kept = previous.and_then(|p| {
                (old?.fingerprint == account.fingerprint)
                    .then(|| p.accounts.get(id))
                    .flatten()
            });
            let route = match (kept, &account.kind) {
                (Some(route), _) => route.clone(),
                (None, AccountKind::Fixed(body)) => Route::Fixed(Box::new(body.clone())),
                (None, AccountKind::OAuth(o)) => {
                    // This account's entries to warm start here: only they can repeat.
                    let warm_from = changes.warm.len();
                    let mut made: Vec<Arc<KeyEntry>> = Vec::with_capacity(1);
                    let mut entry = |set: &Arc<crate::config::CredentialSet>| {
                        if let Some(e) = made.iter().find(|e| e.set().key == set.key) {
                            return e.clone();
                        }
                        let current = cache.entry(&set.key);
                        let e = match current {
                            Some(c) if c.is_for(set) => c,
                            replaced => {
                                let e = cache.new_entry(set);
                                changes.commit.push(e.clone());
                                if replaced.is_some_and(|old| old.is_used()) {
                                    changes.warm.push(e.clone());
                                }
                                e
                            }
                        };
                        made.push(e.clone());
                        e
                    };
                    let route = Route::OAuth(ProtoEntries::new([
                        entry(&o.default),
                        entry(&o.per_proto[0]),
                        entry(&o.per_proto[1]),
                        entry(&o.per_proto[2]),
                    ]));
                    for set in o.warm_sets() {
                        if let Some(e) = route.entry_of(&set.key) {
                            if !changes.warm[warm_from..].iter().any(|w| Arc::ptr_eq(w, e)) {
                                changes.warm.push(e.clone());
                            }
                        }
                    }
                    route
                }
            };
            accounts.insert(id.clone(), route);
        }
        if let Some(previous) = previous {
            changes.removed = previous.removed_keys(&config);
        }
        (Routes { config, accounts }, changes)
    }

    /// Keys of these routes that `config` does not have.
    fn removed_keys(&self, config: &Config) -> Vec<CredentialKey> {
        let mut removed = Vec::new();
        for (old, new) in self.config.accounts.with_counterparts(&config.accounts) {
            if new.is_some_and(|n| n.fingerprint == old.fingerprint) {
                continue;
            }
            let Some(Route::OAuth(entries)) = self.accounts.get(&old.id) else {
                continue;
            };
            let new_sets = match new.map(|a| &a.kind) {
                Some(AccountKind::OAuth(n)) => n.sets(),
                _ => Vec::new(),
            };
            for e in entries.distinct() {
                let key = &e.set().key;
                if !new_sets.iter().any(|s| s.key == *key) {
                    removed.push(key.clone());
                }
            }
        }
        removed
    }

    /// The config these routes serve.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// An account's route.
    pub fn route(&self, account: &str) -> Option<&Route> {
        self.accounts.get(account)
    }
}

/// The outcome of the last config load, for the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    /// When the config in use was loaded (RFC 3339).
    pub last_success_at: Option<String>,
    /// The errors of the last failed load, if it failed after the last success.
    pub last_error: Option<Vec<String>>,
    /// When that failure happened.
    pub last_error_at: Option<String>,
}

/// Admin lists built at once at most; more are answered 503.
const LIST_BUILDS: usize = 2;

/// State shared by the server, the reloader and background tasks.
pub struct Sidecar {
    pub(crate) routes: ArcSwap<Routes>,
    pub(crate) cache: Arc<TokenCache>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ready: AtomicBool,
    pub(crate) reload_status: Mutex<ReloadStatus>,
    pub(crate) options: Options,
    pub(crate) store: Arc<TokenStore>,
    /// Admin lists being built (a whole list of 100k accounts is tens of MB).
    list_builds: Arc<tokio::sync::Semaphore>,
    /// Reloads one at a time: each builds on the routes the one before it left.
    pub(crate) reloading: tokio::sync::Mutex<()>,
}

impl Sidecar {
    /// Shared state serving `routes` (already committed to `cache`).
    pub(crate) fn new(
        routes: Routes,
        cache: Arc<TokenCache>,
        metrics: Arc<Metrics>,
        options: Options,
        store: Arc<TokenStore>,
    ) -> Self {
        Sidecar {
            routes: ArcSwap::from_pointee(routes),
            cache,
            metrics,
            ready: AtomicBool::new(false),
            reload_status: Mutex::new(ReloadStatus {
                last_success_at: Some(now_rfc3339()),
                ..Default::default()
            }),
            options,
            store,
            list_builds: Arc::new(tokio::sync::Semaphore::new(LIST_BUILDS)),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// The routes in use.
    pub fn routes(&self) -> arc_swap::Guard<Arc<Routes>> {
        self.routes.load()
    }

    /// The config in use.
    pub fn config(&self) -> Arc<Config> {
        self.routes.load().config.clone()
    }

    /// The token cache.
    pub fn cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A place to build an admin list in, if one is free.
    pub fn list_build(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.list_builds.clone().try_acquire_owned().ok()
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The store of rotated refresh tokens.
    pub fn token_store(&self) -> &Arc<TokenStore> {
        &self.store
    }

    /// Whether pre-warm has finished (or timed out).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The last config load outcome.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Renders `/metrics`: the per-state counts are kept as keys change, so a scrape
    /// costs the same with 10 or 100,000 accounts.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.cache.snapshot())
    }
}

/// The wall clock now, as the admin API shows times.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Sidecar {
    /// Fetches tokens for `entries` with bounded concurrency; returns when all are done.
    pub(crate) async fn warm_all(self: &Arc<Self>, entries: Vec<Arc<KeyEntry>>) {
        use futures_util::StreamExt;
        let n = self.options.prewarm_concurrency.max(1);
        futures_util::stream::iter(entries)
            .map(|entry| {
                let cache = self.cache.clone();
                async move {
                    if let Some(flight) = cache.warm(&entry) {
                        let _ = flight.await;
                    }
                }
            })
            .buffer_unordered(n)
            .for_each(|_| async {})
            .await;
    }
}
