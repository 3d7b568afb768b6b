//! Identity-provider faults, end to end: the real sidecar (in-process) against the real
//! mock identity provider, with continuous requests while a fault lasts several token
//! lifetimes (2 s tokens, 7 s faults). For every fault the same five rules are checked:
//!
//! 1. an account that holds a valid token is served (200) for as long as that token is
//!    valid (minus a small margin), however the provider fails;
//! 2. no answer ever carries an expired token: the mock knows every token's expiry and
//!    checks it when the answer arrives;
//! 3. every other request gets 429 with a Retry-After, within a bounded time (never hangs);
//! 4. the upstream call rate stays within the back-off schedule (no hammering);
//! 5. when the fault clears, every account is fresh again within one back-off step.
//!
//! Faults: 500; 503 and 429 with Retry-After; a connection reset (also on keep-alive
//! connections); connection refused; a connect timeout; a stalled response (no headers);
//! and 200 answers with an empty body, garbage, or JSON without `access_token`.
//!
//! Refused and connect-timeout faults are made by a small TCP gate between the sidecar and
//! the mock, on loopback only: "refused" closes the gate's listening socket (the kernel
//! answers SYNs with RST); "connect timeout" replaces it with a listener whose accept queue
//! (backlog 0) is filled by one connection that is never accepted, so Linux drops further
//! SYNs and connects hang until the sidecar's connect timeout. Opening the fault also cuts
//! every connection the gate was carrying, so pooled keep-alive connections die with it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Token lifetime the mock issues (seconds).
const LIFETIME: f64 = 2.0;
/// How long each fault lasts: three and a half token lifetimes.
const FAULT_FOR: Duration = Duration::from_millis(7000);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_millis(1000);
const REQUEST_WAIT: Duration = Duration::from_millis(1000);
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1000);
/// Accounts that hold a token when the fault starts.
const HOLDERS: usize = 4;
/// Accounts first asked for during the fault.
const COLD: usize = 2;
/// A holder must be served while its token has more than this left when it asks.
const SERVE_MARGIN: Duration = Duration::from_millis(300);
/// No request may take longer than this (the bounded deadline of rule 3).
const DEADLINE: Duration = Duration::from_millis(2500);
/// Time between two requests of one account.
const PACE: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// The gate: a loopback TCP forwarder that can refuse or black-hole connections.

#[derive(Clone, Copy, Debug, PartialEq)]
enum GateMode {
    Forward,
    Refuse,
    Blackhole,
}

#[derive(Default)]
struct GateInner {
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    blackhole: Option<(TcpListener, TcpStream)>,
}

struct Gate {
    addr: SocketAddr,
    target: SocketAddr,
    inner: tokio::sync::Mutex<GateInner>,
}

fn bind_reuse(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(backlog)
}

impl Gate {
    async fn start(target: SocketAddr) -> Gate {
        let listener = bind_reuse("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate {
            addr,
            target,
            inner: tokio::sync::Mutex::new(GateInner::default()),
        };
        gate.forward_with(listener).await;
        gate
    }

    async fn forward_with(&self, listener: TcpListener) {
        let mut inner = self.inner.lock().await;
        let conns = inner.conns.clone();
        let target = self.target;
        inner.acceptor = Some(tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task.abort_handle());
            }
        }));
    }

    async fn set(&self, mode: GateMode) {
        {
            let mut inner = self.inner.lock().await;
            if let Some(acceptor) = inner.acceptor.take() {
                acceptor.abort();
                // Wait until the listening socket is really closed before rebinding.
                let _ = acceptor.await;
            }
            for c in inner.conns.lock().unwrap().drain(..) {
                c.abort();
            }
            inner.blackhole = None;
            if mode == GateMode::Blackhole {
                // Backlog 0: the accept queue holds one connection; fill it and never
                // accept, so the kernel drops every further SYN.
                let l = bind_reuse(self.addr, 0).expect("rebind the gate port");
                let filler = TcpStream::connect(self.addr).await.unwrap();
                inner.blackhole = Some((l, filler));
            }
        }
        if mode == GateMode::Forward {
            let l = bind_reuse(self.addr, 1024).expect("rebind the gate port");
            self.forward_with(l).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// One fault scenario.

#[derive(Clone, Debug)]
enum Kind {
    Mock(Fault),
    Gate(GateMode),
}

#[derive(Clone, Debug)]
struct Spec {
    name: &'static str,
    kind: Kind,
    /// The Retry-After the provider sends, if any.
    retry_after: Option<Duration>,
    /// The least time one failing upstream attempt takes (a stall or a connect timeout
    /// lasts the sidecar's upstream timeout).
    attempt_cost: Duration,
}

impl Spec {
    fn fast(name: &'static str, kind: Kind) -> Spec {
        Spec {
            name,
            kind,
            retry_after: None,
            attempt_cost: Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    got: Instant,
    status: u16,
    token: Option<String>,
    /// The token's expiry as the mock knows it.
    exp: Option<Instant>,
    retry_after: Option<u64>,
    error: Option<String>,
}

/// What one scenario measured (printed, and checked against the rules).
#[derive(Debug, Default)]
struct Report {
    name: &'static str,
    served_during_fault: usize,
    refused_during_fault: usize,
    max_latency_ms: u128,
    attempts_during_fault: u64,
    attempt_bound: u64,
    recovery_ms: u128,
    recovery_bound_ms: u128,
    failures: Vec<String>,
}

/// The shortest back-off the sidecar may choose after `consecutive` failures (its equal
/// jitter never goes under half the exponential step), or the provider's Retry-After.
fn min_delay(consecutive: u32, retry_after: Option<Duration>) -> Duration {
    let raw = BACKOFF_BASE
        .saturating_mul(1 << consecutive.saturating_sub(1).min(20))
        .min(BACKOFF_MAX);
    (raw / 2).max(retry_after.unwrap_or_default())
}

/// The most attempts one credential set can make in `window` if every attempt fails.
fn max_attempts(window: Duration, cost: Duration, retry_after: Option<Duration>) -> u64 {
    let (mut t, mut n, mut consecutive) = (Duration::ZERO, 0u64, 1u32);
    while t < window {
        n += 1;
        t += cost + min_delay(consecutive, retry_after);
        consecutive += 1;
    }
    // One attempt may already be under way when the window opens.
    n + 1
}

fn failed_attempts(sc: &Running) -> u64 {
    sample(
        &sc.sidecar.render_metrics(),
        r#"ee_auth_refreshes_total{provider="idp",outcome="transient"}"#,
    )
    .unwrap_or(0.0) as u64
}

async fn load(
    addr: SocketAddr,
    account: String,
    idp: MockIdp,
    out: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://{addr}/authentication?account={account}&proto=imap");
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let resp = c.get(&url).send().await;
        let mut s = Sample {
            sent,
            got: sent,
            status: 0,
            token: None,
            exp: None,
            retry_after: None,
            error: None,
        };
        match resp {
            Ok(r) => {
                s.status = r.status().as_u16();
                s.retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                s.got = Instant::now();
                if let Some(t) = body["accessToken"].as_str() {
                    s.exp = idp.with(|st| st.issued.get(t).copied());
                    s.token = Some(t.to_owned());
                }
            }
            Err(e) => {
                s.got = Instant::now();
                s.error = Some(e.to_string());
            }
        }
        out.lock().unwrap().push(s);
        tokio::time::sleep(PACE).await;
    }
}

async fn run(spec: Spec) -> Report {
    let mut report = Report {
        name: spec.name,
        ..Default::default()
    };
    let fail = |r: &mut Report, msg: String| {
        if r.failures.len() < 12 {
            r.failures.push(msg);
        }
    };
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(LIFETIME));
    let gate = Gate::start(idp.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..HOLDERS)
        .map(|i| format!("holder{i}"))
        .chain((0..COLD).map(|i| format!("cold{i}")))
        .collect();
    let accounts: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                json!({ "user": format!("{n}@example.com"), "provider": "idp", "refreshToken": format!("rt-{n}") }),
            )
        })
        .collect();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": { "idp": {
                "type": "oauth2",
                "tokenUrl": format!("http://{}/token", gate.addr),
                "clientId": "c",
                "clientSecret": "s"
            } },
            "accounts": accounts
        }),
    );
    let mut o = test_options(&cfg);
    o.policy.backoff_base = BACKOFF_BASE;
    o.policy.backoff_max = BACKOFF_MAX;
    o.policy.request_wait = REQUEST_WAIT;
    o.upstream_timeout = UPSTREAM_TIMEOUT;
    let sc = start(o).await.expect("sidecar starts");

    let samples: Vec<Arc<Mutex<Vec<Sample>>>> =
        names.iter().map(|_| Arc::new(Mutex::new(vec![]))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let spawn_loader = |i: usize| {
        tokio::spawn(load(
            sc.local_addr,
            names[i].clone(),
            idp.clone(),
            samples[i].clone(),
            stop.clone(),
        ))
    };
    let mut loaders: Vec<JoinHandle<()>> = (0..HOLDERS).map(spawn_loader).collect();

    // Healthy phase: every holder gets a token, then 1.5 s of normal refreshing.
    let all_warm = eventually(Duration::from_secs(5), || {
        samples[..HOLDERS]
            .iter()
            .all(|s| s.lock().unwrap().iter().any(|s| s.status == 200))
    })
    .await;
    if !all_warm {
        fail(&mut report, "holders never got a first token".into());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The fault.
    let attempts_before = failed_attempts(&sc);
    let fault_start = Instant::now();
    match &spec.kind {
        Kind::Mock(f) => idp.set_fault(f.clone()),
        Kind::Gate(m) => gate.set(*m).await,
    }
    loaders.extend((HOLDERS..HOLDERS + COLD).map(spawn_loader));
    tokio::time::sleep(FAULT_FOR).await;
    let attempts_during = failed_attempts(&sc) - attempts_before;
    let fault_end = Instant::now();
    match &spec.kind {
        Kind::Mock(_) => idp.set_fault(Fault::None),
        Kind::Gate(_) => gate.set(GateMode::Forward).await,
    }

    // Recovery: one back-off step (the longest delay the sidecar may be sleeping, or the
    // provider's Retry-After), plus one failing attempt still under way, plus slack.
    let step = BACKOFF_MAX.max(spec.retry_after.unwrap_or_default());
    let recovery_bound = step + spec.attempt_cost + Duration::from_millis(1000);
    let recovered = eventually(recovery_bound + Duration::from_secs(2), || {
        samples.iter().all(|s| {
            s.lock()
                .unwrap()
                .iter()
                .any(|s| s.sent >= fault_end && s.status == 200)
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        let _ = l.await;
    }
    sc.shutdown().await;

    // ----- The rules.
    let ra_floor = spec.retry_after.unwrap_or_default();
    let mut recovery_ms = 0u128;
    for (i, name) in names.iter().enumerate() {
        let samples = samples[i].lock().unwrap().clone();
        let holder = i < HOLDERS;
        // The newest token this account was seen to hold (the sidecar holds it or a newer one).
        let mut held: Option<Instant> = None;
        for s in &samples {
            let latency = s.got - s.sent;
            report.max_latency_ms = report.max_latency_ms.max(latency.as_millis());
            if latency > DEADLINE {
                fail(
                    &mut report,
                    format!("{name}: a request took {latency:?} (status {})", s.status),
                );
            }
            let in_fault = s.sent >= fault_start && s.sent < fault_end;
            match s.status {
                200 => {
                    // Rule 2: never an expired (or unknown) token.
                    match s.exp {
                        None => fail(
                            &mut report,
                            format!("{name}: served a token the mock never issued"),
                        ),
                        Some(exp) if exp <= s.got => fail(
                            &mut report,
                            format!("{name}: served a token {:?} after its expiry", s.got - exp),
                        ),
                        Some(exp) => {
                            // Before the fault, the min-life rule: 2 s tokens have a
                            // 0.5 s minimum life; allow for the trip back.
                            if s.sent < fault_start && exp - s.got < Duration::from_millis(250) {
                                fail(
                                    &mut report,
                                    format!("{name}: healthy provider, yet served a token with only {:?} left", exp - s.got),
                                );
                            }
                            if held.is_none_or(|h| exp > h) {
                                held = Some(exp);
                            }
                        }
                    }
                    if in_fault {
                        report.served_during_fault += 1;
                    }
                }
                429 => {
                    match s.retry_after {
                        Some(ra) if (1..=30).contains(&ra) => {}
                        other => fail(
                            &mut report,
                            format!("{name}: 429 with Retry-After {other:?}"),
                        ),
                    }
                    // Rule 1: a holder whose token still had life must have been served.
                    if holder && in_fault {
                        if let Some(h) = held.filter(|h| *h > s.sent + SERVE_MARGIN) {
                            fail(
                                &mut report,
                                format!(
                                    "{name}: refused (429 after {:?}) while holding a token with {:?} left",
                                    s.got - s.sent,
                                    h - s.sent
                                ),
                            );
                        }
                    }
                    if in_fault {
                        report.refused_during_fault += 1;
                    }
                }
                other => fail(
                    &mut report,
                    format!("{name}: unexpected status {other} {:?}", s.error),
                ),
            }
        }
        // Rule 5.
        match samples
            .iter()
            .find(|s| s.sent >= fault_end && s.status == 200)
        {
            Some(s) => {
                let after = s.got - fault_end;
                recovery_ms = recovery_ms.max(after.as_millis());
                if after > recovery_bound {
                    fail(
                        &mut report,
                        format!("{name}: fresh again only {after:?} after the fault cleared"),
                    );
                }
            }
            None => fail(
                &mut report,
                format!("{name}: never fresh again after the fault"),
            ),
        }
    }
    if !recovered {
        fail(&mut report, "not every account recovered".into());
    }
    report.recovery_ms = recovery_ms;
    report.recovery_bound_ms = recovery_bound.as_millis();

    // Rule 4: the call rate, counted by the sidecar (works for every fault)...
    let keys = (HOLDERS + COLD) as u64;
    report.attempts_during_fault = attempts_during;
    report.attempt_bound = keys * max_attempts(FAULT_FOR, spec.attempt_cost, spec.retry_after);
    if attempts_during > report.attempt_bound {
        let msg = format!(
            "{} failed upstream attempts during the fault, the back-off schedule allows {}",
            attempts_during, report.attempt_bound
        );
        fail(&mut report, msg);
    }
    if attempts_during < keys {
        fail(
            &mut report,
            format!("only {attempts_during} attempts: the fault was not exercised"),
        );
    }
    // ...and, where the mock sees who is calling, the spacing of each account's attempts.
    if matches!(&spec.kind, Kind::Mock(f) if *f != Fault::Reset) {
        let mut by_account: HashMap<String, Vec<Instant>> = HashMap::new();
        for r in idp.requests() {
            if r.at >= fault_start && r.at < fault_end {
                if let Some(rt) = r.form.get("refresh_token") {
                    by_account.entry(rt.clone()).or_default().push(r.at);
                }
            }
        }
        let min_gap = (spec.attempt_cost + min_delay(1, spec.retry_after).max(ra_floor))
            .saturating_sub(Duration::from_millis(30));
        for (rt, mut times) in by_account {
            times.sort();
            for w in times.windows(2) {
                if w[1] - w[0] < min_gap {
                    fail(
                        &mut report,
                        format!(
                            "{rt}: attempts {:?} apart, the schedule says at least {min_gap:?}",
                            w[1] - w[0]
                        ),
                    );
                }
            }
        }
    }
    report
}

async fn run_all(specs: Vec<Spec>) {
    let reports =
        futures_util::future::join_all(specs.into_iter().map(|s| tokio::spawn(run(s)))).await;
    let mut failed = Vec::new();
    for r in reports {
        let r = r.expect("scenario task");
        eprintln!(
            "{:<22} served-in-fault={:<4} 429-in-fault={:<4} max-latency={}ms attempts={}/{} recovery={}ms (bound {}ms)",
            r.name,
            r.served_during_fault,
            r.refused_during_fault,
            r.max_latency_ms,
            r.attempts_during_fault,
            r.attempt_bound,
            r.recovery_ms,
            r.recovery_bound_ms
        );
        for f in &r.failures {
            failed.push(format!("{}: {f}", r.name));
        }
        if r.served_during_fault == 0 {
            failed.push(format!("{}: no holder was served during the fault", r.name));
        }
        if r.refused_during_fault == 0 {
            failed.push(format!("{}: nothing was refused during the fault", r.name));
        }
    }
    assert!(failed.is_empty(), "rule violations:\n{}", failed.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_error_statuses() {
    run_all(vec![
        Spec::fast("500", Kind::Mock(Fault::status(500, None))),
        Spec {
            retry_after: Some(Duration::from_secs(2)),
            ..Spec::fast(
                "503 Retry-After: 2",
                Kind::Mock(Fault::status(503, Some(2))),
            )
        },
        Spec {
            retry_after: Some(Duration::from_secs(2)),
            ..Spec::fast(
                "429 Retry-After: 2",
                Kind::Mock(Fault::status(429, Some(2))),
            )
        },
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_faults() {
    run_all(vec![
        Spec::fast("connection reset", Kind::Mock(Fault::Reset)),
        Spec::fast("connection refused", Kind::Gate(GateMode::Refuse)),
        Spec {
            attempt_cost: UPSTREAM_TIMEOUT - Duration::from_millis(50),
            ..Spec::fast("connect timeout", Kind::Gate(GateMode::Blackhole))
        },
        Spec {
            attempt_cost: UPSTREAM_TIMEOUT - Duration::from_millis(50),
            ..Spec::fast("stalled response", Kind::Mock(Fault::Stall))
        },
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_success_answers() {
    run_all(vec![
        Spec::fast("200 empty body", Kind::Mock(Fault::Empty)),
        Spec::fast("200 garbage", Kind::Mock(Fault::Garbage)),
        Spec::fast("200 no access_token", Kind::Mock(Fault::NoAccessToken)),
    ])
    .await;
}

/// The gate really produces the faults it claims: a refused connect fails at once, a
/// black-holed one hangs until the client gives up.
#[tokio::test]
async fn the_gate_refuses_and_blackholes() {
    let idp = MockIdp::start().await;
    let gate = Gate::start(idp.addr).await;
    assert!(TcpStream::connect(gate.addr).await.is_ok());
    gate.set(GateMode::Refuse).await;
    let e = TcpStream::connect(gate.addr).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    gate.set(GateMode::Blackhole).await;
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_millis(700), TcpStream::connect(gate.addr)).await;
    assert!(r.is_err(), "connect should hang, got {r:?}");
    assert!(t.elapsed() >= Duration::from_millis(650));
    gate.set(GateMode::Forward).await;
    let c = client();
    let r = c
        .post(format!("http://{}/token", gate.addr))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Regression: a request that finds its token aging (under its minimum life) while the
/// refresh is stalled used to wait the whole `request_wait` and then answer 429 because
/// the token had expired meanwhile. It must be served the still-valid token in time.
#[tokio::test]
async fn an_aging_token_is_served_while_its_refresh_stalls() {
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(2.0));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) },
                 "accounts": { "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } } }),
    );
    let mut o = test_options(&cfg);
    o.policy.request_wait = Duration::from_secs(5);
    o.upstream_timeout = Duration::from_secs(10);
    let sc = start(o).await.unwrap();
    let c = client();
    let first = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    let exp = idp.with(|s| s.issued[first.token()]);
    idp.set_fault(Fault::Stall);
    // 2 s tokens: refreshed 0.5–1 s after issue (now stalled), aging from 1.5 s on.
    tokio::time::sleep_until(exp - Duration::from_millis(400)).await;
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(
        r.status,
        200,
        "aging token refused after {:?}: {}",
        t.elapsed(),
        r.body
    );
    assert_eq!(r.token(), first.token());
    idp.check_valid(r.token()).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(idp.calls(), 2, "the stalled refresh is the only other call");
    sc.shutdown().await;
}

/// Regression (found by the fuzz run): a provider answering a sub-second `expires_in`
/// (here 1 ms) used to get a refresh planned at once after every answer, a tight loop of
/// upstream calls. Such a token cannot be used: it is a transient provider error now
/// (#13 item 11), nothing is served, and retries follow the back-off, not a loop.
#[tokio::test]
async fn an_absurdly_short_lifetime_does_not_make_a_refresh_loop() {
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(0.001));
    let dir = tempfile::tempdir().unwrap();
    let sc = one_account_each(&idp, dir.path(), &["a"]).await;
    let c = client();
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The request was held through the retries (tests/outage.rs): they follow the
    // back-off schedule, not a loop.
    let allowed = calls_allowed(sc.sidecar.cache().policy(), None, t.elapsed());
    assert!(
        idp.calls() <= u64::from(allowed),
        "refreshed in a loop: {} calls, the back-off allows {allowed}",
        idp.calls()
    );
    sc.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// What a token answer may say

/// A sidecar with one refresh-token account per id, all on the mock.
async fn one_account_each(idp: &MockIdp, dir: &Path, ids: &[&str]) -> Running {
    let accounts: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| {
            (
                id.to_string(),
                json!({ "user": "u@example.com", "provider": "idp", "refreshToken": "rt" }),
            )
        })
        .collect();
    let cfg = write_config(
        dir,
        &json!({ "providers": { "idp": oauth2_provider(idp) }, "accounts": accounts }),
    );
    let mut o = test_options(&cfg);
    // Under half the first back-off (1 s): each request sees its one attempt and is
    // answered after it, rather than held through the retries (tests/outage.rs).
    o.policy.request_wait = Duration::from_millis(400);
    start(o).await.unwrap()
}

/// The admin status of an account's one credential set, as the admin API shows it.
fn status_json(sc: &Running, account: &str) -> serde_json::Value {
    serde_json::to_value(&status_of(sc, account)[0]).unwrap()
}

/// Regression (#13 item 11): an `expires_in` of zero, below a second, negative or not a
/// number says the token is unusable; it used to count as absent and the token was served
/// for the 10-minute default. Now it is a transient provider error and nothing is served.
/// Absent (or null) still means `--default-lifetime`; a numeric string is read; anything
/// longer than 24 hours (up to 31 years used to be accepted) is clamped to 24 hours.
#[tokio::test]
async fn odd_expires_in_values_are_refused_or_clamped_never_defaulted() {
    let bad = [
        "0",
        "-5",
        "0.5",
        "1e-300",
        "-0",
        r#""soon""#,
        r#""0""#,
        r#""-60""#,
        "true",
        "{}",
        "[3600]",
    ];
    // (expires_in, the lifetime it must give); None: left out of the answer.
    let good: [(Option<&str>, u64); 6] = [
        (Some("3600"), 3600),
        (Some(r#"" 3600 ""#), 3600),
        (Some("1e12"), 86_400),
        (Some("999999999"), 86_400),
        (Some("null"), 600),
        (None, 600),
    ];
    let ids: Vec<String> = (0..bad.len())
        .map(|i| format!("bad{i}"))
        .chain((0..good.len()).map(|i| format!("good{i}")))
        .collect();
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = one_account_each(
        &idp,
        dir.path(),
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let c = client();
    for (i, v) in bad.iter().enumerate() {
        idp.set_fault(Fault::Body(format!(
            r#"{{"access_token":"tok-bad-{i}","token_type":"Bearer","expires_in":{v}}}"#
        )));
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account=bad{i}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 429, "expires_in {v}: {}", r.body);
        let st = status_json(&sc, &format!("bad{i}"));
        assert_eq!(
            st["lastError"]["code"], "invalid_response",
            "expires_in {v}: {st}"
        );
        assert!(
            st["lastError"]["hint"]
                .as_str()
                .unwrap_or("")
                .contains("expires_in"),
            "expires_in {v}: {st}"
        );
        assert!(
            st["tokenRemainingSeconds"].is_null(),
            "expires_in {v}: {st}"
        );
    }
    for (i, (v, lifetime)) in good.iter().enumerate() {
        let field = v
            .map(|v| format!(r#","expires_in":{v}"#))
            .unwrap_or_default();
        idp.set_fault(Fault::Body(format!(
            r#"{{"access_token":"tok-good-{i}","token_type":"Bearer"{field}}}"#
        )));
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account=good{i}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "expires_in {v:?}: {}", r.body);
        assert_eq!(r.token(), format!("tok-good-{i}"));
        let st = status_json(&sc, &format!("good{i}"));
        let left = st["tokenRemainingSeconds"].as_u64().unwrap();
        assert!(
            left <= *lifetime && left + 5 >= *lifetime,
            "expires_in {v:?}: {left} s left, expected {lifetime}: {st}"
        );
    }
    sc.shutdown().await;
}

/// An answer refused for its `expires_in` (or its token) may still carry a rotated
/// refresh token, and a rotating provider has already revoked the old one: the new one is
/// kept and spent next time, never dropped with the answer.
#[tokio::test]
async fn a_rotated_refresh_token_in_a_refused_answer_is_kept() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = one_account_each(&idp, dir.path(), &["a", "b", "c"]).await;
    let c = client();
    for (account, body) in [
        (
            "a",
            r#"{"access_token":"t","expires_in":0,"refresh_token":"rt-new-a"}"#,
        ),
        (
            "b",
            r#"{"access_token":"t t","expires_in":60,"refresh_token":"rt-new-b"}"#,
        ),
        // No access token at all, yet a rotated refresh token.
        ("c", r#"{"expires_in":60,"refresh_token":"rt-new-c"}"#),
    ] {
        idp.set_fault(Fault::Body(body.into()));
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account={account}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 429, "{account}: {}", r.body);
    }
    idp.set_fault(Fault::None);
    // The retries (back-off of about a second) spend what the refused answers carried.
    let spent = |account: &str| {
        let want = format!("rt-new-{account}");
        idp.requests()
            .iter()
            .any(|r| r.form.get("refresh_token") == Some(&want))
    };
    assert!(
        eventually(Duration::from_secs(5), || spent("a")
            && spent("b")
            && spent("c"))
        .await,
        "{:?}",
        idp.requests().iter().map(|r| &r.form).collect::<Vec<_>>()
    );
    sc.shutdown().await;
}

/// Regression (#13 item 13): access tokens EmailEngine cannot put into an `Authorization`
/// header or an XOAUTH2 string (LF, CR, NUL, quotes, spaces, anything outside RFC 6750's
/// b64token) used to be served with 200. They are a provider error now, and the token
/// never appears in the answer or the status.
#[tokio::test]
async fn tokens_outside_the_bearer_token_alphabet_are_never_served() {
    let bad = [
        "a b",
        r"a\nb",
        r"a\rb",
        r"a\u0000b",
        r#"a\"b"#,
        "a'b",
        r"a\\b",
        r"a\tb",
        "a,b",
        "a;b",
        "a=b",
        "x=y==",
        r"\u00e9",
        r"a\u2028b",
    ];
    let good = [
        "ya29.a0Af-_~+/xyz==",
        "eyJhbGciOi.eyJzdWIi.c2ln",
        "EwA4A8l6BAAU+/==",
    ];
    let ids: Vec<String> = (0..bad.len())
        .map(|i| format!("bad{i}"))
        .chain((0..good.len()).map(|i| format!("good{i}")))
        .collect();
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sc = one_account_each(
        &idp,
        dir.path(),
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let c = client();
    for (i, t) in bad.iter().enumerate() {
        // `t` is JSON string content (escapes included); the marker finds any echo.
        idp.set_fault(Fault::Body(format!(
            r#"{{"access_token":"MARKER{t}","token_type":"Bearer","expires_in":3600}}"#
        )));
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account=bad{i}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 429, "token {t}: {}", r.body);
        assert!(!r.body.to_string().contains("MARKER"), "{}", r.body);
        let st = status_json(&sc, &format!("bad{i}"));
        assert_eq!(
            st["lastError"]["code"], "invalid_response",
            "token {t}: {st}"
        );
        assert!(!st.to_string().contains("MARKER"), "{st}");
    }
    for (i, t) in good.iter().enumerate() {
        idp.set_fault(Fault::Body(format!(
            r#"{{"access_token":"{t}","token_type":"Bearer","expires_in":3600}}"#
        )));
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account=good{i}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "token {t}: {}", r.body);
        assert_eq!(r.token(), *t);
    }
    sc.shutdown().await;
}

/// Regression (#13 item 10): one 429 with `Retry-After: 86400` parked the key for an hour
/// (`retryInSeconds` 3597), long after the provider recovered. A provider's Retry-After
/// now imposes at most two minutes, and EmailEngine is told at most 30 s.
#[tokio::test]
async fn a_huge_retry_after_imposes_at_most_two_minutes() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::status(429, Some(86_400)));
    let dir = tempfile::tempdir().unwrap();
    let sc = one_account_each(&idp, dir.path(), &["a"]).await;
    let c = client();
    let t = Instant::now();
    let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let told: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&told), "Retry-After {told}");
    // The request was held (up to --request-wait) before its 429: the retry is two
    // minutes after the provider's answer, less that.
    let held = t.elapsed().as_secs();
    let st = status_json(&sc, "a");
    let retry = st["lastError"]["retryInSeconds"].as_u64().unwrap();
    assert!(
        (118 - held..=120).contains(&retry),
        "retry in {retry} s after a {held} s hold: {st}"
    );
    sc.shutdown().await;
}
