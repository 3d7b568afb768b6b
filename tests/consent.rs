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
    admin_account(c, sc.local_addr, account, ADMIN).await
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

/// A stale record (of an earlier config token) beside a newer config token that the
/// provider refuses: the poll re-reads it every round, but it is not the token to spend, so
/// nothing is sent until something changes.
#[tokio::test]
async fn a_stale_record_of_an_older_config_token_does_not_make_the_poll_call_the_provider() {
    let idp = MockIdp::start().await;
    idp.with(|s| s.valid_refresh_tokens = Some(["rt-stale".to_owned()].into()));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write_record(&state, "old", &sha256_hex("rt-earlier"), "rt-stale");
    let path = write_config(
        dir.path(),
        &config(
            &idp,
            json!({ "old": { "user": "old@example.com", "provider": "idp", "refreshToken": "rt-new-but-revoked" } }),
        ),
    );
    let mut o = test_options(&path);
    o.state_dir = Some(state.clone());
    o.consent_poll_interval = Duration::from_millis(50);
    let sc = start(o).await.unwrap();
    let c = client();
    let a = ask(&c, sc.local_addr, "account=old", None).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (403, Some("invalid_grant"))
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        idp.calls(),
        1,
        "the config's token was spent once, the stale record never"
    );
    sc.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// `consent`: the device flow

use common::authz::{DeviceStep, MockAuthz};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ee-auth-sidecar");
const OWNER: &str = "owner@example.com";

/// A config of one account `c` (user [`OWNER`]) waiting for consent at `authz`.
fn consent_config(dir: &Path, authz: &MockAuthz) -> std::path::PathBuf {
    write_config(
        dir,
        &json!({
            "providers": { "as": authz.provider() },
            "accounts": { "c": { "user": OWNER, "provider": "as", "scopes": ["mail.read", "mail.send"] } },
        }),
    )
}

/// Runs `ee-auth-sidecar consent` (off the test's runtime: the mock answers meanwhile).
async fn run_consent(config: &Path, state: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec![
        "consent".into(),
        "--config".into(),
        config.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "c".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_clear()
            .output()
            .expect("binary runs")
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing secret the mock handed out appears in `out`.
fn assert_no_secret(out: &str, authz: &MockAuthz) {
    for secret in [
        "device-code-secret",
        "auth-code-secret",
        "rt-consented",
        "at-consent",
        "consent-client-secret",
    ] {
        assert!(!out.contains(secret), "`{secret}` printed:\n{out}");
    }
    let id_token = common::authz::id_token(&authz.with(|s| s.signed_in.clone()));
    assert!(!out.contains(&id_token[..20]), "id_token printed:\n{out}");
}

/// Serves account `c` from `state` (in-process sidecar) and returns its answer.
async fn served_from(config: &Path, state: &Path) -> Answer {
    let mut o = test_options(config);
    o.state_dir = Some(state.to_owned());
    let sc = start(o).await.unwrap();
    let a = ask(&client(), sc.local_addr, "account=c&proto=imap", None).await;
    sc.shutdown().await;
    a
}

#[tokio::test]
async fn device_consent_prints_the_code_stores_the_token_and_the_sidecar_serves_it() {
    let authz = MockAuthz::start(OWNER).await;
    authz.with(|s| s.script = [DeviceStep::Pending].into());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);
    let out = run_consent(&config, &state, &["--flow", "device"]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("WDJB-MJHT"), "{stdout}");
    assert!(stdout.contains("http://mock.example/device"), "{stdout}");
    assert_no_secret(&format!("{stdout}{stderr}"), &authz);
    // Exactly the account's scopes plus what identifies the user.
    let asked = authz.with(|s| s.device_requests[0]["scope"].clone());
    assert_eq!(asked, "mail.read mail.send openid email");
    assert_eq!(
        authz.with(|s| s.polls.len()),
        2,
        "one pending, then the tokens"
    );

    let a = served_from(&config, &state).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.token().starts_with("at-refreshed-"), "{}", a.body);
}

#[tokio::test]
async fn a_wrong_user_is_refused_unless_accepted() {
    let authz = MockAuthz::start("mallory@example.com").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);
    let out = run_consent(&config, &state, &["--flow", "device"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("signed in as `mallory@example.com`"),
        "{stderr}"
    );
    assert!(stderr.contains("--accept-user"), "{stderr}");
    let stored = std::fs::read_dir(state.join("refresh-tokens"))
        .unwrap()
        .count();
    assert_eq!(stored, 0, "nothing stored");
    assert_eq!(served_from(&config, &state).await.status, 403);

    let out = run_consent(&config, &state, &["--flow", "device", "--accept-user"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(served_from(&config, &state).await.status, 200);
}

#[tokio::test]
async fn an_expired_or_declined_device_code_ends_with_a_clear_message() {
    let authz = MockAuthz::start(OWNER).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);
    for (step, says) in [
        (DeviceStep::Expired, "expired"),
        (DeviceStep::Denied, "declined"),
    ] {
        authz.with(|s| s.script = [DeviceStep::Pending, step].into());
        let out = run_consent(&config, &state, &[]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            stderr.contains("nothing was stored") || stderr.contains("run `consent` again"),
            "{stderr}"
        );
    }
    assert_eq!(served_from(&config, &state).await.status, 403);
}

/// The polling rules, on the paused clock: `interval`, `slow_down` adds 5 s for good,
/// `authorization_pending` waits on, and the code's expiry ends the wait.
#[tokio::test(start_paused = true)]
async fn device_polling_honours_interval_slow_down_and_expiry() {
    use ee_auth_sidecar::consent::{device_flow, ConsentError, Target};
    let authz = MockAuthz::start(OWNER).await;
    authz.with(|s| {
        s.interval = 5;
        s.script = [
            DeviceStep::Pending,
            DeviceStep::SlowDown,
            DeviceStep::Pending,
            DeviceStep::Unavailable,
        ]
        .into();
    });
    let dir = tempfile::tempdir().unwrap();
    let path = consent_config(dir.path(), &authz);
    let config = {
        let _frozen = freeze();
        ee_auth_sidecar::config::load(&path).unwrap()
    };
    let target = Target::of(config.account("c").unwrap(), None).unwrap();
    let http = ee_auth_sidecar::upstream::http_client(Duration::from_secs(30)).unwrap();
    let started = tokio::time::Instant::now();
    let mut prompt = None;
    let got = device_flow(&http, &target, |p| prompt = Some(p.clone())).await;
    assert!(got.is_ok());
    assert_eq!(prompt.unwrap().user_code, "WDJB-MJHT");
    let polls = authz.with(|s| s.polls.clone());
    let gaps: Vec<u64> = std::iter::once(started)
        .chain(polls.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs())
        .collect();
    assert_eq!(
        gaps,
        vec![5, 5, 10, 10, 20],
        "pending, slow_down (+5 s), pending, unavailable (backs off: twice the interval), approved"
    );

    // Never approved: the code's lifetime ends the wait, without polling past it.
    authz.with(|s| {
        s.polls.clear();
        s.expires_in = 30;
        s.after_script = Some(DeviceStep::Pending);
    });
    let started = tokio::time::Instant::now();
    let got = device_flow(&http, &target, |_| {}).await;
    assert!(
        matches!(got, Err(ConsentError::Expired(_))),
        "{:?}",
        got.err()
    );
    let polls = authz.with(|s| s.polls.clone());
    assert_eq!(polls.len(), 6, "every 5 s for 30 s");
    assert!(polls
        .iter()
        .all(|p| *p - started <= Duration::from_secs(30)));
}

// ---------------------------------------------------------------------------------------
// `consent`: the browser flow

/// A `consent --flow browser` run: the child, and the URL it printed to open.
struct BrowserRun {
    child: tokio::process::Child,
    url: String,
    /// The rest of its stdout, read on (a closed pipe would end the child).
    rest: tokio::task::JoinHandle<String>,
}

async fn start_browser_consent(
    authz: &MockAuthz,
    config: &Path,
    state: &Path,
    extra: &[&str],
) -> BrowserRun {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(BIN)
        .arg("consent")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["c", "--flow", "browser"])
        .args(extra)
        .env_clear()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            assert_no_secret(&line, authz);
            if line.starts_with("http://") {
                return line;
            }
        }
        panic!("no URL printed");
    })
    .await
    .expect("the URL is printed at once");
    let rest = tokio::spawn(async move {
        let mut out = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    BrowserRun { child, url, rest }
}

/// Plays the browser: opens the URL (the mock authorization endpoint signs the user in
/// and redirects) and follows the redirect to the consent's listener.
async fn play_browser(url: &str) -> (u16, String) {
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), 302, "{}", r.text().await.unwrap_or_default());
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    let r = c.get(&location).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn finish(run: BrowserRun) -> (Option<i32>, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), run.child.wait_with_output())
        .await
        .expect("consent exits")
        .unwrap();
    let stdout = run.rest.await.unwrap();
    (out.status.code(), format!("{stdout}{}", text(&out.stderr)))
}

#[tokio::test]
async fn browser_consent_with_pkce_stores_the_token_and_the_sidecar_serves_it() {
    let authz = MockAuthz::start(OWNER).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);
    let run = start_browser_consent(&authz, &config, &state, &[]).await;
    assert!(
        run.url.starts_with(&authz.url("/authorize?")),
        "{}",
        run.url
    );
    let (status, page) = play_browser(&run.url).await;
    assert_eq!(status, 200, "{page}");
    assert!(!page.contains("auth-code-secret"), "{page}");
    let (code, out) = finish(run).await;
    assert_eq!(code, Some(0), "{out}");
    assert_no_secret(&out, &authz);
    assert!(
        authz.with(|s| s.refusals.is_empty()),
        "{:?}",
        authz.with(|s| s.refusals.clone())
    );
    let asked = authz.with(|s| s.authorize_requests[0].clone());
    assert_eq!(asked["scope"], "mail.read mail.send openid email");
    assert_eq!(asked["code_challenge_method"], "S256");
    let a = served_from(&config, &state).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn a_forged_state_or_a_wrong_verifier_is_refused_and_nothing_is_stored() {
    let authz = MockAuthz::start(OWNER).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);

    authz.with(|s| s.tamper_state = Some("forged-state-0123456789".into()));
    let run = start_browser_consent(&authz, &config, &state, &[]).await;
    let (status, page) = play_browser(&run.url).await;
    assert_eq!(status, 400, "{page}");
    let (code, out) = finish(run).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("state"), "{out}");
    assert_eq!(
        authz.with(|s| s.token_requests.len()),
        0,
        "the code was not redeemed"
    );

    authz.with(|s| {
        s.tamper_state = None;
        s.tamper_challenge = true;
    });
    let run = start_browser_consent(&authz, &config, &state, &[]).await;
    play_browser(&run.url).await;
    let (code, out) = finish(run).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid_grant"), "{out}");
    assert_eq!(
        served_from(&config, &state).await.status,
        403,
        "nothing stored"
    );
}

#[tokio::test]
async fn a_browser_sign_in_that_never_comes_gives_up_with_a_clear_message() {
    let authz = MockAuthz::start(OWNER).await;
    let dir = tempfile::tempdir().unwrap();
    let config = consent_config(dir.path(), &authz);
    let run = start_browser_consent(
        &authz,
        &config,
        &dir.path().join("state"),
        &["--timeout", "10s"],
    )
    .await;
    let (code, out) = finish(run).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("did not finish within 10s"), "{out}");
}

#[tokio::test]
async fn consent_beside_a_running_sidecar_on_its_state_directory_is_served_at_once() {
    let authz = MockAuthz::start(OWNER).await;
    authz.with(|s| s.script = [DeviceStep::Pending].into());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = consent_config(dir.path(), &authz);
    let mut o = test_options(&config);
    o.state_dir = Some(state.clone());
    o.consent_poll_interval = Duration::from_millis(200);
    let sc = start(o).await.unwrap();
    let c = client();
    let before = ask(&c, sc.local_addr, "account=c&proto=imap", None).await;
    assert_eq!(before.status, 403, "{}", before.body);

    // The sidecar holds its state directory; the consent shares it.
    let out = run_consent(&config, &state, &["--flow", "device"]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let served = loop {
        let a = ask(&c, sc.local_addr, "account=c&proto=imap", None).await;
        if a.status == 200 || tokio::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        served.status, 200,
        "not served after the consent: {}",
        served.body
    );
    assert!(
        served.token().starts_with("at-refreshed-"),
        "{}",
        served.body
    );
    sc.shutdown().await;
}
