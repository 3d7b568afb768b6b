//! Prometheus metrics, kept per sidecar instance (no global recorder), with the
//! hot-path handles registered once so a request costs an atomic add, not a map lookup.
//!
//! Labels are bounded: protocol, outcome, provider name, state. Account ids are never
//! labels (cardinality) and nothing secret is ever a label or a value.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::protocol::Proto;

const REQUESTS: &str = "ee_auth_requests_total";
const REQUEST_DURATION: &str = "ee_auth_request_duration_seconds";
const CACHE_EVENTS: &str = "ee_auth_cache_events_total";
const REFRESHES: &str = "ee_auth_refreshes_total";
const UPSTREAM_DURATION: &str = "ee_auth_upstream_duration_seconds";
const ACCOUNTS: &str = "ee_auth_accounts";
const RELOADS: &str = "ee_auth_config_reloads_total";
const LAST_RELOAD: &str = "ee_auth_config_last_reload_success_timestamp_seconds";
const MIN_REMAINING: &str = "ee_auth_token_min_remaining_seconds";
const PERSIST_FAILURES: &str = "ee_auth_state_persist_failures_total";
const UNPERSISTED: &str = "ee_auth_state_unpersisted_accounts";
const STORE_UP: &str = "ee_auth_state_store_up";
const STORE_DOWN_FOR: &str = "ee_auth_state_store_unreachable_seconds";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// What happened to a token request (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Served a fresh cached token.
    Hit,
    /// Served after joining a fetch under way.
    Joined,
    /// Served after a fetch this request started.
    Miss,
    /// Served a still-valid token after a failed refresh.
    Stale,
    /// Served a password or static-token account.
    Fixed,
    /// 429: not available yet.
    Unavailable,
    /// Permanent provider failure.
    Failed,
    /// Unknown account.
    NotFound,
    /// Bad query.
    BadRequest,
    /// Missing or wrong Basic credentials.
    Unauthorized,
}

impl Outcome {
    const ALL: [Outcome; 10] = [
        Outcome::Hit,
        Outcome::Joined,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Fixed,
        Outcome::Unavailable,
        Outcome::Failed,
        Outcome::NotFound,
        Outcome::BadRequest,
        Outcome::Unauthorized,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Joined => "joined",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Fixed => "fixed",
            Outcome::Unavailable => "unavailable",
            Outcome::Failed => "failed",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
        }
    }
}

/// Cache events (the `event` label).
#[derive(Clone, Copy, Debug)]
pub enum CacheEvent {
    /// A fresh token was in memory.
    Hit,
    /// A request had to fetch.
    Miss,
    /// A request joined a fetch under way.
    Joined,
    /// A still-valid older token was served after a failed refresh.
    StaleServed,
}

/// Outcome of one upstream token fetch.
#[derive(Clone, Copy, Debug)]
pub enum RefreshOutcome {
    /// A token.
    Ok,
    /// A transient failure.
    Transient,
    /// A permanent failure.
    Permanent,
}

impl RefreshOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Ok => "ok",
            RefreshOutcome::Transient => "transient",
            RefreshOutcome::Permanent => "permanent",
        }
    }
}

/// Gauges computed when `/metrics` is scraped.
#[derive(Default, Debug)]
pub struct Snapshot {
    /// Credential sets per state.
    pub accounts_by_state: Vec<(&'static str, u64)>,
    /// The smallest remaining lifetime of any cached token.
    pub min_remaining: Option<Duration>,
}

/// `(provider name, outcome)`: the labels of the per-provider refresh series.
type ProviderSeries = (String, &'static str);

/// The metrics of one sidecar.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// `[proto or none][outcome]`
    requests: Vec<Vec<Counter>>,
    request_duration: Vec<Histogram>,
    cache: [Counter; 4],
    reloads_ok: Counter,
    reloads_failed: Counter,
    last_reload: Gauge,
    persist_failures: Counter,
    by_provider: Mutex<HashMap<ProviderSeries, Counter>>,
    upstream_by_provider: Mutex<HashMap<String, Histogram>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn proto_label(p: Option<Proto>) -> &'static str {
    p.map_or("none", Proto::as_str)
}

fn proto_index(p: Option<Proto>) -> usize {
    p.map_or(3, |p| p as usize)
}

impl Metrics {
    /// A fresh set of metrics with their descriptions.
    pub fn new() -> Self {
        let latency = [
            0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            10.0,
        ];
        let upstream = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &latency)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(UPSTREAM_DURATION.into()), &upstream)
            });
        // Only an empty bucket list fails, and ours are constant and non-empty.
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, help.into());
        };
        describe(REQUESTS, None, "Token requests by protocol and outcome.");
        describe(
            CACHE_EVENTS,
            None,
            "Token cache hits, misses, joined in-flight fetches and stale tokens served.",
        );
        describe(
            REFRESHES,
            None,
            "Upstream token fetches by provider and outcome (ok, transient, permanent).",
        );
        describe(RELOADS, None, "Config reloads by outcome.");
        describe(
            PERSIST_FAILURES,
            None,
            "Rotated refresh tokens that could not be written to the state directory.",
        );
        recorder.describe_histogram(
            REQUEST_DURATION.into(),
            Some(Unit::Seconds),
            "Token request latency.".into(),
        );
        recorder.describe_histogram(
            UPSTREAM_DURATION.into(),
            Some(Unit::Seconds),
            "Identity provider token endpoint latency (the call alone, without queueing).".into(),
        );
        recorder.describe_gauge(
            ACCOUNTS.into(),
            None,
            "Credential sets by state (ok, refreshing, failing_transient, failed_permanent, needs_consent)."
                .into(),
        );
        recorder.describe_gauge(
            UNPERSISTED.into(),
            None,
            "Accounts whose newest refresh token exists only in memory (its write to the state directory failed and is retried; without --state-dir, every rotated account). Lost on restart."
                .into(),
        );
        recorder.describe_gauge(
            STORE_UP.into(),
            None,
            "1 while the state store answers (always for a directory or memory), 0 while the Redis store is unreachable.".into(),
        );
        recorder.describe_gauge(
            STORE_DOWN_FOR.into(),
            Some(Unit::Seconds),
            "How long the Redis state store has been unreachable (0 while it answers).".into(),
        );
        recorder.describe_gauge(
            LAST_RELOAD.into(),
            Some(Unit::Seconds),
            "Unix time of the last successful config load.".into(),
        );
        recorder.describe_gauge(
            MIN_REMAINING.into(),
            Some(Unit::Seconds),
            "Smallest remaining lifetime of any cached token (NaN when none is cached).".into(),
        );

        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let protos: Vec<Option<Proto>> =
            vec![Some(Proto::Imap), Some(Proto::Smtp), Some(Proto::Api), None];
        let requests = protos
            .iter()
            .map(|p| {
                Outcome::ALL
                    .iter()
                    .map(|o| {
                        counter(
                            REQUESTS,
                            vec![
                                Label::new("proto", proto_label(*p)),
                                Label::new("outcome", o.as_str()),
                            ],
                        )
                    })
                    .collect()
            })
            .collect();
        let request_duration = protos
            .iter()
            .map(|p| {
                recorder.register_histogram(
                    &Key::from_parts(REQUEST_DURATION, vec![Label::new("proto", proto_label(*p))]),
                    &METADATA,
                )
            })
            .collect();
        let cache = ["hit", "miss", "joined", "stale_served"]
            .map(|e| counter(CACHE_EVENTS, vec![Label::new("event", e)]));
        let reloads_ok = counter(RELOADS, vec![Label::new("outcome", "ok")]);
        let reloads_failed = counter(RELOADS, vec![Label::new("outcome", "failed")]);
        let last_reload = recorder.register_gauge(&Key::from_name(LAST_RELOAD), &METADATA);
        let persist_failures = counter(PERSIST_FAILURES, vec![]);
        Metrics {
            requests,
            request_duration,
            cache,
            reloads_ok,
            reloads_failed,
            last_reload,
            persist_failures,
            by_provider: Mutex::new(HashMap::new()),
            upstream_by_provider: Mutex::new(HashMap::new()),
            recorder,
            handle,
        }
    }

    /// Counts a token request.
    pub fn request(&self, proto: Option<Proto>, outcome: Outcome, elapsed: Duration) {
        let i = proto_index(proto);
        if let Some(c) = self.requests.get(i).and_then(|r| r.get(outcome as usize)) {
            c.increment(1);
        }
        if let Some(h) = self.request_duration.get(i) {
            h.record(elapsed.as_secs_f64());
        }
    }

    /// Counts a cache event.
    pub fn cache_event(&self, e: CacheEvent) {
        self.cache[e as usize].increment(1);
    }

    /// Counts an upstream fetch by outcome. Its latency is recorded separately by
    /// [`Metrics::upstream_latency`], around the provider call alone.
    pub fn refresh(&self, provider: &str, outcome: RefreshOutcome) {
        let mut map = self.by_provider.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((provider.to_owned(), outcome.as_str()))
            .or_insert_with(|| {
                self.recorder.register_counter(
                    &Key::from_parts(
                        REFRESHES,
                        vec![
                            Label::new("provider", provider.to_owned()),
                            Label::new("outcome", outcome.as_str()),
                        ],
                    ),
                    &METADATA,
                )
            })
            .increment(1);
    }

    /// Records how long one identity provider call took. Time spent queueing for the
    /// per-provider cap or the account's refresh lock is left out on purpose: during a
    /// cold start that wait would swamp what the provider itself did.
    pub fn upstream_latency(&self, provider: &str, elapsed: Duration) {
        let mut map = self
            .upstream_by_provider
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(provider.to_owned())
            .or_insert_with(|| {
                self.recorder.register_histogram(
                    &Key::from_parts(
                        UPSTREAM_DURATION,
                        vec![Label::new("provider", provider.to_owned())],
                    ),
                    &METADATA,
                )
            })
            .record(elapsed.as_secs_f64());
    }

    /// Counts a config load attempt.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.increment(1);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_reload.set(now.as_secs_f64());
        } else {
            self.reloads_failed.increment(1);
        }
    }

    /// Counts a failed write of a rotated refresh token.
    pub fn persist_failure(&self) {
        self.persist_failures.increment(1);
    }

    /// The gauge of accounts whose newest refresh token is only in memory (the token
    /// store keeps it current as writes fail and succeed).
    pub fn unpersisted_gauge(&self) -> Gauge {
        let gauge = self
            .recorder
            .register_gauge(&Key::from_name(UNPERSISTED), &METADATA);
        gauge.set(0.0);
        gauge
    }

    /// Renders the Prometheus text format, after setting the scrape-time gauges.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        for state in [
            "ok",
            "refreshing",
            "failing_transient",
            "failed_permanent",
            "needs_consent",
        ] {
            let n = snapshot
                .accounts_by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.recorder
                .register_gauge(
                    &Key::from_parts(ACCOUNTS, vec![Label::new("state", state)]),
                    &METADATA,
                )
                .set(n as f64);
        }
        // With no token cached, NaN rather than a stale value from an earlier scrape: the
        // last token may have expired or its account may have been removed since.
        self.recorder
            .register_gauge(&Key::from_name(MIN_REMAINING), &METADATA)
            .set(snapshot.min_remaining.map_or(f64::NAN, |m| m.as_secs_f64()));
        self.handle.render()
    }

    /// Sets the state store's health gauges (at scrape time).
    pub fn state_store(&self, up: bool, unreachable: Duration) {
        self.recorder
            .register_gauge(&Key::from_name(STORE_UP), &METADATA)
            .set(if up { 1.0 } else { 0.0 });
        self.recorder
            .register_gauge(&Key::from_name(STORE_DOWN_FOR), &METADATA)
            .set(unreachable.as_secs_f64());
    }

    /// Drains histogram buffers; call periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
