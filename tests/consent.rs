//! Accounts that wait for consent: a `refresh_token` account without `refreshToken` is
//! `needs_consent` and answered 403 `consent_required` (no upstream call) until a token
//! appears in the state store, which a running sidecar then uses without a restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: (&str, &str) = ("admin", "admin-pass");

fn config(idp: &MockIdp, accounts: Value) -> Value {
    json!({
        "adminAuth": { "username": ADMIN.0, "password": ADMIN.1 },
        "providers": { "idp": oauth2_provider(idp) },
        "accounts": accounts,
    })
}

/// Writes a refresh-token record into a state directory the way another process (the
/// `consent` command) does: the format of `src/state.rs`, atomically.
fn write_record(state_dir: &Path, account: &str, origin_hex: &str, token: &str) {
    let dir = state_dir.join("refresh-tokens");
    std::fs::create_dir_all(&dir).unwrap();
    let record = json!({
        "version": 1,
        "account": account,
        "configTokenSha256": origin_hex,
        "refreshToken": token,
        "updatedAtUnix": unix_now() as u64,
    });
    write_atomic(
        &dir.join(format!("{}.json", sha256_hex(account))),
        record.to_string().as_bytes(),
    );
}

async fn admin_state(c: &reqwest::Client, sc: &Running, account: &str) -> Value {
    let r = c
        .get(format!("http://{}/v1/accounts/{account}", sc.local_addr))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn an_account_without_a_token_waits_for_consent_and_takes_one_from_the_store_while_running() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = write_config(
        dir.path(),
        &config(
            &idp,
            json!({ "new": { "user": "new@example.com", "provider": "idp" } }),
        ),
    );
    let mut o = test_options(&path);
    o.state_dir = Some(state.clone());
    o.prewarm_concurrency = 4;
    o.consent_poll_interval = Duration::from_millis(100);
    let sc = start(o)
        .await
        .expect("a config with an account waiting for consent starts");
    let c = client();

    let a = ask(&c, sc.local_addr, "account=new&proto=imap", None).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(a.body["code"], "consent_required", "{}", a.body);
    let hint = a.body["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("ee-auth-sidecar consent"), "{}", a.body);
    assert_eq!(idp.calls(), 0, "nothing to spend: no upstream call");
    let view = admin_state(&c, &sc, "new").await;
    assert_eq!(
        view["credentialSets"][0]["state"], "needs_consent",
        "{view}"
    );
    assert_eq!(
        scraped(
            &c,
            sc.local_addr,
            "ee_auth_accounts{state=\"needs_consent\"}"
        )
        .await,
        Some(1.0)
    );

    // Another process stores a consented token: served without a restart.
    write_record(&state, "new", &"00".repeat(32), "rt-consented");
    let served = eventually(Duration::from_secs(10), || {
        idp.requests()
            .iter()
            .any(|r| r.form.get("refresh_token").map(String::as_str) == Some("rt-consented"))
    })
    .await;
    assert!(served, "the consented token was not picked up");
    let a = ask(&c, sc.local_addr, "account=new&proto=imap", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    idp.check_valid(a.token()).unwrap();
    let view = admin_state(&c, &sc, "new").await;
    assert_eq!(view["credentialSets"][0]["state"], "ok", "{view}");
    assert_eq!(
        scraped(
            &c,
            sc.local_addr,
            "ee_auth_accounts{state=\"needs_consent\"}"
        )
        .await,
        Some(0.0)
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn a_revoked_account_takes_a_re_consented_token_from_the_store_while_running() {
    let idp = MockIdp::start().await;
    idp.with(|s| s.valid_refresh_tokens = Some(["rt-fresh".to_owned()].into()));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = write_config(
        dir.path(),
        &config(
            &idp,
            json!({ "old": { "user": "old@example.com", "provider": "idp", "refreshToken": "rt-revoked" } }),
        ),
    );
    let mut o = test_options(&path);
    o.state_dir = Some(state.clone());
    o.consent_poll_interval = Duration::from_millis(100);
    let sc = start(o).await.unwrap();
    let c = client();
    let a = ask(&c, sc.local_addr, "account=old", None).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (403, Some("invalid_grant"))
    );
    let calls = idp.calls();

    // Polling a failed account reads the store; it calls nobody while nothing changed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idp.calls(), calls, "no upstream call without a new token");

    // Re-consent (by another process) descends from the config's token.
    write_record(&state, "old", &sha256_hex("rt-revoked"), "rt-fresh");
    assert!(
        eventually(Duration::from_secs(10), || idp.calls() > calls).await,
        "the re-consented token was not picked up"
    );
    let ok = eventually(Duration::from_secs(10), || {
        status_of(&sc, "old").iter().all(|s| s.state == "ok")
    })
    .await;
    assert!(ok, "{:?}", status_of(&sc, "old"));
    let a = ask(&c, sc.local_addr, "account=old", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    sc.shutdown().await;
}
