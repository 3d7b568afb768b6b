//! Scale properties (targets P4 and P6 in BENCHMARKS.md), as counts rather than timings:
//! 10,000 cold accounts requested at once make exactly 10,000 upstream calls, none twice,
//! never above the per-provider cap; a stalled provider has at most its cap of background
//! refreshes started. That tokens issued together have their refreshes spread over the
//! jitter window is specified on the paused clock (tests/timing.rs), where load cannot
//! make a refresh late.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{HeaderMap, Method, Uri};

/// The tests here drive many fetches at once, and the stalled-provider one samples the
/// refresh states over a few real seconds: they take turns rather than share the CPU.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_cold_accounts_make_exactly_ten_thousand_calls() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 10_000;
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, N));
    let mut o = test_options(&cfg);
    o.provider_concurrency = 16;
    o.policy.request_wait = Duration::from_secs(120);
    let sc = start(o).await.unwrap();
    let sidecar = sc.sidecar.clone();
    let headers = Arc::new(HeaderMap::new());
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let sidecar = sidecar.clone();
            let headers = headers.clone();
            tokio::spawn(async move {
                let uri: Uri = format!("/authentication?account=a{i}&proto=imap")
                    .parse()
                    .unwrap();
                ee_auth_sidecar::server::token(&sidecar, &Method::GET, &uri, &headers)
                    .await
                    .status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (calls, peak, spent) = idp.with(|s| {
        let mut spent: HashMap<String, usize> = HashMap::new();
        for r in &s.requests {
            *spent.entry(r.form["refresh_token"].clone()).or_default() += 1;
        }
        (s.calls, s.peak_inflight, spent)
    });
    assert_eq!(calls, N as u64);
    assert_eq!(spent.len(), N, "every account fetched");
    assert!(spent.values().all(|&n| n == 1), "no account fetched twice");
    assert!(peak <= 16, "per-provider cap exceeded: {peak}");
    sc.shutdown().await;
}

/// A stalled provider must not make every due refresh start at once (each started one
/// holds its whole fetch in memory while it waits): background refreshes of a provider
/// run at most `provider_concurrency` at a time, the rest wait as queue entries, and all
/// of them go out once the provider answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_provider_has_at_most_its_cap_of_background_refreshes_started() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 200;
    const CAP: usize = 4;
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(4.0));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &oauth2_accounts(&idp, N));
    let mut o = test_options(&cfg);
    o.provider_concurrency = CAP;
    o.prewarm_concurrency = 32;
    o.upstream_timeout = Duration::from_secs(2);
    // Margin 0.8 s: every refresh falls due 2.8–3.2 s after its token was issued.
    o.policy.margin_floor = Duration::ZERO;
    let sc = start(o).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || sc.sidecar.is_ready()).await);
    idp.set_fault(Fault::Stall);

    let count = |state: &str| {
        sc.sidecar
            .cache()
            .status()
            .iter()
            .filter(|s| s.state == state)
            .count()
    };
    let mut most = 0;
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        most = most.max(count("refreshing"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        (1..=CAP).contains(&most),
        "{most} refreshes started at once against a stalled provider with a cap of {CAP}"
    );

    idp.set_fault(Fault::None);
    let all_fresh = || {
        let status = sc.sidecar.cache().status();
        status.len() == N
            && status
                .iter()
                .all(|s| s.state == "ok" && s.token_remaining_seconds.is_some())
    };
    assert!(
        eventually(Duration::from_secs(30), all_fresh).await,
        "every account refreshed once the provider answers: {} ok of {N}",
        count("ok")
    );
    sc.shutdown().await;
}
