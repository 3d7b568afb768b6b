//! The serving core, end to end: real sidecar, real sockets, real mock identity provider.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn sidecar_with(
    idp: &MockIdp,
    dir: &std::path::Path,
    accounts: serde_json::Value,
    tweak: impl FnOnce(&mut Options),
) -> Running {
    let cfg = write_config(
        dir,
        &json!({ "providers": { "idp": oauth2_provider(idp) }, "accounts": accounts }),
    );
    let mut o = test_options(&cfg);
    tweak(&mut o);
    start(o).await.expect("sidecar starts")
}

#[tokio::test]
async fn answers_every_status_of_the_contract() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({
            "oauth": { "user": "o@example.com", "provider": "idp", "refreshToken": "rt-0" },
            "pw": { "user": "p@example.com", "pass": "app-password" },
            "static": { "user": "s@example.com", "accessToken": "static-token" }
        }),
        |_| {},
    )
    .await;
    let c = client();
    let a = sc.local_addr;

    let r = ask(&c, a, "account=oauth&proto=imap", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["user"], "o@example.com");
    idp.check_valid(r.token()).unwrap();
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        r.body.as_object().unwrap().len(),
        2,
        "only user and accessToken: {}",
        r.body
    );

    let r = ask(&c, a, "account=pw&proto=smtp", None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (
            200,
            json!({"user": "p@example.com", "pass": "app-password"})
        )
    );
    let r = ask(&c, a, "account=static", None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (
            200,
            json!({"user": "s@example.com", "accessToken": "static-token"})
        )
    );

    // Missing proto is "any protocol": the default set, same token as imap here.
    let any = ask(&c, a, "account=oauth", None).await;
    assert_eq!(any.status, 200);
    assert_eq!(idp.calls(), 1, "imap and no-proto share one credential set");

    let r = ask(&c, a, "account=nobody&proto=imap", None).await;
    assert_eq!(r.status, 404);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("unknown account"));
    for q in [
        "proto=imap",
        "account=&proto=imap",
        "account=oauth&proto=pop3",
        "account=a&account=b",
        "account=%ff%fe",
    ] {
        let r = ask(&c, a, q, None).await;
        assert_eq!(r.status, 400, "{q}");
        assert!(r.body["error"].is_string(), "{q}: {}", r.body);
    }
    let r = c
        .post(format!("http://{a}/authentication?account=oauth"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");

    assert_eq!(
        c.get(format!("http://{a}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(eventually(Duration::from_secs(5), || sc.sidecar.is_ready()).await);
    assert_eq!(
        c.get(format!("http://{a}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("http://{a}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn basic_auth_compares_the_literal_url_credentials() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "auth": { "username": "emailengine", "password": "p%40ss" },
            "accounts": { "pw": { "user": "u", "pass": "x" } }
        }),
    );
    let sc = start(test_options(&cfg)).await.unwrap();
    let c = client();
    let a = sc.local_addr;
    let _ = idp;

    let r = ask(&c, a, "account=pw", None).await;
    assert_eq!(r.status, 401);
    assert!(r.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    // EmailEngine sends `p%40ss` literally (it does not percent-decode the URL's userinfo).
    assert_eq!(
        ask(&c, a, "account=pw", Some(("emailengine", "p%40ss")))
            .await
            .status,
        200
    );
    assert_eq!(
        ask(&c, a, "account=pw", Some(("emailengine", "p@ss")))
            .await
            .status,
        401
    );
    assert_eq!(
        ask(&c, a, "account=pw", Some(("emailengine", "p%40s")))
            .await
            .status,
        401
    );
    assert_eq!(
        ask(&c, a, "account=pw", Some(("EmailEngine", "p%40ss")))
            .await
            .status,
        401
    );
    // An unknown account behind auth still says 401 first: nothing leaks to strangers.
    assert_eq!(ask(&c, a, "account=nobody", None).await.status, 401);
    // Health endpoints need no credentials.
    assert_eq!(
        c.get(format!("http://{a}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn a_thousand_concurrent_cold_requests_make_one_upstream_call() {
    let idp = MockIdp::start().await;
    idp.with(|s| s.delay = Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "cold": { "user": "u", "provider": "idp", "refreshToken": "rt" } }),
        |o| {
            o.max_connections = 2000;
        },
    )
    .await;
    let a = sc.local_addr;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(1100)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { ask(&c, a, "account=cold&proto=imap", None).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        tokens.insert(r.token().to_owned());
    }
    assert_eq!(idp.calls(), 1);
    assert_eq!(tokens.len(), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn short_tokens_are_refreshed_ahead_and_no_request_waits() {
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(3.0));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } }),
        |_| {},
    )
    .await;
    let c = client();
    let a = sc.local_addr;
    let first = ask(&c, a, "account=a&proto=imap", None).await;
    idp.check_valid(first.token()).unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let r = ask(&c, a, "account=a&proto=imap", None).await;
        assert_eq!(r.status, 200);
        let left = idp.check_valid(r.token()).unwrap();
        assert!(
            left >= Duration::from_millis(500),
            "served a token with only {left:?} left"
        );
        seen.insert(r.token().to_owned());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 8 s of 3 s tokens: refreshed in the background several times...
    assert!(idp.calls() >= 4, "calls = {}", idp.calls());
    assert!(seen.len() >= 4);
    // ...and only the very first request ever waited on the provider.
    assert_eq!(
        metric(
            &c,
            a,
            r#"ee_auth_requests_total{proto="imap",outcome="miss"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &c,
            a,
            r#"ee_auth_requests_total{proto="imap",outcome="joined"}"#
        )
        .await,
        0.0
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn a_failing_provider_gets_stale_valid_tokens_served_then_429_never_expired() {
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(3.0));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } }),
        |o| {
            o.policy.backoff_base = Duration::from_millis(200);
            o.policy.backoff_max = Duration::from_millis(800);
            // Once the token has expired, requests are held up to this for the next
            // attempt before their 429 (tests/outage.rs covers the hold itself).
            o.policy.request_wait = Duration::from_millis(200);
        },
    )
    .await;
    let c = client();
    let a = sc.local_addr;
    let first = ask(&c, a, "account=a&proto=imap", None).await;
    idp.check_valid(first.token()).unwrap();
    let fault_started = Instant::now();
    idp.set_fault(Fault::status(500, None));
    let (mut served, mut refused) = (0, 0);
    while fault_started.elapsed() < Duration::from_secs(7) {
        let t = Instant::now();
        let r = ask(&c, a, "account=a&proto=imap", None).await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "request hung for {:?}",
            t.elapsed()
        );
        match r.status {
            200 => {
                idp.check_valid(r.token()).unwrap();
                served += 1;
            }
            429 => {
                let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=30).contains(&ra));
                refused += 1;
            }
            s => panic!("unexpected status {s}: {}", r.body),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served > 10,
        "the valid token kept being served while the provider failed ({served})"
    );
    assert!(refused > 10, "after expiry, 429s ({refused})");
    // Back-off: 7 s of failures at 200 ms doubling to 800 ms (with jitter) is well under 30 calls.
    let calls = idp.calls();
    assert!(calls < 30, "hammered the provider: {calls} calls");
    // The fault clears: fresh within one back-off step.
    idp.set_fault(Fault::None);
    assert!(
        eventually(Duration::from_secs(3), || idp.with(|s| s.calls) > calls
            && sc.sidecar.cache().status()[0].state == "ok")
        .await
    );
    let r = ask(&c, a, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200);
    idp.check_valid(r.token()).unwrap();
    sc.shutdown().await;
}

#[tokio::test]
async fn transient_cold_failure_is_429_with_retry_after() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(503, Some(7)));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } }),
        |o| o.policy.request_wait = Duration::from_secs(1),
    )
    .await;
    let c = client();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    // The provider asked for 7 s: beyond the 1 s bound, but one Retry-After reaches it, so
    // the answer comes at once and sends the client back a second before the next attempt.
    let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (5..=6).contains(&ra),
        "the provider's Retry-After is reflected: {ra}"
    );
    // While backing off, no new upstream call, and the Retry-After counts down.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429);
    let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((4..=5).contains(&ra), "retry-after {ra}");
    assert_eq!(idp.calls(), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_stalled_provider_answers_429_within_the_wait_bound() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::Stall);
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } }),
        |o| {
            o.policy.request_wait = Duration::from_millis(500);
        },
    )
    .await;
    let c = client();
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429);
    assert!(t.elapsed() < Duration::from_secs(2));
    sc.shutdown().await;
}

#[tokio::test]
async fn invalid_grant_is_a_non_429_error_and_the_provider_is_not_hammered() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::invalid_grant(None));
    let dir = tempfile::tempdir().unwrap();
    let sc = sidecar_with(
        &idp,
        dir.path(),
        json!({ "a": { "user": "u", "provider": "idp", "refreshToken": "revoked-rt" } }),
        |_| {},
    )
    .await;
    let c = client();
    for _ in 0..20 {
        let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.body["code"], "invalid_grant");
        assert_eq!(r.body["provider"], "idp");
        assert!(!r.body.to_string().contains("revoked-rt"));
    }
    assert_eq!(idp.calls(), 1);
    let status = sc.sidecar.cache().status();
    assert_eq!(status[0].state, "failed_permanent");
    sc.shutdown().await;
}

#[tokio::test]
async fn rotated_refresh_tokens_survive_a_restart_and_config_wins_when_changed() {
    let idp = MockIdp::start().await;
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(["rt-0".to_owned(), "reconsented".to_owned()].into());
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let accounts =
        |rt: &str| json!({ "a": { "user": "u", "provider": "idp", "refreshToken": rt } });

    let sc = sidecar_with(&idp, dir.path(), accounts("rt-0"), |o| {
        o.state_dir = Some(state.clone())
    })
    .await;
    let c = client();
    assert_eq!(
        ask(&c, sc.local_addr, "account=a&proto=imap", None)
            .await
            .status,
        200
    );
    sc.shutdown().await;
    let spent_first = idp.requests()[0].form["refresh_token"].clone();
    assert_eq!(spent_first, "rt-0");

    // Restart: the persisted rotated token is used, not the config's (now spent) one.
    let sc = sidecar_with(&idp, dir.path(), accounts("rt-0"), |o| {
        o.state_dir = Some(state.clone())
    })
    .await;
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let used = idp.requests()[1].form["refresh_token"].clone();
    assert_ne!(used, "rt-0");
    assert!(used.starts_with("rt-"));
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    sc.shutdown().await;

    // An operator re-consents: the new config token wins over the persisted one.
    let sc = sidecar_with(&idp, dir.path(), accounts("reconsented"), |o| {
        o.state_dir = Some(state.clone())
    })
    .await;
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(idp.requests()[2].form["refresh_token"], "reconsented");
    sc.shutdown().await;

    // The state files are private.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(state.join("refresh-tokens")).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test]
async fn non_loopback_listening_needs_allow_remote_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "accounts": { "pw": { "user": "u", "pass": "x" } } }),
    );
    let mut o = test_options(&cfg);
    o.listen = "0.0.0.0:0".parse().unwrap();
    let e = start(o.clone()).await.err().expect("refused").to_string();
    assert!(e.contains("--allow-remote"), "{e}");
    o.allow_remote = true;
    let e = start(o.clone())
        .await
        .err()
        .expect("refused without auth")
        .to_string();
    assert!(e.contains("auth"), "{e}");

    let cfg = write_config(
        dir.path(),
        &json!({
            "auth": { "username": "ee", "password": "secret" },
            "accounts": { "pw": { "user": "u", "pass": "x" } }
        }),
    );
    o.config_path = cfg;
    let sc = start(o)
        .await
        .expect("allowed with --allow-remote and auth");
    sc.shutdown().await;
}
