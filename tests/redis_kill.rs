//! One spender at a time across processes: two sidecar binaries on one Redis state store,
//! against a mock provider that rotates the refresh token on every use and detects any
//! reuse, with `kill -9` of either at random moments and a restart, at least 100 times.
//!
//! Each process incarnation has its own `clientId`, so the mock knows who spent what. A
//! reuse of the token a killed process spent last is a lost in-flight answer (no client
//! can close the window between the provider's rotation and the store's write) and is
//! forgiven; any other reuse means two live processes spent one token, and fails the
//! test. At the end every account must still refresh (none lost).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const ACCOUNTS: usize = 6;
const LIFETIME: f64 = 1.5;
const KILLS: usize = 100;

fn incarnation_config(dir: &Path, idp: &MockIdp, n: usize) -> PathBuf {
    let accounts: serde_json::Map<String, serde_json::Value> = (0..ACCOUNTS)
        .map(|i| {
            (
                format!("a{i}"),
                json!({ "user": format!("u{i}@example.com"), "provider": "idp", "refreshToken": format!("cfg-rt-{i}") }),
            )
        })
        .collect();
    let sub = dir.join(format!("incarnation-{n}"));
    std::fs::create_dir_all(&sub).unwrap();
    write_config(
        &sub,
        &json!({ "providers": { "idp": { "type": "oauth2", "tokenUrl": idp.url("/token"),
            "clientId": format!("client-{n}"), "clientSecret": "client-secret-value" } },
            "accounts": accounts }),
    )
}

fn spawn(cfg: &Path, redis: &RedisServer) -> SidecarProc {
    let url = redis.url();
    SidecarProc::spawn(
        env!("CARGO_BIN_EXE_ee-auth-sidecar"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--state",
            &url,
            "--log-level",
            "info",
            "--backoff-max",
            "1s",
            "--request-wait",
            "3s",
            "--upstream-timeout",
            "1s",
            "--reload-interval",
            "1h",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_store_killed_at_random_never_reuse_a_refresh_token() {
    let redis = RedisServer::start().await;
    let idp = MockIdp::start().await;
    idp.with(|s| {
        s.rotate = true;
        s.lifetime = Some(LIFETIME);
        s.valid_refresh_tokens = Some((0..ACCOUNTS).map(|i| format!("cfg-rt-{i}")).collect());
    });
    let dir = tempfile::tempdir().unwrap();
    let mut next = 0usize;
    let start_one = |next: &mut usize| {
        let n = *next;
        *next += 1;
        (n, spawn(&incarnation_config(dir.path(), &idp, n), &redis))
    };
    let mut slots = vec![start_one(&mut next), start_one(&mut next)];
    let addrs: Arc<Mutex<Vec<SocketAddr>>> =
        Arc::new(Mutex::new(slots.iter().map(|(_, p)| p.addr).collect()));

    // Request load on both processes meanwhile (failures during a restart are expected).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (addrs, stop) = (addrs.clone(), stop.clone());
        tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let mut ok = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let addr = {
                    let a = addrs.lock().unwrap();
                    a[fastrand::usize(..a.len())]
                };
                let acct = fastrand::usize(..ACCOUNTS);
                let url = format!("http://{addr}/authentication?account=a{acct}&proto=imap");
                if let Ok(r) = c.get(url).send().await {
                    ok += u64::from(r.status() == 200);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ok
        })
    };

    let started = Instant::now();
    let mut kills = 0;
    while kills < KILLS {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {kills} kills in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..250))).await;
        let slot = fastrand::usize(..slots.len());
        let (n, proc_) = slots.remove(slot);
        proc_.kill();
        idp.with(|s| s.dead_clients.insert(format!("client-{n}")));
        kills += 1;
        let fresh = start_one(&mut next);
        addrs.lock().unwrap()[slot] = fresh.1.addr;
        slots.insert(slot, fresh);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = load.await.unwrap();
    let elapsed = started.elapsed();

    // None lost: every account still refreshes on both processes (the tokens of the last
    // round have expired by then, so these are real refreshes).
    tokio::time::sleep(Duration::from_secs_f64(LIFETIME * 2.0)).await;
    let c = client();
    let mut lost = Vec::new();
    for i in 0..ACCOUNTS {
        for (_, p) in &slots {
            let r = ask(&c, p.addr, &format!("account=a{i}&proto=imap"), None).await;
            if r.status != 200 || idp.check_valid(r.token()).is_err() {
                lost.push(format!("a{i} on {}: {} {}", p.addr, r.status, r.body));
            }
        }
    }
    let (reused, forgiven, refreshes) = idp.with(|s| {
        (
            s.reused.clone(),
            s.reuse_forgiven,
            s.calls_by_grant["refresh_token"],
        )
    });
    println!(
        "{kills} kills in {elapsed:?}: {refreshes} refreshes, {served} tokens served, {forgiven} lost in-flight answers forgiven"
    );
    for (_, p) in slots {
        assert!(p.terminate(Duration::from_secs(10)).await.success());
    }
    assert!(lost.is_empty(), "accounts lost: {lost:?}");
    assert!(
        reused.is_empty(),
        "refresh tokens reused by a live process: {reused:?}"
    );
}
