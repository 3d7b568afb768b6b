//! The floor for any hyper sidecar: a bare hyper 1.x server that answers every request
//! with the same body bytes, on the same runtime as the sidecar. The load script compares
//! the sidecar's cache-hit throughput against it (target P1 in BENCHMARKS.md).
//!
//! Usage: floor ADDR BODY_FILE [WORKER_THREADS]  (default 1, like the sidecar)

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{header, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(body_file)) = (args.next(), args.next()) else {
        eprintln!("usage: floor ADDR BODY_FILE [WORKER_THREADS]");
        std::process::exit(2);
    };
    let workers: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .expect("a runtime");
    runtime.block_on(serve(addr, body_file));
}

async fn serve(addr: String, body_file: String) {
    let body = Bytes::from(std::fs::read(&body_file).expect("readable body file"));
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("bindable address");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let mut resp = Response::new(Full::new(body.clone()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
