//! Operations, in process: /metrics, the admin API, pre-warm and readiness, and the
//! per-provider cap on upstream calls. Real sidecar, real sockets, real mock identity
//! provider. Binary-level behaviour (signals, logs, CLI tools) is in tests/cli.rs.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One HTTP exchange: status, headers, body text.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }
}

async fn send(
    c: &reqwest::Client,
    method: reqwest::Method,
    addr: SocketAddr,
    path: &str,
    basic: Option<(&str, &str)>,
) -> Reply {
    let mut req = c.request(method, format!("http://{addr}{path}"));
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("sidecar answered");
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().await.unwrap(),
    }
}

async fn get(
    c: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    basic: Option<(&str, &str)>,
) -> Reply {
    send(c, reqwest::Method::GET, addr, path, basic).await
}

async fn post(
    c: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    basic: Option<(&str, &str)>,
) -> Reply {
    send(c, reqwest::Method::POST, addr, path, basic).await
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

fn requests(text: &str, proto: &str, outcome: &str) -> f64 {
    value(
        text,
        &format!(r#"ee_auth_requests_total{{proto="{proto}",outcome="{outcome}"}}"#),
    )
}

fn cache_events(text: &str, event: &str) -> f64 {
    value(
        text,
        &format!(r#"ee_auth_cache_events_total{{event="{event}"}}"#),
    )
}

fn refreshes(text: &str, provider: &str, outcome: &str) -> f64 {
    sample(
        text,
        &format!(r#"ee_auth_refreshes_total{{provider="{provider}",outcome="{outcome}"}}"#),
    )
    .unwrap_or(0.0)
}

fn accounts_in(text: &str, state: &str) -> f64 {
    value(text, &format!(r#"ee_auth_accounts{{state="{state}"}}"#))
}

/// Every issued access token and every refresh token the mock knows of.
fn mock_secrets(idp: &MockIdp) -> Vec<String> {
    idp.with(|s| {
        s.issued
            .keys()
            .cloned()
            .chain(s.spent.iter().cloned())
            .chain(s.valid_refresh_tokens.iter().flatten().cloned())
            .collect()
    })
}

fn assert_no_secret(haystack: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(
            !haystack.contains(s.as_str()),
            "{what} contains the secret {s}:\n{haystack}"
        );
    }
}

fn microsoft_provider(idp: &MockIdp) -> Value {
    json!({ "type": "microsoft", "clientId": "ms-client", "clientSecret": "ms-client-secret-value", "tokenUrl": idp.url("/ms/token") })
}

#[tokio::test]
async fn metrics_families_are_present_and_move_with_requests_refreshes_and_reloads() {
    let idp = MockIdp::start().await;
    idp.with(|s| s.delay = Duration::from_millis(800));
    let dir = tempfile::tempdir().unwrap();
    let accounts = json!({
        "alice-acct-id": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-alice-value" },
        "bob-acct-id": { "user": "b@example.com", "provider": "idp", "refreshToken": "rt-bob-value" },
        "carol-acct-id": { "user": "c@example.com", "provider": "idp", "refreshToken": "rt-carol-value" },
        "short-acct-id": { "user": "s@example.com", "provider": "idp", "refreshToken": "rt-short-value" },
        "mailbox-acct-id": { "user": "m@example.com", "pass": "mailbox-password-value" }
    });
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts }),
    );
    let mut o = test_options(&cfg);
    o.policy.backoff_base = Duration::from_millis(200);
    o.policy.backoff_max = Duration::from_millis(400);
    // Covers the mock's 800 ms answers below.
    o.policy.request_wait = Duration::from_secs(2);
    let sc = start(o).await.unwrap();
    let (c, a) = (client(), sc.local_addr);

    // Every family is there from the start (the per-provider ones once a provider is used).
    let m = scrape(&c, a).await;
    for family in [
        "ee_auth_requests_total counter",
        "ee_auth_request_duration_seconds histogram",
        "ee_auth_cache_events_total counter",
        "ee_auth_accounts gauge",
        "ee_auth_config_reloads_total counter",
        "ee_auth_config_last_reload_success_timestamp_seconds gauge",
        "ee_auth_token_min_remaining_seconds gauge",
        "ee_auth_state_persist_failures_total counter",
        "ee_auth_state_unpersisted_accounts gauge",
    ] {
        assert!(
            m.contains(&format!("# TYPE {family}")),
            "missing {family}:\n{m}"
        );
    }
    assert_eq!(
        value(&m, r#"ee_auth_config_reloads_total{outcome="ok"}"#),
        1.0
    );
    let loaded_at = value(&m, "ee_auth_config_last_reload_success_timestamp_seconds");
    assert!(
        (unix_now() - loaded_at).abs() < 60.0,
        "last reload {loaded_at}"
    );
    assert!(
        value(&m, "ee_auth_token_min_remaining_seconds").is_nan(),
        "no token cached yet: NaN, not a number that looks like one"
    );
    for state in ["ok", "refreshing", "failing_transient", "failed_permanent"] {
        assert_eq!(accounts_in(&m, state), 0.0);
    }

    // Ten concurrent cold requests: one miss, the others join it (or, if they are very
    // late, hit the stored token).
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { ask(&c, a, "account=alice-acct-id&proto=imap", None).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    for _ in 0..5 {
        assert_eq!(
            ask(&c, a, "account=alice-acct-id&proto=imap", None)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        ask(&c, a, "account=mailbox-acct-id&proto=smtp", None)
            .await
            .status,
        200
    );
    assert_eq!(
        ask(&c, a, "account=nobody&proto=api", None).await.status,
        404
    );
    assert_eq!(ask(&c, a, "proto=imap", None).await.status, 400);

    let m = scrape(&c, a).await;
    assert_eq!(requests(&m, "imap", "miss"), 1.0);
    let joined = requests(&m, "imap", "joined");
    assert!(joined >= 1.0, "concurrent cold requests join the one fetch");
    assert_eq!(requests(&m, "imap", "hit"), 14.0 - joined);
    assert_eq!(requests(&m, "smtp", "fixed"), 1.0);
    assert_eq!(requests(&m, "api", "not_found"), 1.0);
    assert_eq!(requests(&m, "none", "bad_request"), 1.0);
    assert_eq!(cache_events(&m, "miss"), 1.0);
    assert_eq!(cache_events(&m, "joined"), joined);
    assert_eq!(cache_events(&m, "hit"), 14.0 - joined);
    assert_eq!(
        value(
            &m,
            r#"ee_auth_request_duration_seconds_count{proto="imap"}"#
        ),
        15.0
    );
    // The miss waited ~0.8 s for the provider; the latency histogram saw it.
    assert!(value(&m, r#"ee_auth_request_duration_seconds_sum{proto="imap"}"#) >= 0.7);
    assert_eq!(refreshes(&m, "idp", "ok"), 1.0);
    assert_eq!(
        value(
            &m,
            r#"ee_auth_upstream_duration_seconds_count{provider="idp"}"#
        ),
        1.0
    );
    let upstream_sum = value(
        &m,
        r#"ee_auth_upstream_duration_seconds_sum{provider="idp"}"#,
    );
    assert!(
        (0.7..10.0).contains(&upstream_sum),
        "upstream latency {upstream_sum}"
    );
    assert_eq!(accounts_in(&m, "ok"), 1.0);
    let min_left = value(&m, "ee_auth_token_min_remaining_seconds");
    assert!(
        (3000.0..=3600.0).contains(&min_left),
        "min remaining {min_left}"
    );

    // A transient and a permanent failure.
    idp.with(|s| s.delay = Duration::ZERO);
    // The provider asks for 5 s, beyond the request's 2 s bound: the request is answered
    // after its one attempt (a shorter back-off would be ridden out, tests/outage.rs).
    idp.set_fault(Fault::status(503, Some(5)));
    assert_eq!(
        ask(&c, a, "account=bob-acct-id&proto=imap", None)
            .await
            .status,
        429
    );
    idp.set_fault(Fault::invalid_grant(None));
    assert_eq!(
        ask(&c, a, "account=carol-acct-id&proto=api", None)
            .await
            .status,
        403
    );
    idp.set_fault(Fault::None);
    let m = scrape(&c, a).await;
    assert_eq!(refreshes(&m, "idp", "transient"), 1.0);
    assert_eq!(refreshes(&m, "idp", "permanent"), 1.0);
    assert_eq!(requests(&m, "imap", "unavailable"), 1.0);
    assert_eq!(requests(&m, "api", "failed"), 1.0);
    assert_eq!(accounts_in(&m, "failed_permanent"), 1.0);
    assert_eq!(
        accounts_in(&m, "failing_transient")
            + accounts_in(&m, "refreshing")
            + accounts_in(&m, "ok"),
        2.0,
        "bob is failing (backing off) or already retrying: {m}"
    );

    // Stale-while-error: a 3 s token whose refresh fails is still served while valid.
    idp.set_lifetime(Some(3.0));
    assert_eq!(
        ask(&c, a, "account=short-acct-id&proto=smtp", None)
            .await
            .status,
        200
    );
    idp.set_fault(Fault::status(500, None));
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut stale = 0.0;
    while Instant::now() < deadline && stale == 0.0 {
        let r = ask(&c, a, "account=short-acct-id&proto=smtp", None).await;
        assert!(matches!(r.status, 200 | 429), "{}", r.status);
        stale = cache_events(&scrape(&c, a).await, "stale_served");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    idp.set_fault(Fault::None);
    assert!(
        stale >= 1.0,
        "a still-valid token was served after a failed refresh"
    );
    let m = scrape(&c, a).await;
    assert!(requests(&m, "smtp", "stale") >= 1.0);
    assert!(refreshes(&m, "idp", "transient") >= 2.0);

    // Reloads: a good one moves the counter and the timestamp, a bad one only its counter.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut accounts2 = accounts.clone();
    accounts2["dave-acct-id"] = json!({ "user": "d@example.com", "pass": "dave-password-value" });
    write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts2 }),
    );
    assert!(sc.sidecar.reload().await.unwrap(), "config changed");
    let m = scrape(&c, a).await;
    assert_eq!(
        value(&m, r#"ee_auth_config_reloads_total{outcome="ok"}"#),
        2.0
    );
    let reloaded_at = value(&m, "ee_auth_config_last_reload_success_timestamp_seconds");
    assert!(reloaded_at > loaded_at, "{reloaded_at} > {loaded_at}");
    std::fs::write(&cfg, b"{ \"accounts\": ").unwrap();
    assert!(sc.sidecar.reload().await.is_err());
    let m = scrape(&c, a).await;
    assert_eq!(
        value(&m, r#"ee_auth_config_reloads_total{outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        value(&m, r#"ee_auth_config_reloads_total{outcome="ok"}"#),
        2.0
    );
    assert_eq!(
        value(&m, "ee_auth_config_last_reload_success_timestamp_seconds"),
        reloaded_at,
        "a failed reload leaves the time of the last good one"
    );

    // Bounded labels: no account id, no secret anywhere in the exposition.
    for id in [
        "alice", "bob", "carol", "short", "mailbox", "dave", "nobody",
    ] {
        assert!(!m.contains(id), "account id {id} in metrics:\n{m}");
    }
    let mut secrets = mock_secrets(&idp);
    secrets.extend(
        [
            "rt-alice-value",
            "mailbox-password-value",
            "client-secret-value",
            "dave-password-value",
        ]
        .map(String::from),
    );
    assert_no_secret(&m, &secrets, "/metrics");
    sc.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_need_credentials_and_show_state_but_never_a_token() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let providers = json!({ "ms": microsoft_provider(&idp), "idp": oauth2_provider(&idp) });
    let accounts = json!({
        "outlook": { "user": "o@example.com", "provider": "ms", "refreshToken": "rt-outlook-value" },
        "revoked": { "user": "r@example.com", "provider": "ms", "refreshToken": "rt-revoked-value" },
        "team/shared": { "user": "t@example.com", "provider": "idp", "refreshToken": "rt-team-value" },
        "mailbox": { "user": "m@example.com", "pass": "mailbox-password-value" }
    });
    let auth = json!({ "username": "emailengine", "password": "token-endpoint-pw" });
    let cfg = write_config(
        dir.path(),
        &json!({ "auth": auth, "providers": providers, "accounts": accounts }),
    );
    let sc = start(test_options(&cfg)).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    let ee = Some(("emailengine", "token-endpoint-pw"));

    // Without `adminAuth`, the token endpoint's credentials guard the admin API.
    let r = get(&c, a, "/v1/accounts", None).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    assert_eq!(
        get(&c, a, "/v1/accounts", Some(("emailengine", "wrong")))
            .await
            .status,
        401
    );
    assert_eq!(get(&c, a, "/v1/accounts/outlook", None).await.status, 401);
    assert_eq!(
        post(&c, a, "/v1/accounts/outlook/refresh", None)
            .await
            .status,
        401
    );
    assert_eq!(idp.calls(), 0, "an unauthorized refresh does nothing");
    let r = get(&c, a, "/v1/accounts", ee).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Use one account over IMAP, fail another with an AADSTS code.
    let t = ask(&c, a, "account=outlook&proto=imap", ee).await;
    assert_eq!(t.status, 200);
    idp.set_fault(Fault::invalid_grant(Some(70008)));
    assert_eq!(
        ask(&c, a, "account=revoked&proto=imap", ee).await.status,
        403
    );
    idp.set_fault(Fault::None);
    assert_eq!(ask(&c, a, "account=team%2Fshared", ee).await.status, 200);

    let r = get(&c, a, "/v1/accounts", ee).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.json();
    assert_eq!(body["ready"], true);
    assert!(body["config"]["lastSuccessAt"].is_string());
    let ids: Vec<&str> = body["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mailbox", "outlook", "revoked", "team/shared"]);

    let outlook = get(&c, a, "/v1/accounts/outlook", ee).await.json();
    assert_eq!(outlook["type"], "oauth2");
    let sets = outlook["credentialSets"].as_array().unwrap();
    assert_eq!(sets.len(), 2, "Outlook IMAP/SMTP and Graph: {outlook}");
    let imap = sets
        .iter()
        .find(|s| s["protocols"].as_array().unwrap().contains(&json!("imap")))
        .unwrap();
    assert_eq!(imap["protocols"], json!(["default", "imap", "smtp"]));
    assert_eq!(imap["state"], "ok");
    assert_eq!(imap["provider"], "ms");
    assert_eq!(imap["grant"], "refresh_token");
    assert!(imap["tokenExpiresAt"].as_str().unwrap().ends_with('Z'));
    assert!(imap["lastRefreshAt"].is_string());
    assert!(imap["tokenRemainingSeconds"].as_u64().unwrap() > 3000);
    assert!(imap["lastError"].is_null());
    let graph = sets
        .iter()
        .find(|s| s["protocols"] == json!(["api"]))
        .unwrap();
    assert_eq!(graph["state"], "idle", "never asked for: {graph}");
    assert!(graph["scopes"][0]
        .as_str()
        .unwrap()
        .contains("graph.microsoft.com"));

    let revoked = get(&c, a, "/v1/accounts/revoked", ee).await.json();
    let set = &revoked["credentialSets"][0];
    assert_eq!(set["state"], "failed_permanent");
    assert_eq!(set["lastError"]["class"], "permanent");
    assert_eq!(set["lastError"]["code"], "invalid_grant");
    assert_eq!(set["lastError"]["providerCode"], "AADSTS70008");
    assert!(set["lastError"]["at"].is_string());
    assert!(set["tokenExpiresAt"].is_null());

    // Ids are percent-decoded path segments; unknown ids and wrong methods are refused.
    let team = get(&c, a, "/v1/accounts/team%2Fshared", ee).await;
    assert_eq!(team.status, 200);
    assert_eq!(team.json()["credentialSets"][0]["state"], "ok");
    assert_eq!(get(&c, a, "/v1/accounts/nobody", ee).await.status, 404);
    let mailbox = get(&c, a, "/v1/accounts/mailbox", ee).await.json();
    assert_eq!(mailbox["type"], "fixed");
    let r = send(&c, reqwest::Method::DELETE, a, "/v1/accounts/outlook", ee).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET");
    let r = get(&c, a, "/v1/accounts/outlook/refresh", ee).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");

    // Everything the admin API said, and no token or secret in any of it.
    let mut seen = String::new();
    for path in [
        "/v1/accounts",
        "/v1/accounts/outlook",
        "/v1/accounts/revoked",
        "/v1/accounts/mailbox",
    ] {
        seen.push_str(&get(&c, a, path, ee).await.text);
    }
    seen.push_str(&post(&c, a, "/v1/accounts/outlook/refresh", ee).await.text);
    let mut secrets = mock_secrets(&idp);
    assert!(secrets.iter().any(|s| s == t.token()));
    secrets.extend(
        [
            "rt-outlook-value",
            "rt-revoked-value",
            "rt-team-value",
            "mailbox-password-value",
            "ms-client-secret-value",
            "client-secret-value",
            "token-endpoint-pw",
        ]
        .map(String::from),
    );
    assert_no_secret(&seen, &secrets, "admin API");

    // A separate `adminAuth`: the token endpoint's credentials no longer open the admin
    // API, and the admin credentials do not open the token endpoint.
    write_config(
        dir.path(),
        &json!({ "auth": auth, "adminAuth": { "username": "ops", "password": "admin-pw" }, "providers": providers, "accounts": accounts }),
    );
    assert!(sc.sidecar.reload().await.unwrap());
    let ops = Some(("ops", "admin-pw"));
    assert_eq!(get(&c, a, "/v1/accounts", ee).await.status, 401);
    assert_eq!(get(&c, a, "/v1/accounts", None).await.status, 401);
    assert_eq!(get(&c, a, "/v1/accounts", ops).await.status, 200);
    assert_eq!(
        post(&c, a, "/v1/accounts/team%2Fshared/refresh", ops)
            .await
            .status,
        200
    );
    assert_eq!(
        ask(&c, a, "account=outlook&proto=imap", ops).await.status,
        401
    );
    assert_eq!(
        ask(&c, a, "account=outlook&proto=imap", ee).await.status,
        200
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn forced_refresh_renews_the_sets_in_use_single_flight_and_reports_each() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "adminAuth": { "username": "ops", "password": "ops-pw" },
            "providers": { "ms": microsoft_provider(&idp) },
            "accounts": {
                "outlook": { "user": "o@example.com", "provider": "ms", "refreshToken": "rt-outlook" },
                "mailbox": { "user": "m@example.com", "pass": "x" }
            }
        }),
    );
    // Forced refreshes back to back: their rate limit has a test of its own.
    let mut o = test_options(&cfg);
    o.forced_refresh_interval = Duration::ZERO;
    let sc = start(o).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    let ops = Some(("ops", "ops-pw"));

    let first = ask(&c, a, "account=outlook&proto=imap", None).await;
    assert_eq!(first.status, 200);
    assert!(idp.requests()[0]
        .scope()
        .unwrap_or_default()
        .contains("IMAP.AccessAsUser.All"));

    // Only IMAP is in use: the refresh renews that set and leaves Graph alone.
    let r = post(&c, a, "/v1/accounts/outlook/refresh", ops).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = r.json();
    assert_eq!(
        (body["refreshed"].clone(), body["failed"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(body["credentialSets"][0]["refreshed"], true);
    assert_eq!(body["credentialSets"][0]["state"], "ok");
    assert_eq!(idp.calls(), 2);
    assert!(idp.requests()[1]
        .scope()
        .unwrap_or_default()
        .contains("IMAP.AccessAsUser.All"));
    let second = ask(&c, a, "account=outlook&proto=imap", None).await;
    assert_ne!(
        second.token(),
        first.token(),
        "the refreshed token is served"
    );
    idp.check_valid(second.token()).unwrap();

    // Once Graph is used too, both sets are renewed.
    assert_eq!(
        ask(&c, a, "account=outlook&proto=api", None).await.status,
        200
    );
    assert!(idp.requests()[2]
        .scope()
        .unwrap_or_default()
        .contains("graph.microsoft.com"));
    let body = post(&c, a, "/v1/accounts/outlook/refresh", ops)
        .await
        .json();
    assert_eq!(body["refreshed"], 2);
    assert_eq!(idp.calls(), 5);
    let scopes: HashSet<bool> = (3..5)
        .map(|n| {
            idp.requests()[n]
                .scope()
                .unwrap_or_default()
                .contains("graph")
        })
        .collect();
    assert_eq!(scopes.len(), 2, "one IMAP and one Graph refresh");

    // Single flight: five concurrent forced refreshes and a stream of token requests make
    // one upstream call per set.
    idp.with(|s| s.delay = Duration::from_millis(700));
    let posts: Vec<_> = (0..5)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { post(&c, a, "/v1/accounts/outlook/refresh", ops).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        assert_eq!(
            ask(&c, a, "account=outlook&proto=imap", None).await.status,
            200
        );
    }
    for p in posts {
        let r = p.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["refreshed"], 2);
    }
    assert_eq!(idp.calls(), 7, "2 sets, one call each");
    idp.with(|s| s.delay = Duration::ZERO);

    // A refused refresh is reported per set, with the provider's code, as a 502.
    idp.set_fault(Fault::invalid_grant(Some(70008)));
    let r = post(&c, a, "/v1/accounts/outlook/refresh", ops).await;
    assert_eq!(r.status, 502, "{}", r.text);
    let body = r.json();
    assert_eq!(
        (body["refreshed"].clone(), body["failed"].clone()),
        (json!(0), json!(2))
    );
    for set in body["credentialSets"].as_array().unwrap() {
        assert_eq!(set["refreshed"], false);
        assert_eq!(set["state"], "failed_permanent");
        assert_eq!(set["lastError"]["providerCode"], "AADSTS70008");
        assert!(
            set["error"].as_str().unwrap().contains("invalid_grant"),
            "{set}"
        );
    }
    assert!(!r.text.contains("rt-outlook") && !r.text.contains("ms-client-secret-value"));
    // The access token from before is still valid and still served.
    let still = ask(&c, a, "account=outlook&proto=imap", None).await;
    assert_eq!(still.status, 200);
    idp.check_valid(still.token()).unwrap();
    idp.set_fault(Fault::None);
    assert_eq!(
        post(&c, a, "/v1/accounts/outlook/refresh", ops)
            .await
            .status,
        200
    );

    let r = post(&c, a, "/v1/accounts/mailbox/refresh", ops).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["refreshed"], 0);
    assert_eq!(
        post(&c, a, "/v1/accounts/nobody/refresh", ops).await.status,
        404
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn prewarm_makes_the_first_requests_hits_and_readiness_waits_for_it() {
    let idp = MockIdp::start().await;
    idp.with(|s| s.delay = Duration::from_millis(400));
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = serde_json::Map::new();
    for i in 0..11 {
        accounts.insert(
            format!("acct-{i}"),
            json!({ "user": format!("u{i}@example.com"), "provider": "idp", "refreshToken": format!("rt-{i}") }),
        );
    }
    // Explicit protocol overrides are warmed too: 11 + 2 credential sets in all.
    accounts.insert(
        "split".into(),
        json!({ "user": "s@example.com", "provider": "idp", "refreshToken": "rt-s", "scopes": ["mail"], "protocols": { "api": { "scopes": ["api"] } } }),
    );
    accounts.insert(
        "mailbox".into(),
        json!({ "user": "m@example.com", "pass": "x" }),
    );
    let cfg = write_config(
        dir.path(),
        &json!({ "adminAuth": { "username": "ops", "password": "ops-pw" }, "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts }),
    );
    let mut o = test_options(&cfg);
    o.prewarm_concurrency = 3;
    let sc = start(o).await.unwrap();
    let (c, a) = (client(), sc.local_addr);

    // Every fetch takes 400 ms, so nothing can have finished yet.
    let r = get(&c, a, "/readyz", None).await;
    assert_eq!((r.status, r.text.as_str()), (503, "warming up\n"));
    assert_eq!(
        get(&c, a, "/healthz", None).await.status,
        200,
        "alive while warming"
    );
    assert_eq!(
        get(&c, a, "/v1/accounts", Some(("ops", "ops-pw")))
            .await
            .json()["ready"],
        false
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&c, a, "/readyz", None).await;
        if r.status == 200 {
            assert_eq!(r.text, "ready\n");
            break;
        }
        assert_eq!(r.status, 503);
        // Not ready while any pre-warm fetch is still outstanding.
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(idp.calls(), 13, "ready only once every set was fetched");
    assert_eq!(idp.with(|s| s.inflight), 0);
    let peak = idp.with(|s| s.peak_inflight);
    assert!(
        (2..=3).contains(&peak),
        "pre-warm concurrency bounded at 3, used: peak {peak}"
    );

    // The first request of every account is a hit: no request waits on the provider.
    for i in 0..11 {
        let r = ask(&c, a, &format!("account=acct-{i}&proto=imap"), None).await;
        assert_eq!(r.status, 200);
        idp.check_valid(r.token()).unwrap();
    }
    assert_eq!(
        ask(&c, a, "account=split&proto=smtp", None).await.status,
        200
    );
    assert_eq!(
        ask(&c, a, "account=split&proto=api", None).await.status,
        200
    );
    assert_eq!(idp.calls(), 13);
    let m = scrape(&c, a).await;
    assert_eq!(requests(&m, "imap", "hit"), 11.0);
    assert_eq!(requests(&m, "smtp", "hit"), 1.0);
    assert_eq!(requests(&m, "api", "hit"), 1.0);
    assert_eq!(cache_events(&m, "miss") + cache_events(&m, "joined"), 0.0);
    sc.shutdown().await;
}

#[tokio::test]
async fn readiness_stops_waiting_for_prewarm_after_the_timeout() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::Stall);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "stuck": { "user": "u", "provider": "idp", "refreshToken": "rt" } } }),
    );
    let mut o = test_options(&cfg);
    o.prewarm_concurrency = 8;
    o.prewarm_timeout = Duration::from_millis(1500);
    o.shutdown_grace = Duration::from_millis(500);
    let started = Instant::now();
    let sc = start(o).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    assert_eq!(get(&c, a, "/readyz", None).await.status, 503);
    assert!(eventually(Duration::from_secs(10), || sc.sidecar.is_ready()).await);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "ready only after --prewarm-timeout, not before: {:?}",
        started.elapsed()
    );
    assert_eq!(get(&c, a, "/readyz", None).await.status, 200);
    assert_eq!(idp.calls(), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn the_provider_cap_holds_under_a_cold_start_of_500_accounts() {
    assert_eq!(
        Options::new("x").provider_concurrency,
        16,
        "the default cap"
    );
    // Two providers on two mocks: the cap is per provider, each mock sees at most 16.
    let (ms, google) = (MockIdp::start().await, MockIdp::start().await);
    for idp in [&ms, &google] {
        idp.with(|s| s.delay = Duration::from_millis(60));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = serde_json::Map::new();
    for i in 0..500 {
        let provider = if i % 2 == 0 { "a" } else { "b" };
        accounts.insert(
            format!("acct-{i}"),
            json!({ "user": format!("u{i}@example.com"), "provider": provider, "refreshToken": format!("rt-{i}") }),
        );
    }
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "a": oauth2_provider(&ms), "b": oauth2_provider(&google) }, "accounts": accounts }),
    );
    let mut o = test_options(&cfg);
    // Pre-warm wider than the cap, and EmailEngine asking for every account at once.
    o.prewarm_concurrency = 100;
    o.policy.request_wait = Duration::from_secs(30);
    let sc: Running = start(o).await.unwrap();
    let a = sc.local_addr;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(600)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                (
                    i,
                    ask(&c, a, &format!("account=acct-{i}&proto=imap"), None).await,
                )
            })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "acct-{i}: {}", r.body);
        let idp = if i % 2 == 0 { &ms } else { &google };
        idp.check_valid(r.token()).unwrap();
    }
    for idp in [&ms, &google] {
        let (calls, peak) = idp.with(|s| (s.calls, s.peak_inflight));
        assert_eq!(
            calls, 250,
            "one fetch per account, pre-warm and requests joined"
        );
        assert!(peak <= 16, "the provider saw {peak} concurrent calls");
        // 250 queued 60 ms calls: the cap, not anything else, is what limits.
        assert!(peak >= 8, "the cap is used: peak {peak}");
    }
    assert!(eventually(Duration::from_secs(10), || sc.sidecar.is_ready()).await);
    sc.shutdown().await;
}

#[test]
fn lifecycle_flags_have_the_documented_defaults() {
    use clap::Parser;
    use ee_auth_sidecar::cli::Cli;
    let cli = Cli::parse_from(["ee-auth-sidecar", "--config", "accounts.json"]);
    let o = cli.serve.into_options().unwrap();
    assert_eq!(o.prewarm_concurrency, 8);
    assert_eq!(o.prewarm_timeout, Duration::from_secs(20));
    assert_eq!(o.provider_concurrency, 16);
    assert_eq!(o.shutdown_grace, Duration::from_secs(5));
    let cli = Cli::parse_from([
        "ee-auth-sidecar",
        "--config",
        "accounts.json",
        "--prewarm-concurrency",
        "2",
        "--prewarm-timeout",
        "3s",
        "--provider-concurrency",
        "4",
        "--shutdown-grace",
        "1500ms",
    ]);
    let o = cli.serve.into_options().unwrap();
    assert_eq!(
        (
            o.prewarm_concurrency,
            o.prewarm_timeout,
            o.provider_concurrency,
            o.shutdown_grace
        ),
        (2, Duration::from_secs(3), 4, Duration::from_millis(1500))
    );
}

#[tokio::test]
async fn the_admin_api_is_closed_when_the_config_has_no_credentials() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" } } }),
    );
    let sc = start(test_options(&cfg)).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    assert_eq!(ask(&c, a, "account=a", None).await.status, 200);
    assert_eq!(idp.calls(), 1);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/accounts"),
        (reqwest::Method::GET, "/v1/accounts/a"),
        (reqwest::Method::POST, "/v1/accounts/a/refresh"),
    ] {
        for basic in [None, Some(("any", "thing"))] {
            let r = send(&c, method.clone(), a, path, basic).await;
            assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
            let error = r.json()["error"].as_str().unwrap().to_owned();
            assert!(
                error.contains("admin API is closed") && error.contains("adminAuth"),
                "the body says why and what to do: {error}"
            );
        }
    }
    assert_eq!(idp.calls(), 1, "no forced refresh ran");
    // The token endpoint, health and metrics stay open.
    assert_eq!(ask(&c, a, "account=a", None).await.status, 200);
    assert_eq!(get(&c, a, "/healthz", None).await.status, 200);
    scrape(&c, a).await;

    // `adminAuth` alone opens the admin API and leaves the token endpoint open.
    write_config(
        dir.path(),
        &json!({ "adminAuth": { "username": "ops", "password": "ops-pw" }, "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" } } }),
    );
    assert!(sc.sidecar.reload().await.unwrap());
    assert_eq!(get(&c, a, "/v1/accounts", None).await.status, 401);
    assert_eq!(
        get(&c, a, "/v1/accounts", Some(("ops", "ops-pw")))
            .await
            .status,
        200
    );
    assert_eq!(ask(&c, a, "account=a", None).await.status, 200);
    sc.shutdown().await;
}

#[tokio::test]
async fn forced_refreshes_of_a_credential_set_are_rate_limited() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "adminAuth": { "username": "ops", "password": "ops-pw" }, "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" },
            "b": { "user": "b@example.com", "provider": "idp", "refreshToken": "rt-b" } } }),
    );
    let mut o = test_options(&cfg);
    o.forced_refresh_interval = Duration::from_secs(2);
    let sc = start(o).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    let ops = Some(("ops", "ops-pw"));
    assert_eq!(ask(&c, a, "account=a", None).await.status, 200);
    assert_eq!(post(&c, a, "/v1/accounts/a/refresh", ops).await.status, 200);
    assert_eq!(idp.calls(), 2);

    // Again at once: refused with a Retry-After, no upstream call.
    let r = post(&c, a, "/v1/accounts/a/refresh", ops).await;
    assert_eq!(r.status, 429, "{}", r.text);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(r.json()["error"].as_str().unwrap().contains("Retry-After"));
    assert_eq!(idp.calls(), 2, "no upstream call");
    // Per credential set: another account is not held back.
    assert_eq!(post(&c, a, "/v1/accounts/b/refresh", ops).await.status, 200);
    assert_eq!(idp.calls(), 3);

    // Once the interval has passed, a forced refresh runs again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(post(&c, a, "/v1/accounts/a/refresh", ops).await.status, 200);
    assert_eq!(idp.calls(), 4);
    sc.shutdown().await;
}

#[tokio::test]
async fn the_account_list_pages_and_filters_by_state() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = serde_json::Map::new();
    for i in 0..7 {
        accounts.insert(
            format!("acct-{i}"),
            json!({ "user": format!("u{i}@example.com"), "provider": "idp", "refreshToken": format!("rt-{i}") }),
        );
    }
    accounts.insert("mailbox".into(), json!({ "user": "m", "pass": "x" }));
    let cfg = write_config(
        dir.path(),
        &json!({ "adminAuth": { "username": "ops", "password": "ops-pw" }, "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts }),
    );
    let sc = start(test_options(&cfg)).await.unwrap();
    let (c, a) = (client(), sc.local_addr);
    let ops = Some(("ops", "ops-pw"));
    for i in [1, 4] {
        assert_eq!(
            ask(&c, a, &format!("account=acct-{i}"), None).await.status,
            200
        );
    }
    idp.set_fault(Fault::invalid_grant(None));
    assert_eq!(ask(&c, a, "account=acct-5", None).await.status, 403);

    let ids = |v: &Value| -> Vec<String> {
        v["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = get(&c, a, "/v1/accounts", ops).await.json();
    assert_eq!(ids(&all).len(), 8);
    assert_eq!(all["total"], 8);
    assert!(all["nextOffset"].is_null());

    let page = get(&c, a, "/v1/accounts?limit=3&offset=2", ops)
        .await
        .json();
    assert_eq!(ids(&page), ["acct-2", "acct-3", "acct-4"]);
    assert_eq!(
        (page["total"].clone(), page["nextOffset"].clone()),
        (json!(8), json!(5))
    );
    let last = get(&c, a, "/v1/accounts?limit=3&offset=6", ops)
        .await
        .json();
    assert_eq!(ids(&last), ["acct-6", "mailbox"]);
    assert!(last["nextOffset"].is_null());

    let ok = get(&c, a, "/v1/accounts?state=ok", ops).await.json();
    assert_eq!(ids(&ok), ["acct-1", "acct-4"]);
    assert_eq!(ok["total"], 2);
    let failed = get(&c, a, "/v1/accounts?state=failed_permanent", ops)
        .await
        .json();
    assert_eq!(ids(&failed), ["acct-5"]);
    assert_eq!(
        failed["accounts"][0]["credentialSets"][0]["lastError"]["code"],
        "invalid_grant"
    );
    let idle = get(&c, a, "/v1/accounts?state=idle&limit=2&offset=1", ops)
        .await
        .json();
    assert_eq!(ids(&idle), ["acct-2", "acct-3"]);
    assert_eq!(
        (idle["total"].clone(), idle["nextOffset"].clone()),
        (json!(4), json!(3))
    );

    for bad in ["limit=0", "limit=x", "offset=-1", "state=broken"] {
        let r = get(&c, a, &format!("/v1/accounts?{bad}"), ops).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
    }
    sc.shutdown().await;
}
