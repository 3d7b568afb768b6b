//! Criterion benchmarks (see BENCHMARKS.md for the targets and the numbers):
//! - `hit_path`: the in-process token route on a cached token (P3: ≤ 1 µs median), and its parts;
//! - `http_round_trip`: one keep-alive HTTP/1.1 request over loopback;
//! - `single_flight`: 1,000 waiters on one slow fetch (P4);
//! - `config`: parse + validate at 1k/10k/100k accounts, and a full reload with diff (P5).
//!
//! Run: `cargo bench --bench sidecar` (or `-- hit_path` for one group).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ee_auth_sidecar::protocol::{parse_query, BasicCredentials};
use ee_auth_sidecar::secret::Secret;
use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::json;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A config with `n` OAuth accounts on the mock, plus Basic auth.
fn config(idp_url: &str, n: usize, tag: &str) -> serde_json::Value {
    let accounts: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            (
                format!("acct-{i}"),
                json!({ "user": format!("user{i}@example.com"), "provider": "idp", "refreshToken": format!("rt-{i}-{tag}") }),
            )
        })
        .collect();
    json!({
        "auth": { "username": "emailengine", "password": "bench-password" },
        "providers": { "idp": { "type": "oauth2", "tokenUrl": idp_url, "clientId": "c", "clientSecret": "s" } },
        "accounts": accounts
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    idp: common::MockIdp,
    running: ee_auth_sidecar::Running,
}

async fn fixture(n: usize) -> Fixture {
    let idp = common::MockIdp::start().await;
    idp.with(|s| s.token_bytes = 2000);
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(dir.path(), &config(&idp.url("/token"), n, "a"));
    let mut o = common::test_options(&path);
    o.prewarm_concurrency = 16;
    let running = ee_auth_sidecar::start(o).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running.sidecar.is_ready() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Fixture {
        _dir: dir,
        idp,
        running,
    }
}

fn auth_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    // base64("emailengine:bench-password")
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Basic ZW1haWxlbmdpbmU6YmVuY2gtcGFzc3dvcmQ="),
    );
    h
}

fn hit_path(c: &mut Criterion) {
    let rt = runtime();
    let fx = rt.block_on(fixture(100));
    let sidecar = fx.running.sidecar.clone();
    let uri: Uri = "/authentication?account=acct-42&proto=imap"
        .parse()
        .unwrap();
    let headers = auth_headers();
    // Warm and check the answer once.
    let resp = rt.block_on(ee_auth_sidecar::server::token(
        &sidecar,
        &Method::GET,
        &uri,
        &headers,
    ));
    assert_eq!(resp.status(), 200);

    let mut g = c.benchmark_group("hit_path");
    g.bench_function("token_route", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                ee_auth_sidecar::server::token(
                    &sidecar,
                    &Method::GET,
                    black_box(&uri),
                    black_box(&headers),
                )
                .await,
            )
        })
    });
    let set = {
        let cfg = sidecar.config();
        match &cfg.account("acct-42").unwrap().kind {
            ee_auth_sidecar::config::AccountKind::OAuth(o) => o.default.clone(),
            _ => unreachable!(),
        }
    };
    let entry = sidecar.cache().entry(&set.key).unwrap();
    g.bench_function("cache_get", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(sidecar.cache().get(black_box(&entry)).await.is_ok()) })
    });
    g.bench_function("metrics_request", |b| {
        b.iter(|| {
            sidecar.metrics().request(
                Some(ee_auth_sidecar::protocol::Proto::Imap),
                ee_auth_sidecar::metrics::Outcome::Hit,
                black_box(Duration::from_nanos(700)),
            )
        })
    });
    g.bench_function("parse_query", |b| {
        b.iter(|| black_box(parse_query(black_box(Some("account=acct-42&proto=imap")))))
    });
    let creds = BasicCredentials::new("emailengine", &Secret::new("bench-password"));
    let header = headers
        .get(http::header::AUTHORIZATION)
        .unwrap()
        .as_bytes()
        .to_vec();
    g.bench_function("basic_auth", |b| {
        b.iter(|| black_box(creds.matches(Some(black_box(&header)))))
    });
    g.finish();
    let _ = fx.idp.calls();
    rt.block_on(fx.running.shutdown());
}

fn http_round_trip(c: &mut Criterion) {
    let rt = runtime();
    let fx = rt.block_on(fixture(10));
    let addr = fx.running.local_addr;
    let mut sender = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    });
    let request = || {
        http::Request::get("/authentication?account=acct-3&proto=imap")
            .header(http::header::HOST, "127.0.0.1")
            .header(
                http::header::AUTHORIZATION,
                "Basic ZW1haWxlbmdpbmU6YmVuY2gtcGFzc3dvcmQ=",
            )
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    c.bench_function("http_round_trip/keep_alive", |b| {
        b.to_async(&rt).iter(|| {
            let req = request();
            let fut = sender.send_request(req);
            async move {
                use http_body_util::BodyExt;
                let resp = fut.await.unwrap();
                assert_eq!(resp.status(), 200);
                black_box(resp.into_body().collect().await.unwrap().to_bytes())
            }
        })
    });
    rt.block_on(fx.running.shutdown());
}

fn single_flight(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = rt.block_on(fixture(1));
    fx.idp.with(|s| s.delay = Duration::from_millis(20));
    let sidecar = fx.running.sidecar.clone();
    let set = {
        let cfg = sidecar.config();
        match &cfg.account("acct-0").unwrap().kind {
            ee_auth_sidecar::config::AccountKind::OAuth(o) => o.default.clone(),
            _ => unreachable!(),
        }
    };
    let mut g = c.benchmark_group("single_flight");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1000_waiters_one_fetch", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let sidecar = sidecar.clone();
            let set = set.clone();
            let idp = fx.idp.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A cold key: its entry retired and a new one made.
                    sidecar.cache().remove(&set.key);
                    let entry = sidecar.cache().install(&set);
                    let before = idp.calls();
                    let start = Instant::now();
                    let waiters: Vec<_> = (0..1000)
                        .map(|_| {
                            let cache = sidecar.cache().clone();
                            let entry = entry.clone();
                            tokio::spawn(async move { cache.get(&entry).await.is_ok() })
                        })
                        .collect();
                    for w in waiters {
                        assert!(w.await.unwrap());
                    }
                    total += start.elapsed();
                    assert_eq!(
                        idp.calls() - before,
                        1,
                        "single-flight: one upstream call per cold key"
                    );
                }
                total
            }
        })
    });
    g.finish();
    rt.block_on(fx.running.shutdown());
}

fn config_load(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("config");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        let text = serde_json::to_vec(&config("http://127.0.0.1:9/token", n, "a")).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("parse_validate", n), &text, |b, text| {
            b.iter(|| {
                black_box(
                    ee_auth_sidecar::config::parse(black_box(text), std::path::Path::new("."))
                        .unwrap(),
                )
            })
        });
    }
    // A full reload of 100k accounts: read, parse, validate, digest, swap, diff (one
    // account changed per reload, alternating between two files' contents).
    let dir = tempfile::tempdir().unwrap();
    let a = serde_json::to_vec(&config("http://127.0.0.1:9/token", 100_000, "a")).unwrap();
    let mut b_cfg = config("http://127.0.0.1:9/token", 100_000, "a");
    b_cfg["accounts"]["acct-7"]["refreshToken"] = json!("changed");
    let b = serde_json::to_vec(&b_cfg).unwrap();
    let path = dir.path().join("accounts.json");
    std::fs::write(&path, &a).unwrap();
    let mut o = common::test_options(&path);
    o.prewarm_concurrency = 0;
    let running = rt.block_on(ee_auth_sidecar::start(o)).unwrap();
    let sidecar = running.sidecar.clone();
    let mut flip = false;
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("reload_with_diff/100000", |bch| {
        bch.to_async(&rt).iter(|| {
            flip = !flip;
            std::fs::write(&path, if flip { &b } else { &a }).unwrap();
            let sidecar = sidecar.clone();
            // The file watcher may start the same reload first; reloads run one at a
            // time, so this call then waits for it and finds nothing left to do.
            async move { sidecar.reload().await.unwrap() }
        })
    });
    g.finish();
    rt.block_on(running.shutdown());
    let _ = Arc::strong_count(&sidecar);
}

criterion_group!(
    benches,
    hit_path,
    http_round_trip,
    single_flight,
    config_load
);
criterion_main!(benches);
