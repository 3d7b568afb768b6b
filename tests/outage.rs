//! Provider outages as EmailEngine lives through them: the real sidecar (in-process, the
//! default timing policy) against the mock identity provider, asked by a client that
//! retries exactly as EmailEngine does (`common::emailengine_lookup`). EmailEngine turns a
//! failed lookup into an `authenticationError` webhook ("reconnect your mailbox"), so a
//! transient outage must end in a 200 within one lookup, and a permanent failure must
//! still be told at once.

mod common;

use std::time::Duration;

use tokio::time::Instant;

use common::*;
use serde_json::json;

/// How long the provider fails (the target).
const OUTAGE: Duration = Duration::from_secs(120);

async fn sidecar(
    idp: &MockIdp,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut Options),
) -> Running {
    let path = write_config(
        dir,
        &json!({
            "providers": { "idp": oauth2_provider(idp) },
            "accounts": { "a": { "user": "u@example.com", "provider": "idp", "refreshToken": "rt" } }
        }),
    );
    let mut o = test_options(&path);
    tweak(&mut o);
    // `start` loads the config on a thread of its own: under the paused clock, that
    // wait must not let virtual time jump (see `Frozen`); on the real clock it is a no-op.
    let _frozen = freeze();
    start(o).await.unwrap()
}

/// A cold account (no token yet) asked for while the provider fails for [`OUTAGE`]:
/// one lookup rides it out and ends in a 200 soon after the provider's first good answer.
/// Run on tokio's paused clock (as tests/timing.rs): the two minutes are virtual, and
/// every instant compared below (the client's, the mock's, the sidecar's schedule) is
/// on that one clock, so the bounds hold exactly however loaded the machine is.
async fn one_lookup_rides_out(fault: Fault, retry_after: Option<Duration>) {
    let idp = MockIdp::start().await;
    idp.set_fault(fault.clone());
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(&idp, dir.path(), |_| {}).await;
    let policy = sc.sidecar.cache().policy().clone();
    let started = Instant::now();
    let lookup = tokio::spawn(emailengine_lookup(
        sc.local_addr,
        "account=a&proto=imap",
        None,
    ));
    tokio::time::sleep(OUTAGE).await;
    let healed = Instant::now();
    idp.set_fault(Fault::None);
    let lookup = lookup.await.unwrap();

    let statuses: Vec<_> = lookup
        .requests
        .iter()
        .map(|r| (r.status, r.retry_after))
        .collect();
    eprintln!(
        "{fault:?}: requests (status, Retry-After) {statuses:?}; upstream calls {}",
        idp.calls()
    );
    assert!(
        lookup.succeeded(),
        "{fault:?}: the lookup failed (EmailEngine would flag the account): {statuses:?}"
    );
    let token = lookup.body.as_ref().unwrap()["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    idp.check_valid(&token).unwrap();
    let first_good = idp
        .requests()
        .iter()
        .map(|r| r.at)
        .filter(|at| *at >= healed)
        .min()
        .expect("the sidecar asked the provider again after the outage");
    assert!(
        lookup.ended() <= first_good + Duration::from_secs(3),
        "{fault:?}: the token reached the client {:?} after the provider's first good answer ({statuses:?})",
        lookup.ended().saturating_duration_since(first_good)
    );
    for r in &lookup.requests {
        assert!(
            r.answered - r.sent <= policy.request_wait + Duration::from_secs(1),
            "{fault:?}: a request was held {:?}, over the bound {:?}",
            r.answered - r.sent,
            policy.request_wait
        );
        if r.status == Some(429) {
            let ra = r.retry_after.expect("429 carries Retry-After");
            assert!((3..=30).contains(&ra), "{fault:?}: Retry-After {ra}");
        }
    }
    // Holding requests did not turn into hammering.
    let allowed = calls_allowed(&policy, retry_after, first_good - started);
    assert!(
        idp.calls() <= u64::from(allowed),
        "{fault:?}: {} upstream calls, the back-off schedule allows {allowed}",
        idp.calls()
    );
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_cold_account_rides_out_a_two_minute_outage_of_500s() {
    one_lookup_rides_out(Fault::status(500, None), None).await;
}

#[tokio::test(start_paused = true)]
async fn a_cold_account_rides_out_two_minutes_of_429_with_retry_after_60() {
    one_lookup_rides_out(Fault::status(429, Some(60)), Some(Duration::from_secs(60))).await;
}

#[tokio::test]
async fn permanent_failures_are_still_answered_at_once() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::invalid_grant(Some(70008)));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(&idp, dir.path(), |_| {}).await;
    for _ in 0..3 {
        let t = Instant::now();
        let lookup = emailengine_lookup(sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!(lookup.requests.len(), 1, "one request, no retries");
        assert_eq!(lookup.requests[0].status, Some(403));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "answered in {:?}",
            t.elapsed()
        );
    }
    // An unknown account, too.
    let lookup = emailengine_lookup(sc.local_addr, "account=nobody&proto=imap", None).await;
    assert_eq!(lookup.requests.len(), 1);
    assert_eq!(lookup.requests[0].status, Some(404));
    assert_eq!(idp.calls(), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_held_request_joins_the_next_attempt_and_gets_the_token_when_it_succeeds() {
    // The provider fails once with Retry-After 2: the request is held through the
    // back-off, the refresh queue's retry succeeds, and the held request gets that token.
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(503, Some(2)));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(&idp, dir.path(), |_| {}).await;
    let c = client();
    let healer = {
        let idp = idp.clone();
        tokio::spawn(async move {
            assert!(eventually(Duration::from_secs(5), || idp.calls() >= 1).await);
            idp.set_fault(Fault::None);
        })
    };
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    healer.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    idp.check_valid(r.token()).unwrap();
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(1900) && held < Duration::from_secs(5),
        "held {held:?}: through the provider's 2 s, then served"
    );
    assert_eq!(
        idp.calls(),
        2,
        "the failed attempt and the retry, nothing more"
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn no_request_is_held_past_the_bound_and_retry_after_says_when_there_is_news() {
    let c = client();
    let retry_after =
        |r: &Answer| -> u64 { r.headers["retry-after"].to_str().unwrap().parse().unwrap() };

    // The provider asks for 20 s: beyond the 2 s bound, but one Retry-After reaches it, so
    // the answer comes at once and sends the client back just before the next attempt.
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(503, Some(20)));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(&idp, dir.path(), |o| {
        o.policy.request_wait = Duration::from_secs(2)
    })
    .await;
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(
        (18..=19).contains(&retry_after(&r)),
        "retry-after {}",
        retry_after(&r)
    );
    assert_eq!(idp.calls(), 1, "holding did not add upstream calls");

    // 60 s: further than 30 s can reach, so the request is held for its whole bound first.
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(503, Some(60)));
    let dir = tempfile::tempdir().unwrap();
    let sc2 = sidecar(&idp, dir.path(), |o| {
        o.policy.request_wait = Duration::from_secs(2)
    })
    .await;
    let t = Instant::now();
    let r = ask(&c, sc2.local_addr, "account=a&proto=imap", None).await;
    let held = t.elapsed();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        held >= Duration::from_millis(1900) && held < Duration::from_secs(3),
        "held {held:?}"
    );
    assert_eq!(retry_after(&r), 30, "EmailEngine's cap");

    // A stalled provider: held for the bound, then 429 with a few seconds.
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::Stall);
    let dir = tempfile::tempdir().unwrap();
    let sc3 = sidecar(&idp, dir.path(), |o| {
        o.policy.request_wait = Duration::from_secs(1)
    })
    .await;
    let t = Instant::now();
    let r = ask(&c, sc3.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429);
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(900) && held < Duration::from_secs(2),
        "held {held:?}"
    );
    assert_eq!(retry_after(&r), 3);
    for sc in [sc, sc2, sc3] {
        sc.shutdown().await;
    }
}

#[tokio::test]
async fn a_held_request_lets_go_when_its_account_is_removed() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(503, Some(8)));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar(&idp, dir.path(), |_| {}).await;
    let held = {
        let addr = sc.local_addr;
        tokio::spawn(async move {
            let t = Instant::now();
            let r = ask(&client(), addr, "account=a&proto=imap", None).await;
            (r.status, t.elapsed())
        })
    };
    assert!(eventually(Duration::from_secs(5), || idp.calls() == 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {} }),
    );
    let removed = Instant::now();
    assert!(sc.sidecar.reload().await.unwrap(), "the config changed");
    let (status, _) = held.await.unwrap();
    assert_eq!(status, 429, "answered for the account it asked about");
    assert!(
        removed.elapsed() < Duration::from_secs(2),
        "let go {:?} after the removal, not at the end of the back-off",
        removed.elapsed()
    );
    let r = ask(&client(), sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 404, "the next request sees the new config");
    assert_eq!(idp.calls(), 1);
    sc.shutdown().await;
}
