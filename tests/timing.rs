//! The scheduling rules, specified on tokio's paused clock: refresh-ahead, jitter,
//! back-off, Retry-After and held requests. The real sidecar runs in-process with the
//! mock identity provider on real loopback sockets, as the other integration tests do,
//! but in virtual time (`start_paused`): the clock stands still while anything can run
//! and jumps to the next timer when nothing can, so an hour of token life takes
//! milliseconds, and every instant below is exact (to tokio's 1 ms timer tick), on a
//! loaded machine as on an idle one. Both sides read the same clock: the mock records
//! each call's virtual instant, and a token's life counts from the sidecar's send,
//! which is the same instant.
//!
//! The rules are written out here as the README states them ("What it is", "Provider
//! outages"), not taken from the library: margin = max(--refresh-margin, 1/5 of the
//! lifetime), at most half of it; the refresh falls in [lifetime - 1.5 margin,
//! lifetime - margin]. Back-off after failure k: min(base × 2^(k-1), max) × [½, 1],
//! never under the provider's Retry-After, which counts for at most 2 minutes.
//!
//! What virtual time cannot stand in for: the wall clock (an HTTP-date `Retry-After` is
//! read against `SystemTime`, which does not pause; only the delta-seconds form is
//! specified here), and the real binary (signals, CLI), which runs on its own clock.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::time::{sleep_until, Instant};

/// tokio's timers fire on whole milliseconds: a deadline is met at most this late.
const TICK: Duration = Duration::from_millis(1);

/// Options for a sidecar on the paused clock: pre-warm (or not) and the default policy.
fn options(cfg: &Path, prewarm: usize) -> Options {
    let mut o = test_options(cfg);
    o.prewarm_concurrency = prewarm;
    // No periodic re-read within any test's virtual span: it would load the config on a
    // thread of its own (see `Frozen`), and nothing here changes the file.
    o.reload_interval = Duration::from_secs(30 * 86_400);
    o
}

/// Starts the sidecar with the clock held still: `start` loads the config on a thread.
async fn start_frozen(o: Options) -> Running {
    let _frozen = freeze();
    start(o).await.unwrap()
}

/// Each account's token requests (its refresh token names it), in virtual time.
fn calls_by_account(idp: &MockIdp) -> BTreeMap<String, Vec<Instant>> {
    let mut by = BTreeMap::<String, Vec<Instant>>::new();
    for r in idp.requests() {
        by.entry(r.form["refresh_token"].clone())
            .or_default()
            .push(r.at);
    }
    by
}

/// Waits (in virtual time) until the mock has had `n` calls; they all come at once.
async fn calls_reach(idp: &MockIdp, n: u64) {
    assert!(
        eventually(Duration::from_secs(5), || idp.calls() >= n).await,
        "{} calls, expected {n}",
        idp.calls()
    );
}

/// The background refresh of a token of `lifetime` falls in this window after issue.
fn refresh_window(lifetime: Duration, margin_floor: Duration) -> (Duration, Duration) {
    let margin = margin_floor.max(lifetime / 5).min(lifetime / 2);
    (lifetime - margin - margin / 2, lifetime - margin)
}

/// A token request on a connection of its own (a pooled one may have been closed by the
/// sidecar's idle timeout while virtual hours passed), and when it was answered.
async fn ask_at(addr: std::net::SocketAddr, account: &str) -> (Answer, Instant) {
    let r = ask(
        &client(),
        addr,
        &format!("account={account}&proto=imap"),
        None,
    )
    .await;
    (r, Instant::now())
}

/// A request for an account whose token is fresh: answered from memory, at once.
async fn hit(sc: &Running, idp: &MockIdp, account: &str) -> Recorded {
    let (calls, asked) = (idp.calls(), Instant::now());
    let (r, answered) = ask_at(sc.local_addr, account).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(answered, asked, "{account}: held {:?}", answered - asked);
    assert_eq!(
        idp.calls(),
        calls,
        "{account}: a hit makes no upstream call"
    );
    idp.request_for(r.token()).expect("a token the mock issued")
}

#[tokio::test(start_paused = true)]
async fn a_token_is_refreshed_in_the_background_inside_its_refresh_window() {
    // The three regimes of the margin: 1/5 of the lifetime (1 h tokens), the floor of
    // 5 minutes (10-minute tokens), and half the lifetime (100 s tokens).
    for lifetime in [3600, 600, 100] {
        const N: usize = 40;
        let lifetime = Duration::from_secs(lifetime);
        let idp = MockIdp::start().await;
        idp.set_lifetime(Some(lifetime.as_secs_f64()));
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), &oauth2_accounts(&idp, N));
        let o = options(&cfg, N);
        let (lo, hi) = refresh_window(lifetime, o.policy.margin_floor);
        let sc = start_frozen(o).await;
        calls_reach(&idp, N as u64).await;
        let issued = idp.call_times();
        let t0 = issued[0];
        assert!(
            issued.iter().all(|t| *t == t0),
            "pre-warm fetched every token at one instant"
        );

        // Until the window opens, nothing is refreshed, and requests are served from memory.
        sleep_until(t0 + lo - TICK).await;
        assert_eq!(
            idp.calls(),
            N as u64,
            "{lifetime:?}: refreshed before {lo:?}"
        );
        assert_eq!(hit(&sc, &idp, "a0").await.at, t0, "the first token");

        // By its end every token has been refreshed once, none outside it.
        sleep_until(t0 + hi + TICK).await;
        for (account, calls) in calls_by_account(&idp) {
            assert_eq!(calls.len(), 2, "{lifetime:?} {account}: {calls:?}");
            let after = calls[1] - t0;
            assert!(
                after >= lo && after < hi + TICK,
                "{lifetime:?} {account}: refreshed {after:?} after issue, outside [{lo:?}, {hi:?}]"
            );
        }

        // The request after it gets the new token at once, from memory.
        let refreshed = calls_by_account(&idp)["rt-0"][1];
        assert_eq!(hit(&sc, &idp, "a0").await.at, refreshed, "the new token");
        sc.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn refreshes_of_tokens_issued_together_spread_over_the_whole_jitter_window() {
    const N: usize = 10_000;
    let lifetime = Duration::from_secs(3600);
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, N));
    let o = options(&cfg, 64);
    let cap = o.provider_concurrency as u64;
    let (lo, hi) = refresh_window(lifetime, o.policy.margin_floor);
    let sc = start_frozen(o).await;
    calls_reach(&idp, N as u64).await;
    let t0 = idp.call_times()[0];
    assert!(
        idp.call_times().iter().all(|t| *t == t0),
        "issued at one instant"
    );

    sleep_until(t0 + hi + TICK).await;
    let by_account = calls_by_account(&idp);
    assert_eq!(by_account.len(), N);
    let mut quarters = [0usize; 4];
    for (account, calls) in &by_account {
        assert_eq!(calls.len(), 2, "{account}: {calls:?}");
        let after = calls[1] - t0;
        assert!(
            after >= lo && after < hi + TICK,
            "{account}: refreshed {after:?} after issue, outside [{lo:?}, {hi:?}]"
        );
        let q = ((after - lo).as_secs_f64() / (hi - lo).as_secs_f64() * 4.0) as usize;
        quarters[q.min(3)] += 1;
    }
    // Uniform jitter puts ~25 % in each quarter of the window; a burst puts all in one.
    for (i, n) in quarters.iter().enumerate() {
        assert!(
            *n > N / 10,
            "quarter {i} of the jitter window has {n} of {N} refreshes: {quarters:?}"
        );
    }
    let peak = idp.with(|s| s.peak_inflight);
    assert!(peak <= cap, "per-provider cap {cap} exceeded: {peak}");
    sc.shutdown().await;
}

/// Checks the gaps between one key's attempts after consecutive transient failures:
/// after failure k, min(base × 2^(k-1), max) × [½, 1], never under the Retry-After
/// (capped at 2 minutes). Returns each gap's place in its jitter range, 0 to 1 (`None`
/// where the Retry-After governs).
fn check_backoff(
    what: &str,
    times: &[Instant],
    policy_base: Duration,
    policy_max: Duration,
    retry_after: Option<Duration>,
) -> Vec<Option<f64>> {
    let floor = retry_after.map_or(Duration::ZERO, |ra| ra.min(Duration::from_secs(120)));
    times
        .windows(2)
        .enumerate()
        .map(|(k, w)| {
            let gap = w[1] - w[0];
            let raw = policy_base.saturating_mul(1 << k.min(30)).min(policy_max);
            let (lo, hi) = ((raw / 2).max(floor), raw.max(floor));
            assert!(
                gap >= lo && gap < hi + TICK,
                "{what}: attempt {} came {gap:?} after failure {}, outside [{lo:?}, {hi:?}]",
                k + 2,
                k + 1
            );
            (raw / 2 > floor).then(|| (gap - raw / 2).as_secs_f64() / (raw / 2).as_secs_f64())
        })
        .collect()
}

/// `n` pre-warmed accounts whose provider answers every call with `fault`.
struct Failing {
    idp: MockIdp,
    sc: Running,
    /// The policy's back-off base and cap, and its retry after a permanent failure.
    base: Duration,
    max: Duration,
    permanent_retry: Duration,
    /// When the first attempts (pre-warm, all at once) were made.
    t0: Instant,
    /// The config's directory: bind the whole value (`let f = failing(..)`) so it lives
    /// as long as the test; a `..` pattern would drop it at once (and the watcher see it go).
    _dir: tempfile::TempDir,
}

async fn failing(fault: Fault, n: usize) -> Failing {
    let idp = MockIdp::start().await;
    idp.set_fault(fault);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, n));
    let o = options(&cfg, n);
    let (base, max, permanent_retry) = (
        o.policy.backoff_base,
        o.policy.backoff_max,
        o.policy.permanent_retry,
    );
    let sc = start_frozen(o).await;
    calls_reach(&idp, n as u64).await;
    let t0 = idp.call_times()[0];
    Failing {
        idp,
        sc,
        base,
        max,
        permanent_retry,
        t0,
        _dir: dir,
    }
}

#[tokio::test(start_paused = true)]
async fn after_transient_failures_attempts_follow_the_back_off_schedule() {
    let f = failing(Fault::status(503, None), 20).await;
    let (idp, sc, t0) = (f.idp, f.sc, f.t0);

    // Gaps of 1, 2, 4, ..., 32, 60, 60 s at the longest: nine attempts within 184 s.
    sleep_until(t0 + Duration::from_secs(184)).await;
    let mut places = Vec::new();
    for (account, times) in calls_by_account(&idp) {
        assert!(times.len() >= 9, "{account}: {} attempts", times.len());
        places.extend(check_backoff(&account, &times, f.base, f.max, None));
    }
    // The jitter is real: each key lands somewhere else in its range (20 keys, 8 gaps
    // each or more; all in one half of the range would be one chance in 2^159).
    let places: Vec<f64> = places.into_iter().flatten().collect();
    assert!(places.iter().any(|p| *p < 0.5) && places.iter().any(|p| *p > 0.5));

    // The provider is back: each key's next attempt (still on its schedule) succeeds, and
    // from then on its token is refreshed ahead of expiry, not retried.
    idp.set_fault(Fault::None);
    let healed = Instant::now();
    sleep_until(healed + f.max + TICK).await;
    let calls_after = idp.calls();
    assert!(hit(&sc, &idp, "a0").await.at >= healed);
    sleep_until(Instant::now() + Duration::from_secs(2000)).await;
    assert_eq!(
        idp.calls(),
        calls_after,
        "no attempt after the success before its refresh window"
    );
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_retried_after_the_permanent_retry_interval() {
    let f = failing(Fault::invalid_grant(None), 1).await;
    let (idp, sc, t0) = (f.idp, f.sc, f.t0);
    let retry = f.permanent_retry;
    sleep_until(t0 + 2 * retry + TICK).await;
    let times = idp.call_times();
    assert_eq!(times.len(), 3, "{times:?}");
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= retry && gap < retry + TICK, "retried after {gap:?}");
    }
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_provider_retry_after_is_honoured_and_counts_for_two_minutes_at_most() {
    // 90 s: longer than any back-off step (60 s at most), so every gap is 90 s; 5 s:
    // governs the first steps, the back-off the later ones; a day: 2 minutes.
    for (status, retry_after, span) in [(429, 90, 600), (503, 5, 200), (429, 86_400, 600)] {
        let f = failing(Fault::status(status, Some(retry_after)), 10).await;
        let (idp, sc, t0) = (f.idp, f.sc, f.t0);
        sleep_until(t0 + Duration::from_secs(span)).await;
        let ra = Duration::from_secs(retry_after);
        for (account, times) in calls_by_account(&idp) {
            assert!(times.len() >= 4, "{status} {account}: {times:?}");
            check_backoff(
                &format!("{status} Retry-After {retry_after}: {account}"),
                &times,
                f.base,
                f.max,
                Some(ra),
            );
        }
        sc.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_held_request_is_answered_by_the_attempt_after_the_back_off() {
    // A cold account, no token: the provider fails twice, then answers. The request is
    // held through both back-offs (within --request-wait) and answered the instant the
    // third attempt brings a token.
    let idp = MockIdp::start().await;
    idp.set_fault_for(Fault::status(503, None), 2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, 1));
    let o = options(&cfg, 0);
    let (base, max, wait) = (
        o.policy.backoff_base,
        o.policy.backoff_max,
        o.policy.request_wait,
    );
    let sc = start_frozen(o).await;
    let asked = Instant::now();
    let (r, answered) = ask_at(sc.local_addr, "a0").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let times = idp.call_times();
    assert_eq!(times.len(), 3, "two failed attempts and the good one");
    assert_eq!(times[0], asked, "the request started the first attempt");
    check_backoff("held request", &times, base, max, None);
    assert_eq!(
        idp.request_for(r.token()).unwrap().at,
        times[2],
        "the third attempt's token"
    );
    assert!(
        answered - times[2] < TICK,
        "answered {:?} after the attempt",
        answered - times[2]
    );
    assert!(answered - asked <= wait);
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_lookup_rides_a_retry_after_beyond_the_request_wait_to_the_next_attempt() {
    // Retry-After 60 with --request-wait 20 s: the attempt is out of the request's reach,
    // and out of one 30 s Retry-After's too. The request is held for its whole bound and
    // told to come back in 30 s; back 10 s before the attempt, it is held through it
    // and gets its token the instant it comes.
    let idp = MockIdp::start().await;
    idp.set_fault_for(Fault::status(503, Some(60)), 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, 1));
    let o = options(&cfg, 0);
    let wait = o.policy.request_wait;
    assert_eq!(wait, Duration::from_secs(20), "the default --request-wait");
    let sc = start_frozen(o).await;
    let asked = Instant::now();
    let lookup = emailengine_lookup(sc.local_addr, "account=a0&proto=imap", None).await;
    assert!(lookup.succeeded(), "{:?}", lookup.requests);
    let times = idp.call_times();
    assert_eq!(times.len(), 2, "{times:?}");
    assert_eq!(times[1] - times[0], Duration::from_secs(60));
    let [first, second] = &lookup.requests[..] else {
        panic!("two requests: {:?}", lookup.requests)
    };
    assert_eq!(first.status, Some(429));
    assert_eq!(first.retry_after, Some(30));
    assert_eq!(first.sent, asked);
    assert!(first.answered - asked >= wait && first.answered - asked < wait + TICK);
    assert_eq!(second.status, Some(200));
    assert!(
        second.answered - times[1] < TICK,
        "answered with the attempt"
    );
    assert_eq!(
        idp.request_for(
            lookup.body.as_ref().unwrap()["accessToken"]
                .as_str()
                .unwrap()
        )
        .unwrap()
        .at,
        times[1]
    );
    sc.shutdown().await;
}
