//! The tests' mock identity provider as a process, for load and soak scripts.
//!
//! Usage: mock_idp ADDR [LIFETIME_SECS] [TOKEN_BYTES] [FAILURE_PERCENT] [DELAY_MS] [ROTATE] [SPREAD]
//! Prints `listening on ADDR` when ready; issues refresh_token / client_credentials tokens.
//! With FAILURE_PERCENT, that share of requests answers 503 (transient), chosen at random.
//! DELAY_MS delays every answer (a real provider takes ~100 ms); ROTATE=1 issues a new
//! refresh token on every refresh. SPREAD makes each access token up to that many bytes
//! longer or shorter than TOKEN_BYTES.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Duration;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let lifetime: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3600.0);
    let token_bytes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let failure_percent: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let delay_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let rotate = args.next().is_some_and(|s| s == "1");
    let token_spread: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let idp = common::MockIdp::start_on(&addr).await;
    idp.with(|s| {
        s.lifetime = Some(lifetime);
        s.token_bytes = token_bytes;
        s.token_spread = token_spread;
        s.delay = Duration::from_millis(delay_ms);
        s.rotate = rotate;
    });
    println!("listening on {}", idp.addr);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last_report = std::time::Instant::now();
    loop {
        tick.tick().await;
        // Flip the fault on a share of 10 ms slots: a simple, bounded transient-failure rate.
        let fail = failure_percent > 0 && fastrand::u32(0..100) < failure_percent;
        idp.set_fault(if fail {
            common::Fault::status(503, None)
        } else {
            common::Fault::None
        });
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = std::time::Instant::now();
            let (calls, peak) = idp.with(|s| {
                // bounded memory over long runs
                s.requests.clear();
                s.issued.clear();
                (s.calls, s.peak_inflight)
            });
            eprintln!("mock_idp: calls={calls} peak_inflight={peak}");
        }
    }
}
