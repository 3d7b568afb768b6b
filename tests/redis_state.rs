//! The Redis state store (`--state redis://…`) against a real `redis-server` started by
//! the test on a free loopback port (no mock of Redis): rotations kept across restarts,
//! with and without a key; sealed records that were tampered with or copied to another
//! account refused and reported; warm restarts; Redis unavailable under load.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: (&str, &str) = ("admin", "admin-password-1");

fn key_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("state.keys");
    std::fs::write(&path, format!("{}\n", "5a".repeat(32))).unwrap();
    path
}

fn options(cfg: &Path, redis: &RedisServer, prefix: &str, key: Option<&Path>) -> Options {
    let mut o = test_options(cfg);
    o.state = Some(redis.url());
    o.state_prefix = prefix.to_owned();
    o.state_key_file = key.map(Path::to_owned);
    o.policy.min_ttl = Duration::from_secs(5);
    o.policy.request_wait = Duration::from_secs(2);
    o.forced_refresh_interval = Duration::ZERO;
    o
}

fn config(idp: &MockIdp, accounts: &[(&str, &str)]) -> Value {
    let accounts: serde_json::Map<String, Value> = accounts
        .iter()
        .map(|(a, rt)| {
            (
                a.to_string(),
                json!({ "user": format!("{a}@example.com"), "provider": "idp", "refreshToken": rt }),
            )
        })
        .collect();
    json!({ "adminAuth": { "username": ADMIN.0, "password": ADMIN.1 },
        "providers": { "idp": oauth2_provider(idp) }, "accounts": accounts })
}

fn strict_rotation(idp: &MockIdp, tokens: &[&str], lifetime: f64) {
    idp.with(|s| {
        s.rotate = true;
        s.lifetime = Some(lifetime);
        s.valid_refresh_tokens = Some(tokens.iter().map(|t| t.to_string()).collect());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_kept_in_redis_is_spent_after_a_restart_with_and_without_a_key() {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    // 100 s tokens: too short-lived to be taken from the store on restart, so the restarted
    // sidecar refreshes, with the rotated token (the config's is spent: reuse detected).
    strict_rotation(&idp, &["rt-plain", "rt-sealed"], 100.0);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    for (prefix, token, key) in [
        ("plain:", "rt-plain", None),
        ("sealed:", "rt-sealed", Some(keys.as_path())),
    ] {
        let cfg = write_config(dir.path(), &config(&idp, &[("a", token)]));
        let calls = idp.calls();
        let sc = start(options(&cfg, &redis, prefix, key)).await.unwrap();
        let r = ask(&client(), sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        sc.shutdown().await;
        let rec = redis.cli(&["HGET", &format!("{prefix}rt:a"), "rec"]);
        let stored: Value = serde_json::from_str(rec.trim()).expect(&rec);
        let live = idp.with(|s| s.valid_refresh_tokens.clone().unwrap());
        match key {
            None => assert!(live.contains(stored["refreshToken"].as_str().unwrap())),
            Some(_) => {
                assert_eq!(stored["version"], 2, "{stored}");
                assert!(
                    live.iter().all(|t| !rec.contains(t.as_str())),
                    "sealed: {rec}"
                );
            }
        }
        let sc = start(options(&cfg, &redis, prefix, key)).await.unwrap();
        let r = ask(&client(), sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(idp.calls(), calls + 2);
        sc.shutdown().await;
    }
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    // Nothing outside the prefixes.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(
        keys.lines()
            .all(|k| k.starts_with("plain:") || k.starts_with("sealed:")),
        "{keys}"
    );
}

/// `account` is not served, and the admin API says its stored record was refused for `why`.
async fn assert_refused_and_not_served(
    c: &reqwest::Client,
    addr: std::net::SocketAddr,
    account: &str,
    why: &str,
) {
    let r = ask(c, addr, &format!("account={account}&proto=imap"), None).await;
    assert_ne!(r.status, 200, "{account} must not be served: {}", r.body);
    let v = admin_account(c, addr, account, ADMIN).await;
    assert_eq!(v["persist"]["state"], "refused", "{account}: {v}");
    let e = v["persist"]["error"].as_str().unwrap();
    assert!(e.contains(why), "{account}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_redis_record_tampered_with_or_copied_to_another_account_is_refused_and_reported()
{
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    strict_rotation(&idp, &["rt-a", "rt-b", "rt-c"], 100.0);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let cfg = write_config(
        dir.path(),
        &config(&idp, &[("a", "rt-a"), ("b", "rt-b"), ("c", "rt-c")]),
    );
    let o = || options(&cfg, &redis, "eeas:", Some(&keys));
    let sc = start(o()).await.unwrap();
    for a in ["a", "b", "c"] {
        let r = ask(
            &client(),
            sc.local_addr,
            &format!("account={a}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    sc.shutdown().await;
    // a's record copied to b; c's record tampered with.
    let a_rec = redis.cli(&["HGET", "eeas:rt:a", "rec"]);
    redis.cli(&["HSET", "eeas:rt:b", "rec", a_rec.trim()]);
    let c_rec = redis.cli(&["HGET", "eeas:rt:c", "rec"]);
    let tampered = c_rec
        .trim()
        .replacen("\"sealed\":\"", "\"sealed\":\"AAAA", 1);
    redis.cli(&["HSET", "eeas:rt:c", "rec", &tampered]);

    let calls = idp.calls();
    let sc = start(o()).await.unwrap();
    let c = client();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "a is untouched: {}", r.body);
    for (account, why) in [("b", "another account"), ("c", "tampered")] {
        assert_refused_and_not_served(&c, sc.local_addr, account, why).await;
    }
    // Neither the copied nor the tampered token went to the provider.
    assert_eq!(idp.calls(), calls + 1, "only a's refresh");
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    sc.shutdown().await;
}

/// A plain record (what a store without a key holds) planted for an account.
fn plant_plain_record(redis: &RedisServer, account: &str, refresh_token: &str) {
    let planted = json!({ "version": 1, "account": account,
        "configTokenSha256": "0".repeat(64), "refreshToken": refresh_token,
        "generation": 9, "updatedAtUnix": 0 })
    .to_string();
    redis.cli(&["SADD", "eeas:accounts", account]);
    redis.cli(&["HSET", &format!("eeas:rt:{account}"), "rec", &planted]);
}

/// With a key, every record must be sealed: whoever can write to EmailEngine's Redis
/// could otherwise plant a refresh token of their own mailbox for an account (one that
/// waits for consent has no config token to tie the record to), and EmailEngine would
/// then read, and send, that account's mail through the planter's mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_a_plain_record_planted_in_the_store_is_refused_and_never_spent() {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    strict_rotation(&idp, &["rt-a", "rt-planted"], 100.0);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let mut cfg = config(&idp, &[("a", "rt-a")]);
    for waiting in ["d", "e"] {
        cfg["accounts"][waiting] =
            json!({ "user": format!("{waiting}@example.com"), "provider": "idp" });
    }
    let cfg = write_config(dir.path(), &cfg);
    // d's record is there before the sidecar starts; e's is planted while it runs (the
    // consent pick-up reads it).
    plant_plain_record(&redis, "d", "rt-planted");
    let mut o = options(&cfg, &redis, "eeas:", Some(&keys));
    o.consent_poll_interval = Duration::from_millis(200);
    let sc = start(o).await.unwrap();
    let c = client();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    plant_plain_record(&redis, "e", "rt-planted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for account in ["d", "e"] {
        assert_refused_and_not_served(&c, sc.local_addr, account, "not sealed").await;
    }
    assert_eq!(
        idp.calls(),
        1,
        "only a's refresh; the planted token never sent"
    );
    sc.shutdown().await;
    // Nothing was overwritten: the operator can still look at what was planted.
    assert!(redis
        .cli(&["HGET", "eeas:rt:d", "rec"])
        .contains("rt-planted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_on_a_warm_redis_store_makes_no_upstream_call_for_fresh_tokens() {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    let n = 50;
    let tokens: Vec<String> = (0..n).map(|i| format!("rt-{i}")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    strict_rotation(&idp, &refs, 3600.0);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let names: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(refs.iter().copied())
        .collect();
    let cfg = write_config(dir.path(), &config(&idp, &pairs));
    let o = || {
        let mut o = options(&cfg, &redis, "eeas:", Some(&keys));
        o.prewarm_concurrency = 8;
        o
    };
    let c = client();
    let sc = start(o()).await.unwrap();
    assert!(wait_ready(&c, sc.local_addr, Duration::from_secs(20)).await);
    assert_eq!(idp.calls(), n as u64);
    let mut before = Vec::new();
    for a in &names {
        let r = ask(&c, sc.local_addr, &format!("account={a}&proto=imap"), None).await;
        before.push(r.token().to_owned());
    }
    sc.shutdown().await;
    let sc = start(o()).await.unwrap();
    assert!(wait_ready(&c, sc.local_addr, Duration::from_secs(20)).await);
    for (a, old) in names.iter().zip(&before) {
        let r = ask(&c, sc.local_addr, &format!("account={a}&proto=imap"), None).await;
        assert_eq!(r.token(), old, "{a}: the kept token is served");
        idp.check_valid(r.token()).unwrap();
    }
    assert_eq!(idp.calls(), n as u64, "no upstream call after the restart");
    sc.shutdown().await;
}

/// How long Redis is down in the outage test (the 30 s).
const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_fresh_tokens_are_served_no_rotating_token_is_spent_and_it_recovers() {
    let mut redis = RedisServer::start_persistent().await;
    let idp = MockIdp::start().await;
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(
            (0..5)
                .map(|i| format!("rt-{i}"))
                .chain(["rt-short".to_owned()])
                .collect(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        &idp,
        &[
            ("f0", "rt-0"),
            ("f1", "rt-1"),
            ("f2", "rt-2"),
            ("f3", "rt-3"),
            ("f4", "rt-4"),
            ("short", "rt-short"),
        ],
    );
    // A grant that rotates nothing, refreshed throughout the outage; `short` on a client
    // of its own, so the mock tells its refreshes apart.
    cfg["accounts"]["app"] =
        json!({ "user": "app@example.com", "provider": "idp", "grant": "client_credentials" });
    cfg["providers"]["short"] = json!({ "type": "oauth2", "tokenUrl": idp.url("/token"),
        "clientId": "client-short", "clientSecret": "client-secret-value" });
    cfg["accounts"]["short"]["provider"] = json!("short");
    let cfg = write_config(dir.path(), &cfg);
    let mut o = options(&cfg, &redis, "eeas:", None);
    o.upstream_timeout = Duration::from_secs(1);
    o.policy.backoff_max = Duration::from_secs(2);
    o.policy.min_ttl = Duration::from_secs(1);
    o.policy.margin_floor = Duration::from_secs(1);
    let sc = start(o).await.unwrap();
    let c = client();
    // Fresh hour-long tokens for f*; 3 s tokens for `short` and `app`.
    for a in ["f0", "f1", "f2", "f3", "f4"] {
        let r = ask(&c, sc.local_addr, &format!("account={a}&proto=imap"), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    idp.set_lifetime(Some(3.0));
    for a in ["short", "app"] {
        let r = ask(&c, sc.local_addr, &format!("account={a}&proto=imap"), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let spent_by_short = |idp: &MockIdp| {
        idp.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.form.get("client_id").map(String::as_str) == Some("client-short"))
                .count()
        })
    };
    let cc_calls =
        |idp: &MockIdp| idp.with(|s| *s.calls_by_grant.get("client_credentials").unwrap_or(&0));

    // Load: the fresh accounts and the app-only one, all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), sc.local_addr);
        tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for a in ["f0", "f1", "f2", "f3", "f4", "app"] {
                    let r = ask(&c, addr, &format!("account={a}&proto=imap"), None).await;
                    if r.status == 200 {
                        ok += 1;
                    } else {
                        failed.push(format!("{a}: {} {}", r.status, r.body));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };

    redis.stop();
    let down_at = std::time::Instant::now();
    // Whatever was in flight at the stop settles; from then on `short` (its token expires
    // during the outage) must not be refreshed: its refresh token may rotate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let short_before = spent_by_short(&idp);
    let cc_before = cc_calls(&idp);
    let mut saw_down = false;
    while down_at.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let up = scraped(&c, sc.local_addr, "ee_auth_state_store_up").await;
        let down_for = scraped(&c, sc.local_addr, "ee_auth_state_store_unreachable_seconds")
            .await
            .unwrap_or(0.0);
        if up == Some(0.0) && down_for >= 5.0 {
            saw_down = true;
        }
        let ready = c
            .get(format!("http://{}/readyz", sc.local_addr))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(ready, 200, "readiness is not failed for the store");
    }
    assert!(saw_down, "metrics showed the store down and for how long");
    let v: Value = c
        .get(format!("http://{}/v1/accounts", sc.local_addr))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["stateStore"]["reachable"], false, "{}", v["stateStore"]);
    assert!(v["stateStore"]["unreachableSeconds"].as_u64().unwrap() >= 20);
    // `short` was due: its refreshes were tried and held back for want of the lease.
    let short = status_of(&sc, "short");
    let code = short[0].last_error.as_ref().map(|e| e.code.clone());
    assert_eq!(
        code.as_deref(),
        Some("state_unavailable"),
        "{:?}",
        short[0].state
    );
    assert_eq!(
        spent_by_short(&idp),
        short_before,
        "a rotating refresh token was spent without the lease"
    );
    assert!(
        cc_calls(&idp) >= cc_before + 5,
        "the app-only grant went on refreshing"
    );

    // Back: the store reconnects without a restart and `short` refreshes again.
    redis.restart().await;
    assert!(
        eventually(Duration::from_secs(20), || spent_by_short(&idp)
            > short_before)
        .await,
        "a refresh needing the lease went through after the store came back"
    );
    let r = ask(&c, sc.local_addr, "account=short&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        scraped(&c, sc.local_addr, "ee_auth_state_store_up").await,
        Some(1.0)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 500, "{ok}");
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    sc.shutdown().await;
}

fn migrate(from: &str, to: &str, keys: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ee-auth-sidecar"))
        .args(["state", "migrate", "--from", from, "--to", to])
        .arg("--state-key-file")
        .arg(keys)
        .output()
        .expect("the binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_migrate_copies_a_directory_into_redis_and_back_refusing_while_a_sidecar_holds_the_source(
) {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    strict_rotation(&idp, &["rt-a"], 100.0);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let cfg = write_config(dir.path(), &config(&idp, &[("a", "rt-a")]));
    let state = dir.path().join("state");
    let back = dir.path().join("back");
    let (s, b, url) = (state.to_str().unwrap(), back.to_str().unwrap(), redis.url());
    let on_dir = |d: &Path| {
        let mut o = test_options(&cfg);
        o.state_dir = Some(d.to_owned());
        o.state_key_file = Some(keys.clone());
        o
    };
    let c = client();
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // A rotation in the directory.
    let sc = start(on_dir(&state)).await.unwrap();
    assert_eq!(ask(&c, sc.local_addr, "account=a", None).await.status, 200);
    let out = migrate(s, &url, &keys);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused while held: {}",
        text(&out)
    );
    assert!(text(&out).contains("in use"), "{}", text(&out));
    sc.shutdown().await;
    let out = migrate(s, &url, &keys);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("copied 1 record"));

    // The Redis store has it (sealed): a sidecar on it spends the rotated token.
    let sc = start(options(&cfg, &redis, "eeas:", Some(&keys)))
        .await
        .unwrap();
    assert_eq!(ask(&c, sc.local_addr, "account=a", None).await.status, 200);
    let out = migrate(&url, b, &keys);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused while held: {}",
        text(&out)
    );
    sc.shutdown().await;
    let out = migrate(&url, b, &keys);
    assert!(out.status.success(), "{}", text(&out));

    // And back into a directory.
    let sc = start(on_dir(&back)).await.unwrap();
    assert_eq!(ask(&c, sc.local_addr, "account=a", None).await.status, 200);
    sc.shutdown().await;
    assert_eq!(idp.calls(), 3);
    assert_eq!(
        idp.with(|s| s.reuse_detected),
        0,
        "every store had the live token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_without_a_key_is_a_loud_warning_at_start() {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let cfg = write_config(dir.path(), &config(&idp, &[("a", "rt-a")]));
    let url = redis.url();
    let base = [
        "--config",
        cfg.to_str().unwrap(),
        "--state",
        &url,
        "--prewarm-concurrency",
        "0",
    ];
    let bin = env!("CARGO_BIN_EXE_ee-auth-sidecar");
    let plain = SidecarProc::spawn(bin, &base);
    let mut with_key = base.to_vec();
    with_key.extend(["--state-key-file", keys.to_str().unwrap()]);
    let sealed = SidecarProc::spawn(bin, &with_key);
    let warned = |p: &SidecarProc| {
        p.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("NOT ENCRYPTED") && l.contains("WARN"))
    };
    assert!(warned(&plain), "{:?}", plain.log.lock().unwrap());
    assert!(!warned(&sealed), "{:?}", sealed.log.lock().unwrap());
    plain.kill();
    sealed.kill();
}
