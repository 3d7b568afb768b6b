//! The real binary: signals and graceful shutdown, log capture and the secret-leak audit
//! of a full run, and the `check`, `token` and `--version` tools. Each test starts
//! `ee-auth-sidecar` as a child process on an ephemeral loopback port, against the
//! in-test mock identity provider.

// The harness re-exports the in-process `start`, which these process-level tests do not use.
#[allow(unused_imports)]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_ee-auth-sidecar");

/// A running `ee-auth-sidecar` child; killed if a test ends without stopping it.
struct Proc {
    child: Child,
    stderr: PathBuf,
    stdout: PathBuf,
}

impl Proc {
    /// Starts the binary with exactly `env` as its environment, stdout and stderr going
    /// to files in `dir` (files never fill up and block the child the way pipes can).
    fn spawn(dir: &Path, args: &[String], env: &[(&str, String)]) -> Proc {
        let stderr = dir.join("stderr.log");
        let stdout = dir.join("stdout.log");
        let child = Command::new(BIN)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("binary starts");
        Proc {
            child,
            stderr,
            stdout,
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout).unwrap_or_default()).into_owned()
    }

    /// The address from the `listening` log line (text or JSON).
    async fn addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.stderr();
            if let Some(line) = log.lines().find(|l| l.contains("listening")) {
                let at = line
                    .find("127.0.0.1:")
                    .expect("loopback address in the line");
                let digits: String = line[at + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                return format!("127.0.0.1:{digits}").parse().unwrap();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar exited ({status}) before listening:\n{log}");
            }
            assert!(Instant::now() < deadline, "no `listening` line:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (TERM, INT) to this child, by its pid.
    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running {timeout:?} later:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion (off the async runtime, so the mock keeps answering).
async fn run(args: &[String], env: &[(&str, String)]) -> Output {
    let args = args.to_vec();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .expect("binary runs")
    })
    .await
    .unwrap()
}

/// Runs the `token` command in-process, on the caller's runtime and clock, with exactly
/// this command line; returns its exit code.
async fn token_in_process(argv: &[String]) -> i32 {
    use clap::Parser;
    let cli = ee_auth_sidecar::cli::Cli::try_parse_from(
        std::iter::once("ee-auth-sidecar").chain(argv.iter().map(String::as_str)),
    )
    .expect("a valid command line");
    match cli.command {
        Some(ee_auth_sidecar::cli::Command::Token(args)) => {
            ee_auth_sidecar::cli::token(&args).await
        }
        other => panic!("not a token command: {other:?}"),
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

// ---------------------------------------------------------------------------------------
// SIGTERM during a burst

/// What became of one request on a raw keep-alive connection.
enum RawOutcome {
    /// A complete response.
    Complete {
        status: u16,
        close: bool,
        body: Vec<u8>,
    },
    /// The connection ended before the first byte of a response.
    NoResponse(String),
    /// The connection ended in the middle of a response.
    Partial(String),
}

/// Sends one GET on `stream` and reads one complete response (Content-Length framed).
async fn raw_get(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    path: &str,
) -> RawOutcome {
    let req = format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\n\r\n");
    if let Err(e) = writer.write_all(req.as_bytes()).await {
        return RawOutcome::NoResponse(format!("write: {e}"));
    }
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(0) => return RawOutcome::NoResponse("closed".into()),
        Err(e) => return RawOutcome::NoResponse(format!("read: {e}")),
        Ok(_) => {}
    }
    let status: u16 = match line.split(' ').nth(1).and_then(|s| s.parse().ok()) {
        Some(s) => s,
        None => return RawOutcome::Partial(format!("bad status line {line:?}")),
    };
    let (mut length, mut close) = (None, false);
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h).await {
            Ok(0) => return RawOutcome::Partial("closed in the headers".into()),
            Err(e) => return RawOutcome::Partial(format!("headers: {e}")),
            Ok(_) => {}
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    let Some(length) = length else {
        return RawOutcome::Partial("no content-length".into());
    };
    let mut body = vec![0; length];
    if let Err(e) = reader.read_exact(&mut body).await {
        return RawOutcome::Partial(format!("body: {e}"));
    }
    RawOutcome::Complete {
        status,
        close,
        body,
    }
}

#[derive(Default, Debug)]
struct HammerReport {
    complete: u64,
    complete_after_signal: u64,
    closed_by_server: u64,
    refused_after_signal: u64,
    lost: Vec<String>,
}

/// Sends requests back to back on a keep-alive connection, reconnecting when the server
/// says `Connection: close`, until connecting is refused after the signal.
async fn hammer(addr: SocketAddr, path: String, signaled: Arc<AtomicBool>) -> HammerReport {
    let mut rep = HammerReport::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    'connection: while Instant::now() < deadline {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) if signaled.load(Ordering::SeqCst) => {
                let _ = e;
                break;
            }
            Err(e) => {
                rep.lost
                    .push(format!("connect refused before the signal: {e}"));
                break;
            }
        };
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut answered_here = 0;
        loop {
            let before = signaled.load(Ordering::SeqCst);
            match raw_get(&mut r, &mut w, &path).await {
                RawOutcome::Complete {
                    status,
                    close,
                    body,
                } => {
                    answered_here += 1;
                    rep.complete += 1;
                    if before {
                        rep.complete_after_signal += 1;
                    }
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if status != 200 || !v["accessToken"].is_string() {
                        rep.lost.push(format!("answer {status} {v}"));
                    }
                    if close {
                        if !signaled.load(Ordering::SeqCst) {
                            rep.lost.push("Connection: close before the signal".into());
                        }
                        rep.closed_by_server += 1;
                        continue 'connection;
                    }
                }
                // The first request on a connection made as the listener closed: the
                // kernel had completed the handshake, the server never accepted it.
                RawOutcome::NoResponse(_)
                    if answered_here == 0 && signaled.load(Ordering::SeqCst) =>
                {
                    rep.refused_after_signal += 1;
                    continue 'connection;
                }
                RawOutcome::NoResponse(why) => {
                    rep.lost.push(format!(
                        "no answer on an accepted connection after {answered_here} answers: {why}"
                    ));
                    continue 'connection;
                }
                RawOutcome::Partial(why) => {
                    rep.lost.push(format!("truncated answer: {why}"));
                    continue 'connection;
                }
            }
        }
    }
    rep
}

#[tokio::test]
async fn sigterm_during_a_burst_loses_no_request_flushes_state_and_exits_zero() {
    let idp = MockIdp::start().await;
    let cold: Vec<String> = (0..30).map(|i| format!("cold-{i}")).collect();
    idp.with(|s| {
        s.rotate = true;
        s.delay = Duration::from_millis(1500);
        s.valid_refresh_tokens = Some(
            cold.iter()
                .map(|id| format!("rt-{id}"))
                .chain(["rt-hot".to_owned()])
                .collect(),
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = serde_json::Map::new();
    for id in cold.iter().chain([&"hot".to_owned()]) {
        accounts.insert(
            id.clone(),
            json!({ "user": format!("{id}@example.com"), "provider": "idp", "refreshToken": format!("rt-{id}") }),
        );
    }
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts }),
    );
    let state = dir.path().join("state");
    // Default --shutdown-grace (5 s); cold accounts stay cold (no pre-warm).
    let mut sc = Proc::spawn(
        dir.path(),
        &args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--prewarm-concurrency",
            "0",
            "--provider-concurrency",
            "64",
        ]),
        &[],
    );
    let a = sc.addr().await;
    let c = client();
    assert!(
        wait_ready(&c, a, Duration::from_secs(20)).await,
        "never ready"
    );
    assert_eq!(ask(&c, a, "account=hot&proto=imap", None).await.status, 200);

    // The burst: keep-alive connections asking for a cached token back to back...
    let signaled = Arc::new(AtomicBool::new(false));
    let hammers: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(hammer(
                a,
                "/authentication?account=hot&proto=imap".into(),
                signaled.clone(),
            ))
        })
        .collect();
    // ...and 30 requests that are inside the sidecar, waiting for the slow provider.
    let slow: Vec<_> = cold
        .iter()
        .map(|id| {
            let c = reqwest::Client::new();
            let q = format!("account={id}&proto=smtp");
            tokio::spawn(async move { ask(&c, a, &q, None).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(15), || idp.with(|s| s.inflight) == 30).await,
        "all 30 requests reached the provider"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    signaled.store(true, Ordering::SeqCst);
    let signal_at = Instant::now();
    sc.signal("TERM");

    for t in slow {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "in-flight request answered: {}", r.body);
        idp.check_valid(r.token()).unwrap();
    }
    let status = sc.wait(Duration::from_secs(15)).await;
    let took = signal_at.elapsed();
    assert_eq!(status.code(), Some(0), "clean exit:\n{}", sc.stderr());
    assert!(
        took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM (grace 5 s)"
    );
    let mut total = HammerReport::default();
    for h in hammers {
        let r = h.await.unwrap();
        total.complete += r.complete;
        total.complete_after_signal += r.complete_after_signal;
        total.closed_by_server += r.closed_by_server;
        total.refused_after_signal += r.refused_after_signal;
        total.lost.extend(r.lost);
    }
    assert!(total.lost.is_empty(), "lost requests: {:?}", total.lost);
    assert!(total.complete > 50, "the burst ran: {total:?}");
    assert!(
        total.closed_by_server >= 1,
        "open keep-alive connections were closed after an answer saying so: {total:?}"
    );
    // New connections are refused once shutdown began.
    assert!(tokio::net::TcpStream::connect(a).await.is_err());

    // The rotations answered after SIGTERM were written before exit: every account's
    // newest refresh token is on disk, none of them already spent.
    let (valid, spent) = idp.with(|s| (s.valid_refresh_tokens.clone().unwrap(), s.spent.clone()));
    let mut on_disk = HashSet::new();
    for entry in std::fs::read_dir(state.join("refresh-tokens")).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(
            path.extension().unwrap(),
            "json",
            "no stray temp file: {path:?}"
        );
        let rec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        on_disk.insert(rec["refreshToken"].as_str().unwrap().to_owned());
    }
    assert_eq!(on_disk.len(), 31);
    assert!(on_disk.is_subset(&valid), "only the newest tokens on disk");
    assert!(on_disk.is_disjoint(&spent));
    let log = sc.stderr();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
    assert!(
        !log.contains("still open") && !log.contains("still running"),
        "{log}"
    );
}

#[tokio::test]
async fn sigint_stops_an_idle_sidecar_with_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "accounts": { "m": { "user": "u", "pass": "p" } } }),
    );
    let mut sc = Proc::spawn(
        dir.path(),
        &args(&["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]),
        &[],
    );
    let a = sc.addr().await;
    let c = client();
    assert_eq!(ask(&c, a, "account=m", None).await.status, 200);
    // The client keeps its idle keep-alive connection open: shutdown must not wait for it
    // beyond the short drain.
    let t = Instant::now();
    sc.signal("INT");
    assert_eq!(sc.wait(Duration::from_secs(10)).await.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn sigterm_while_starting_against_a_stalled_provider_still_exits_zero_within_the_grace() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::Stall);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } } }),
    );
    let mut sc = Proc::spawn(
        dir.path(),
        &args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--shutdown-grace",
            "1s",
        ]),
        &[],
    );
    // Signal the moment the server listens: pre-warm (stalled) and the rest of start-up
    // are still under way. The handler must already be installed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sc.stderr().contains("listening") {
        assert!(Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t = Instant::now();
    sc.signal("TERM");
    let status = sc.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status}: {}", sc.stderr());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(sc.stderr().contains("stopped"));
}

#[tokio::test]
async fn a_refresh_unanswered_when_the_grace_runs_out_is_logged_at_error_with_its_account() {
    let idp = MockIdp::start().await;
    idp.set_fault(Fault::Stall);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "stuck-1": { "user": "u", "provider": "idp", "refreshToken": "rt" } } }),
    );
    let state = dir.path().join("state");
    let mut sc = Proc::spawn(
        dir.path(),
        &args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--shutdown-grace",
            "1s",
        ]),
        &[],
    );
    let _ = sc.addr().await;
    // Pre-warm's refresh is at the provider, which never answers.
    assert!(eventually(Duration::from_secs(10), || idp.with(|s| s.inflight) == 1).await);
    let t = Instant::now();
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(10)).await.code(), Some(0));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "waited the grace for the call, no longer: {took:?}"
    );
    let log = sc.stderr();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("stuck-1")
            && l.contains("not answered within --shutdown-grace")),
        "the unanswered call is logged at ERROR with its account:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// A full run with its logs captured: no secret anywhere

#[derive(Clone, Copy, Debug, PartialEq)]
enum LogMode {
    /// Default: text, info.
    Text,
    /// `--log-format json --log-level debug`.
    JsonDebug,
    /// `RUST_LOG=debug`, which wins over `--log-level error`.
    RustLogDebug,
}

fn secret(name: &str) -> String {
    format!("{name}-{:016x}", fastrand::u64(..))
}

/// Everything the outside world saw of the run, except the 200 answers of the token
/// endpoint (which carry tokens and passwords by design).
#[derive(Default)]
struct Seen {
    text: String,
}

impl Seen {
    fn add(&mut self, what: &str, s: &str) {
        self.text.push_str(&format!("\n==== {what}\n{s}"));
    }
}

async fn exchange(
    seen: &mut Seen,
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    basic: Option<(&str, &str)>,
) -> (u16, Value) {
    let mut req = c.request(method.clone(), &url);
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.unwrap();
    let is_token_answer = status == 200 && url.contains("/authentication");
    if !is_token_answer {
        seen.add(&format!("{method} {url} -> {status} {headers}"), &body);
    }
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn failure_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("token refresh failed"))
        .collect()
}

async fn full_run_leaks_no_secret(mode: LogMode) {
    let idp = MockIdp::start().await;
    let s_client_ms = secret("ms-client-secret");
    let s_client_ms_2 = secret("ms-client-secret-rotated");
    let s_client_gen = secret("gen-client-secret");
    let s_rt_ms = secret("rt-outlook");
    let s_rt_gen = secret("rt-generic");
    let s_rt_revoked = secret("rt-revoked");
    let s_basic = secret("basic-pw");
    let s_basic_2 = secret("basic-pw-rotated");
    let s_basic_3 = secret("basic-pw-misshapen");
    let s_admin = secret("admin-pw");
    let s_pass = secret("mailbox-pass");
    let s_static = secret("static-access-token");
    idp.with(|s| {
        s.rotate = true;
        s.lifetime = Some(6.0);
        s.valid_refresh_tokens = Some([s_rt_ms.clone(), s_rt_gen.clone()].into());
    });

    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let secret_file = dir.path().join("ms-client-secret.txt");
    std::fs::write(&secret_file, format!("{s_client_ms}\n")).unwrap();
    let config = |basic: &str| {
        json!({
            "auth": { "username": "emailengine", "password": basic },
            "adminAuth": { "username": "admin", "password": s_admin },
            "providers": {
                "ms": { "type": "microsoft", "clientId": "ms-client", "clientSecret": { "file": "ms-client-secret.txt" }, "tokenUrl": idp.url("/ms/token") },
                "gen": { "type": "oauth2", "clientId": "gen-client", "clientSecret": s_client_gen, "clientAuth": "basic", "tokenUrl": idp.url("/gen/token") }
            },
            "accounts": {
                "outlook-1": { "user": "o@example.com", "provider": "ms", "refreshToken": s_rt_ms },
                "generic-1": { "user": "g@example.com", "provider": "gen", "refreshToken": { "env": "LEAK_TEST_RT_GENERIC" } },
                "revoked-1": { "user": "r@example.com", "provider": "ms", "refreshToken": s_rt_revoked },
                "mailbox-1": { "user": "m@example.com", "pass": s_pass },
                "static-1": { "user": "s@example.com", "accessToken": s_static }
            }
        })
    };
    let cfg = dir.path().join("accounts.json");
    write_atomic(&cfg, &serde_json::to_vec_pretty(&config(&s_basic)).unwrap());
    let state = dir.path().join("state");

    let mut argv = args(&[
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
        "--reload-interval",
        "1s",
        "--shutdown-grace",
        "3s",
        // Forced refreshes back to back (fail, then recover): their rate limit is
        // tested in tests/operations.rs.
        "--forced-refresh-interval",
        "0s",
    ]);
    let mut env = vec![("LEAK_TEST_RT_GENERIC", s_rt_gen.clone())];
    match mode {
        LogMode::Text => {}
        LogMode::JsonDebug => argv.extend(args(&["--log-format", "json", "--log-level", "debug"])),
        LogMode::RustLogDebug => {
            argv.extend(args(&["--log-level", "error"]));
            env.push(("RUST_LOG", "debug".into()));
        }
    }
    let mut sc = Proc::spawn(&logs, &argv, &env);
    let a = sc.addr().await;
    let c = client();
    assert!(
        wait_ready(&c, a, Duration::from_secs(20)).await,
        "never ready"
    );
    let mut seen = Seen::default();
    let mut answers = Vec::new();
    let url = |q: &str| format!("http://{a}/authentication?{q}");
    let admin_url = |p: &str| format!("http://{a}/v1/accounts{p}");
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let ee = Some(("emailengine", s_basic.as_str()));
    let admin = Some(("admin", s_admin.as_str()));

    // Requests: every kind of answer.
    for q in [
        "account=outlook-1&proto=imap",
        "account=outlook-1&proto=smtp",
        "account=outlook-1&proto=api",
        "account=generic-1&proto=imap",
        "account=mailbox-1&proto=imap",
        "account=static-1&proto=api",
    ] {
        let (status, body) = exchange(&mut seen, &c, get.clone(), url(q), ee).await;
        assert_eq!(status, 200, "{q}: {body}");
        answers.push(body);
    }
    assert_eq!(
        exchange(
            &mut seen,
            &c,
            get.clone(),
            url("account=revoked-1&proto=imap"),
            ee
        )
        .await
        .0,
        403
    );
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), url("account=nobody"), ee)
            .await
            .0,
        404
    );
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), url("account=a&proto=pop3"), ee)
            .await
            .0,
        400
    );
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), url("account=mailbox-1"), None)
            .await
            .0,
        401
    );
    let wrong = format!("{s_basic}x");
    assert_eq!(
        exchange(
            &mut seen,
            &c,
            get.clone(),
            url("account=mailbox-1"),
            Some(("emailengine", &wrong))
        )
        .await
        .0,
        401
    );
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), admin_url(""), ee)
            .await
            .0,
        401
    );
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), admin_url(""), admin)
            .await
            .0,
        200
    );

    // A transient failure, then a permanent one whose description echoes secrets (as a
    // provider may): codes are kept, the description is not.
    idp.set_fault(Fault::status(503, Some(1)));
    let (status, body) = exchange(
        &mut seen,
        &c,
        post.clone(),
        admin_url("/generic-1/refresh"),
        admin,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    idp.set_fault(Fault::Status {
        status: 400,
        body: json!({ "error": "invalid_grant", "error_codes": [70008],
            "error_description": format!("AADSTS70008: refresh token {s_rt_ms} of client {s_client_ms} has expired") })
        .to_string(),
        retry_after: None,
    });
    let (status, body) = exchange(
        &mut seen,
        &c,
        post.clone(),
        admin_url("/outlook-1/refresh"),
        admin,
    )
    .await;
    idp.set_fault(Fault::None);
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body["credentialSets"][0]["lastError"]["providerCode"],
        "AADSTS70008"
    );
    // Both recover (a forced refresh does not wait out the back-off).
    for id in ["outlook-1", "generic-1"] {
        let (status, body) = exchange(
            &mut seen,
            &c,
            post.clone(),
            admin_url(&format!("/{id}/refresh")),
            admin,
        )
        .await;
        assert_eq!(status, 200, "{id}: {body}");
    }

    // Reloads: the client secret file rotates, the Basic password changes, a misshapen
    // config (with a password in it) is refused, then a good one is back.
    write_atomic(&secret_file, s_client_ms_2.as_bytes());
    let rotated_used = {
        let idp = idp.clone();
        let s = s_client_ms_2.clone();
        eventually(Duration::from_secs(15), move || {
            idp.requests()
                .iter()
                .any(|r| r.form.get("client_secret") == Some(&s))
        })
        .await
    };
    assert!(
        rotated_used,
        "the new client secret is used after the reload"
    );
    write_atomic(
        &cfg,
        &serde_json::to_vec_pretty(&config(&s_basic_2)).unwrap(),
    );
    let ee2 = Some(("emailengine", s_basic_2.as_str()));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = exchange(
            &mut seen,
            &c,
            get.clone(),
            url("account=outlook-1&proto=imap"),
            ee2,
        )
        .await;
        if status == 200 {
            answers.push(body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new Basic password never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), url("account=mailbox-1"), ee)
            .await
            .0,
        401
    );
    let mut broken = config(&s_basic_2);
    broken["auth"] = json!(format!("emailengine:{s_basic_3}"));
    let broken_text = serde_json::to_vec_pretty(&broken).unwrap();
    write_atomic(&cfg, &broken_text);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = exchange(&mut seen, &c, get.clone(), admin_url(""), admin).await;
        if body["config"]["lastError"].is_array() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broken config never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        exchange(&mut seen, &c, get.clone(), url("account=mailbox-1"), ee2)
            .await
            .0,
        200
    );
    write_atomic(
        &cfg,
        &serde_json::to_vec_pretty(&config(&s_basic_2)).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = exchange(&mut seen, &c, get.clone(), admin_url(""), admin).await;
        if body["config"]["lastError"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fixed config never noticed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Background refreshes (6 s tokens are refreshed 1.5 to 3 s after issue) rotate the
    // refresh tokens without any request asking.
    let calls = idp.calls();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(idp.calls() >= calls + 2, "background refreshes ran");
    assert!(idp.with(|s| s.spent.len()) >= 6, "refresh tokens rotated");
    for p in [
        "",
        "/outlook-1",
        "/generic-1",
        "/revoked-1",
        "/mailbox-1",
        "/static-1",
    ] {
        assert_eq!(
            exchange(&mut seen, &c, get.clone(), admin_url(p), admin)
                .await
                .0,
            200
        );
    }
    let metrics = scrape(&c, a).await;
    seen.add("/metrics", &metrics);

    let (stop, signal) = match mode {
        LogMode::RustLogDebug => ("INT", "SIGINT"),
        _ => ("TERM", "SIGTERM"),
    };
    sc.signal(stop);
    assert_eq!(
        sc.wait(Duration::from_secs(15)).await.code(),
        Some(0),
        "{signal}: exit 0"
    );
    let log = sc.stderr();
    seen.add("stderr", &log);
    seen.add("stdout", &sc.stdout());

    // The CLI tools on the same files: check (good and misshapen), token (masked),
    // token from the state directory the server left behind (its chain must be intact).
    let check = run(&args(&["check", "--config", cfg.to_str().unwrap()]), &env).await;
    assert!(check.status.success(), "{}", text(&check.stderr));
    seen.add("check", &(text(&check.stdout) + &text(&check.stderr)));
    let broken_file = dir.path().join("broken.json");
    std::fs::write(&broken_file, &broken_text).unwrap();
    let check = run(
        &args(&["check", "--config", broken_file.to_str().unwrap()]),
        &env,
    )
    .await;
    assert_eq!(check.status.code(), Some(1));
    assert!(
        text(&check.stderr).contains("auth: invalid type"),
        "{}",
        text(&check.stderr)
    );
    seen.add(
        "check broken",
        &(text(&check.stdout) + &text(&check.stderr)),
    );
    for account in ["mailbox-1", "static-1", "outlook-1"] {
        let out = run(
            &args(&[
                "token",
                "--config",
                cfg.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                account,
            ]),
            &env,
        )
        .await;
        assert!(
            out.status.success(),
            "token {account}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("masked"),
            "{}",
            text(&out.stdout)
        );
        seen.add(
            &format!("token {account}"),
            &(text(&out.stdout) + &text(&out.stderr)),
        );
    }

    // The audit: no secret of this run in anything that was logged, printed or answered
    // (other than the 200 token answers).
    let mut secrets = vec![
        s_client_ms,
        s_client_ms_2,
        s_client_gen,
        s_rt_ms,
        s_rt_gen,
        s_rt_revoked,
        s_basic,
        s_basic_2,
        s_basic_3,
        s_admin,
        s_pass,
        s_static,
    ];
    secrets.extend(idp.with(|s| {
        s.issued
            .keys()
            .cloned()
            .chain(s.spent.iter().cloned())
            .chain(s.valid_refresh_tokens.iter().flatten().cloned())
            .collect::<Vec<_>>()
    }));
    assert!(
        secrets.len() > 20,
        "rotations and refreshes happened: {}",
        secrets.len()
    );
    for s in &secrets {
        if let Some(at) = seen.text.find(s.as_str()) {
            let from = at.saturating_sub(300);
            panic!(
                "{mode:?}: secret {s} leaked:\n…{}…",
                &seen.text[from..(at + s.len() + 100).min(seen.text.len())]
            );
        }
    }
    // Sanity of the audit itself: the secrets did go where they belong.
    let answered = serde_json::to_string(&answers).unwrap();
    assert!(answered.contains(&secrets[10]) && answered.contains(&secrets[11]));
    assert!(idp.requests().iter().any(|r| r.authorization.is_some()));

    // The log itself: one line per failed refresh, with the fields an operator needs.
    let failures = failure_lines(&log);
    let failed_metric: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("ee_auth_refreshes_total{")
                && (l.contains(r#"outcome="transient""#) || l.contains(r#"outcome="permanent""#))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures.len() >= 3, "{log}");
    assert_eq!(
        failures.len() as f64,
        failed_metric,
        "one log line per failed refresh:\n{log}"
    );
    let has = |account: &str, class: &str, code: &str, provider_code: Option<&str>| {
        failures.iter().any(|l| match mode {
            LogMode::JsonDebug => {
                let v: Value = serde_json::from_str(l).unwrap();
                let f = &v;
                f["account"] == account
                    && f["class"] == class
                    && f["code"] == code
                    && f["provider"].is_string()
                    && provider_code.is_none_or(|p| f["provider_code"] == p)
            }
            _ => {
                // Text fields print as `name=value`, string values possibly quoted.
                let field = |name: &str, value: &str| {
                    l.contains(&format!(" {name}={value}"))
                        || l.contains(&format!(" {name}=\"{value}\""))
                };
                field("account", account)
                    && field("class", class)
                    && field("code", code)
                    && l.contains(" provider=")
                    && provider_code.is_none_or(|p| field("provider_code", p))
            }
        })
    };
    assert!(
        has("revoked-1", "permanent", "invalid_grant", None),
        "{log}"
    );
    assert!(
        has(
            "outlook-1",
            "permanent",
            "invalid_grant",
            Some("AADSTS70008")
        ),
        "{log}"
    );
    assert!(has("generic-1", "transient", "http_503", None), "{log}");

    // Format and level.
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colour codes in a log file"
    );
    match mode {
        LogMode::JsonDebug => {
            for l in &lines {
                let v: Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
            }
            assert!(
                lines.iter().any(|l| l.contains(r#""level":"DEBUG""#)),
                "--log-level debug"
            );
        }
        LogMode::Text => {
            assert!(lines.iter().all(|l| !l.starts_with('{')));
            assert!(
                !lines.iter().any(|l| l.contains(" DEBUG ")),
                "info by default"
            );
            assert!(lines.iter().any(|l| l.contains(" INFO ")));
        }
        LogMode::RustLogDebug => {
            assert!(lines.iter().all(|l| !l.starts_with('{')));
            assert!(
                lines.iter().any(|l| l.contains(" DEBUG ")),
                "RUST_LOG wins over --log-level"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_leaks_no_secret_text_logs() {
    full_run_leaks_no_secret(LogMode::Text).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_leaks_no_secret_json_debug_logs() {
    full_run_leaks_no_secret(LogMode::JsonDebug).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_leaks_no_secret_rust_log_debug() {
    full_run_leaks_no_secret(LogMode::RustLogDebug).await;
}

// ---------------------------------------------------------------------------------------
// check, token, --version

#[tokio::test]
async fn check_on_a_broken_config_names_every_problem_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("accounts.json");
    std::fs::write(
        &cfg,
        serde_json::to_vec_pretty(&json!({
            "auth": "emailengine:basic-password-in-the-wrong-shape",
            "providers": {
                "ms": { "type": "microsoft", "clientId": "c", "clientSecret": { "file": "missing-secret.txt" } },
                "app": { "type": "microsoft", "clientId": "c", "clientSecret": "app-secret-value", "tenant": "common" },
                "bad-url": { "type": "oauth2", "clientId": "c", "tokenUrl": "not a url" }
            },
            "accounts": {
                "dangling": { "user": "u", "provider": "nope", "refreshToken": "rt-dangling-value" },
                "env": { "user": "u", "pass": { "env": "EE_TEST_SURELY_UNSET_PASS" } },
                "typo": { "user": "u", "pass": "x", "pasword": "y" },
                "app-only": { "user": "u", "provider": "app", "grant": "client_credentials" },
                "no-rt": { "user": "u", "provider": "ms" }
            }
        }))
        .unwrap(),
    )
    .unwrap();
    let out = run(&args(&["check", "--config", cfg.to_str().unwrap()]), &[]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for problem in [
        "auth: invalid type",
        "providers.ms.clientSecret: cannot read secret file",
        "providers.bad-url.tokenUrl",
        "accounts.dangling.provider: no provider named `nope`",
        "accounts.env.pass: environment variable EE_TEST_SURELY_UNSET_PASS is not set",
        "accounts.typo.pasword",
        "accounts.app-only.grant",
        "accounts.no-rt",
    ] {
        assert!(err.contains(problem), "`{problem}` not named in:\n{err}");
    }
    assert!(
        err.contains("(10 errors)") || err.matches("\n  ").count() >= 8,
        "{err}"
    );
    let all = err + &text(&out.stdout);
    for s in [
        "basic-password-in-the-wrong-shape",
        "app-secret-value",
        "rt-dangling-value",
    ] {
        assert!(!all.contains(s), "{s} printed:\n{all}");
    }

    let out = run(
        &args(&["check", "--config", "/nonexistent/accounts.json"]),
        &[],
    )
    .await;
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("/nonexistent/accounts.json"));
}

#[tokio::test]
async fn check_on_a_good_config_prints_a_summary_per_provider_and_grant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "file-secret-value\n").unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": {
                "entra": { "type": "microsoft", "clientId": "c", "clientSecret": { "file": "secret.txt" }, "tenant": "contoso.example" },
                "other": { "type": "oauth2", "clientId": "c", "tokenUrl": "http://127.0.0.1:1/token", "clientSecret": "literal-secret-value" }
            },
            "accounts": {
                "u1": { "user": "u1@example.com", "provider": "entra", "refreshToken": "rt-u1-value" },
                "u2": { "user": "u2@example.com", "provider": "entra", "refreshToken": "rt-u2-value",
                        "protocols": { "api": { "provider": "other", "grant": "client_credentials" } } },
                "app": { "user": "app@example.com", "provider": "entra", "grant": "client_credentials" },
                "pw": { "user": "p@example.com", "pass": "pw-value" }
            }
        }),
    );
    let out = run(&args(&["check", "--config", cfg.to_str().unwrap()]), &[]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("OK, 4 account(s)"), "{stdout}");
    let entra = stdout.find("provider entra (microsoft)").expect(&stdout);
    let other = stdout.find("provider other (oauth2)").expect(&stdout);
    let (entra_part, other_part) = (&stdout[entra..other], &stdout[other..]);
    assert!(
        entra_part.contains("refresh_token: 2 account(s)"),
        "{stdout}"
    );
    assert!(
        entra_part.contains("client_credentials: 1 account(s)"),
        "{stdout}"
    );
    // u2's Graph override counts under the provider and grant it uses.
    assert!(
        other_part.contains("client_credentials: 1 account(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("password or static-token accounts: 1"));
    assert!(stdout.contains("secret files read: 1"));
    for s in [
        "file-secret-value",
        "literal-secret-value",
        "rt-u1-value",
        "pw-value",
    ] {
        assert!(!stdout.contains(s) && !text(&out.stderr).contains(s));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_the_answer_masked_unless_asked_to_show_it() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": {
                "idp": oauth2_provider(&idp),
                "ms": { "type": "microsoft", "clientId": "c", "tokenUrl": idp.url("/ms") }
            },
            "accounts": {
                "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a-value" },
                "revoked": { "user": "r@example.com", "provider": "ms", "refreshToken": "rt-revoked-value" },
                "pw": { "user": "p@example.com", "pass": "a-long-mailbox-password-value" }
            }
        }),
    );
    let c = cfg.to_str().unwrap();

    // This provider does not rotate: spending its refresh token without a state
    // directory is harmless, and said so explicitly.
    let out = run(
        &args(&[
            "token",
            "--config",
            c,
            "a",
            "--proto",
            "imap",
            "--allow-unpersisted",
        ]),
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "",
        "nothing rotated, nothing to warn about"
    );
    let stdout = text(&out.stdout);
    let issued: Vec<String> = idp.with(|s| s.issued.keys().cloned().collect());
    assert_eq!(issued.len(), 1, "fetched once");
    assert!(!stdout.contains(&issued[0]), "masked: {stdout}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["user"], "a@example.com");
    assert!(v["accessToken"].as_str().unwrap().contains("masked"), "{v}");
    assert_eq!(idp.requests()[0].form["grant_type"], "refresh_token");

    let out = run(
        &args(&[
            "token",
            "--config",
            c,
            "a",
            "--proto",
            "imap",
            "--show-token",
            "--allow-unpersisted",
        ]),
        &[],
    )
    .await;
    assert!(out.status.success());
    let v: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    let token = v["accessToken"].as_str().unwrap();
    idp.check_valid(token).unwrap();
    assert_eq!(
        v,
        json!({ "user": "a@example.com", "accessToken": token }),
        "exactly EmailEngine's answer"
    );

    let out = run(&args(&["token", "--config", c, "pw"]), &[]).await;
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("masked") && !stdout.contains("a-long"),
        "no part of a password: {stdout}"
    );

    idp.set_fault(Fault::invalid_grant(Some(70008)));
    let out = run(
        &args(&["token", "--config", c, "revoked", "--allow-unpersisted"]),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid_grant") && err.contains("AADSTS70008"),
        "{err}"
    );
    assert!(!err.contains("rt-revoked-value") && !text(&out.stdout).contains("rt-revoked-value"));

    let out = run(&args(&["token", "--config", c, "nobody"]), &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nobody"));
    let out = run(
        &args(&["token", "--config", c, "a", "--proto", "pop3"]),
        &[],
    )
    .await;
    assert_ne!(out.status.code(), Some(0), "an unknown protocol is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_never_spends_a_refresh_token_it_cannot_keep() {
    let idp = MockIdp::start().await;
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(["rt-a".to_owned()].into());
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": {
                "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" },
                "app": { "user": "app@example.com", "provider": "idp", "grant": "client_credentials" }
            }
        }),
    );
    let c = cfg.to_str().unwrap();
    let state = dir.path().join("state");
    let s = state.to_str().unwrap();

    // No --state-dir: refused before anything is spent, with what to do instead.
    let out = run(&args(&["token", "--config", c, "a"]), &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("--state-dir")
            && err.contains("--allow-unpersisted")
            && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(idp.calls(), 0, "nothing was spent");
    // A grant that cannot rotate needs no state directory.
    let out = run(&args(&["token", "--config", c, "app"]), &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(idp.calls(), 1);

    // Beside a sidecar running on the state directory, `token` on it spends the token the
    // sidecar stored last and stores its own rotation for the sidecar (one spender at a
    // time: the account's lease); so does a second sidecar.
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut sc = Proc::spawn(
        &logs,
        &args(&[
            "--config",
            c,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            s,
            "--prewarm-concurrency",
            "0",
        ]),
        &[],
    );
    let addr = sc.addr().await;
    let out = run(&args(&["token", "--config", c, "--state-dir", s, "a"]), &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(idp.calls(), 2);
    // The sidecar's own first refresh re-reads the record `token` stored: no reuse.
    let r = ask(&client(), addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let logs2 = dir.path().join("logs2");
    std::fs::create_dir(&logs2).unwrap();
    let mut second = Proc::spawn(
        &logs2,
        &args(&["--config", c, "--listen", "127.0.0.1:0", "--state-dir", s]),
        &[],
    );
    let addr2 = second.addr().await;
    let r = ask(&client(), addr2, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        idp.with(|s| s.reuse_detected),
        0,
        "a superseded token was spent"
    );
    for p in [&mut sc, &mut second] {
        p.signal("TERM");
        assert_eq!(p.wait(Duration::from_secs(10)).await.code(), Some(0));
    }

    // Once they stopped, `token --state-dir` spends the token and keeps the rotated one.
    let out = run(&args(&["token", "--config", c, "--state-dir", s, "a"]), &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let live = idp.with(|s| s.valid_refresh_tokens.clone().unwrap());
    let record = std::fs::read_dir(state.join("refresh-tokens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a record");
    let rec: Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    assert!(live.contains(rec["refreshToken"].as_str().unwrap()));

    // --allow-unpersisted spends it anyway, and says the rotated token was thrown away.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(
        dir2.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": { "a": { "user": "a@example.com", "provider": "idp", "refreshToken": rec["refreshToken"] } }
        }),
    );
    let out = run(
        &args(&[
            "token",
            "--config",
            cfg2.to_str().unwrap(),
            "a",
            "--allow-unpersisted",
        ]),
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("was not kept"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn version_prints_the_version_and_git_revision() {
    let out = run(&args(&["--version"]), &[]).await;
    assert!(out.status.success());
    let v = text(&out.stdout);
    let expected = format!("ee-auth-sidecar {} (git ", env!("CARGO_PKG_VERSION"));
    assert!(v.starts_with(&expected), "{v}");
    let rev = v[expected.len()..].trim_end().trim_end_matches(')');
    assert!(
        rev == "unknown" || (rev.len() == 12 && rev.chars().all(|c| c.is_ascii_hexdigit())),
        "revision `{rev}`"
    );
}

/// #13 items 3, 11 and 13 as the operator reads them in the log: a redirect's WARN line
/// names the target host (never its path or query, never the credentials), a token with
/// characters a bearer token may not have is refused without ever being logged, and a
/// lifetime over 24 h is warned about once per provider, not once per account.
#[tokio::test]
async fn token_endpoint_trouble_is_logged_with_its_host_once_and_without_the_token() {
    let redirecting = MockIdp::start().await;
    let elsewhere = MockIdp::start().await;
    let long_lived = MockIdp::start().await;
    let bad_token = MockIdp::start().await;
    redirecting.set_fault(Fault::Redirect {
        status: 307,
        location: elsewhere.url("/final?tenant=query-part"),
    });
    long_lived.set_fault(Fault::Body(
        r#"{"access_token":"long-token","expires_in":1e12}"#.into(),
    ));
    bad_token.set_fault(Fault::Body(
        r#"{"access_token":"MARKER token\r\nX-Injected: 1","expires_in":3600}"#.into(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let account = |provider: &str| json!({ "user": "u@example.com", "provider": provider, "refreshToken": "rt-secret-value" });
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": { "redirecting": oauth2_provider(&redirecting), "long": oauth2_provider(&long_lived), "bad": oauth2_provider(&bad_token) },
            "accounts": { "r": account("redirecting"), "l1": account("long"), "l2": account("long"), "b": account("bad") }
        }),
    );
    // What is logged is the point here, not how long a request is held through the
    // retries (tests/timing.rs, tests/outage.rs): a short --request-wait answers the 429s
    // within a second instead of the default 20 s.
    let mut sc = Proc::spawn(
        dir.path(),
        &args(&[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--request-wait",
            "1s",
        ]),
        &[],
    );
    let a = sc.addr().await;
    let c = client();
    assert_eq!(ask(&c, a, "account=r&proto=imap", None).await.status, 429);
    assert_eq!(ask(&c, a, "account=b&proto=imap", None).await.status, 429);
    for l in ["l1", "l2"] {
        let r = ask(&c, a, &format!("account={l}&proto=imap"), None).await;
        assert_eq!(r.token(), "long-token");
    }
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(10)).await.code(), Some(0));
    let log = sc.stderr();
    assert_eq!(elsewhere.calls(), 0, "the redirect was followed");
    let failures = failure_lines(&log);
    let redirect_host = format!("redirect_host=\"{}\"", elsewhere.addr);
    assert!(
        failures.iter().any(|l| l.contains("account=r")
            && l.contains("code=redirect")
            && l.contains(&redirect_host)),
        "{log}"
    );
    assert!(
        failures
            .iter()
            .any(|l| l.contains("account=b") && l.contains("RFC 6750")),
        "{log}"
    );
    for never in [
        "query-part",
        "/final",
        "MARKER",
        "X-Injected",
        "rt-secret-value",
        "client-secret-value",
    ] {
        assert!(!log.contains(never), "`{never}` in the log:\n{log}");
    }
    let clamped = log
        .lines()
        .filter(|l| l.contains("expires_in over the maximum"))
        .count();
    assert_eq!(clamped, 1, "{log}");
}

// ---------------------------------------------------------------------------------------
// Files and signals the operator points at the process

#[tokio::test]
async fn a_fifo_secret_at_start_is_a_clear_error_and_check_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pass.fifo");
    mkfifo(&fifo);
    let cfg = write_config(
        dir.path(),
        &json!({ "accounts": { "m": { "user": "u", "pass": { "file": "pass.fifo" } } } }),
    );
    let c = cfg.to_str().unwrap();
    for (sub, cmd) in [
        ("serve", args(&["--config", c, "--listen", "127.0.0.1:0"])),
        ("check", args(&["check", "--config", c])),
    ] {
        let run_dir = dir.path().join(sub);
        std::fs::create_dir(&run_dir).unwrap();
        let mut p = Proc::spawn(&run_dir, &cmd, &[]);
        let status = p.wait(Duration::from_secs(10)).await;
        let err = p.stderr();
        assert_eq!(status.code(), Some(1), "{sub}: {status}\n{err}");
        assert!(
            err.contains("accounts.m.pass")
                && err.contains(fifo.to_str().unwrap())
                && err.contains("is a FIFO (named pipe), not a regular file"),
            "{sub}: the error names the field, the file and what it is:\n{err}"
        );
        assert!(!p.stderr().contains("listening"), "{sub}");
    }
    // TLS material is read the same way: a FIFO for the certificate stops start-up at once.
    let good = write_config(
        &dir.path().join("serve"),
        &json!({ "accounts": { "m": { "user": "u", "pass": "p" } } }),
    );
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let f = fifo.to_str().unwrap();
    let mut p = Proc::spawn(
        &tls_dir,
        &args(&[
            "--config",
            good.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .into_iter()
        .chain(args(&["--tls-cert", f, "--tls-key", f]))
        .collect::<Vec<_>>(),
        &[],
    );
    let status = p.wait(Duration::from_secs(10)).await;
    let err = p.stderr();
    assert_eq!(status.code(), Some(1), "tls: {status}\n{err}");
    assert!(
        err.contains(&format!(
            "cannot read certificate file {f}: is a FIFO (named pipe)"
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_the_state_directory_is_skipped_with_a_warning() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("refresh-tokens")).unwrap();
    let fifo = state.join("refresh-tokens").join("0123.json");
    mkfifo(&fifo);
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" },
            "m": { "user": "u", "pass": "p" } } }),
    );
    let (c, s) = (cfg.to_str().unwrap(), state.to_str().unwrap());

    let token_dir = dir.path().join("token");
    std::fs::create_dir(&token_dir).unwrap();
    let mut token = Proc::spawn(
        &token_dir,
        &args(&["token", "--config", c, "--state-dir", s, "a"]),
        &[],
    );
    let status = token.wait(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "token: {status}\n{}",
        token.stderr()
    );
    assert!(
        token.stdout().contains("a@example.com"),
        "{}",
        token.stdout()
    );

    let serve_dir = dir.path().join("serve");
    std::fs::create_dir(&serve_dir).unwrap();
    let mut sc = Proc::spawn(
        &serve_dir,
        &args(&["--config", c, "--listen", "127.0.0.1:0", "--state-dir", s]),
        &[],
    );
    let addr = sc.addr().await;
    let client = client();
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        ask(&client, addr, "account=a", None),
    )
    .await
    .expect("the sidecar answers");
    assert_eq!(answered.status, 200);
    let log = sc.stderr();
    assert!(
        log.contains(fifo.to_str().unwrap()) && log.contains("is a FIFO (named pipe)"),
        "the skipped record is named:\n{log}"
    );
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test]
async fn sighup_applies_a_config_change_now_and_sigusr1_sigusr2_are_ignored() {
    let root = tempfile::tempdir().unwrap();
    let (watched, elsewhere) = (root.path().join("watched"), root.path().join("elsewhere"));
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let cfg = |pass: &str| {
        serde_json::to_vec(&json!({ "accounts": { "m": { "user": "u", "pass": pass } } })).unwrap()
    };
    let path = watched.join("accounts.json");
    std::fs::write(&path, cfg("before")).unwrap();
    // Written through a hard link in a directory nobody watches: the watcher cannot see
    // the change (and the periodic re-read is an hour away), only SIGHUP can apply it.
    let other_name = elsewhere.join("same-inode.json");
    std::fs::hard_link(&path, &other_name).unwrap();
    let mut sc = Proc::spawn(
        root.path(),
        &args(&[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--reload-interval",
            "1h",
        ]),
        &[],
    );
    let addr = sc.addr().await;
    let c = client();
    let pass = |a: Answer| a.body["pass"].as_str().unwrap_or_default().to_owned();
    assert_eq!(pass(ask(&c, addr, "account=m", None).await), "before");

    for sig in ["USR1", "USR2"] {
        sc.signal(sig);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            sc.child.try_wait().unwrap().is_none(),
            "SIG{sig} killed the process:\n{}",
            sc.stderr()
        );
        assert!(
            sc.stderr().contains(&format!("SIG{sig} received; ignored")),
            "SIG{sig} is logged:\n{}",
            sc.stderr()
        );
    }
    std::fs::write(&other_name, cfg("after")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pass(ask(&c, addr, "account=m", None).await),
        "before",
        "the change was applied without SIGHUP, so this test proves nothing"
    );
    let t = Instant::now();
    sc.signal("HUP");
    while pass(ask(&c, addr, "account=m", None).await) != "after" {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGHUP did not apply the change:\n{}",
            sc.stderr()
        );
        assert!(
            sc.child.try_wait().unwrap().is_none(),
            "SIGHUP killed the process"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = sc.stderr();
    assert!(
        log.contains("SIGHUP received; re-reading the config") && log.contains("config reloaded"),
        "{log}"
    );
    // An unchanged file: the outcome is logged too.
    sc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sc.stderr().contains("config unchanged") {
        assert!(Instant::now() < deadline, "{}", sc.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_out_of_range_duration_or_count_flag_is_refused_at_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({ "accounts": { "m": { "user": "u", "pass": "p" } } }),
    );
    let c = cfg.to_str().unwrap();
    // (flag, bad value, the range the message must state)
    let cases: &[(&str, &str, &str)] = &[
        ("--min-ttl", "2h", "0s to 1h"),
        ("--refresh-margin", "13h", "0s to 12h"),
        ("--default-lifetime", "500ms", "1s to 1day"),
        ("--default-lifetime", "25h", "1s to 1day"),
        ("--backoff-max", "0s", "1s to 1h"),
        ("--permanent-retry", "500000000000y", "1s to 7days"),
        ("--request-wait", "90s", "0s to 1m 20s"),
        ("--upstream-timeout", "1h", "100ms to 5m"),
        (
            "--reload-interval",
            "18446744073709551615s",
            "100ms to 1day",
        ),
        ("--reload-interval", "10ms", "100ms to 1day"),
        ("--prewarm-timeout", "2h", "0s to 1h"),
        ("--shutdown-grace", "500000000000y", "0s to 10m"),
        ("--header-read-timeout", "0s", "100ms to 10m"),
        ("--prewarm-concurrency", "100000", "0 to 1024"),
        ("--provider-concurrency", "9223372036854775808", "1 to 1024"),
        ("--provider-concurrency", "0", "1 to 1024"),
        ("--max-connections", "9223372036854775808", "1 to 1000000"),
        ("--max-connections", "0", "1 to 1000000"),
        ("--worker-threads", "0", "1 to 64"),
        ("--worker-threads", "100000", "1 to 64"),
    ];
    let mut procs = Vec::new();
    for (i, (flag, value, _)) in cases.iter().enumerate() {
        let run_dir = dir.path().join(format!("case-{i}"));
        std::fs::create_dir(&run_dir).unwrap();
        procs.push(Proc::spawn(
            &run_dir,
            &args(&["--config", c, "--listen", "127.0.0.1:0", flag, value]),
            &[],
        ));
    }
    // The same through the environment.
    let env_dir = dir.path().join("env");
    std::fs::create_dir(&env_dir).unwrap();
    let mut env = Proc::spawn(
        &env_dir,
        &args(&["--config", c, "--listen", "127.0.0.1:0"]),
        &[("EE_AUTH_PERMANENT_RETRY", "500000000000y".to_owned())],
    );
    for ((flag, value, range), p) in cases.iter().zip(procs.iter_mut()) {
        let status = p.wait(Duration::from_secs(10)).await;
        let err = p.stderr();
        assert_eq!(status.code(), Some(2), "{flag} {value}: {status}\n{err}");
        assert!(
            err.contains(flag) && err.contains(range),
            "{flag} {value}: the message names the flag and the range `{range}`:\n{err}"
        );
    }
    let status = env.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2), "{}", env.stderr());
    assert!(env.stderr().contains("1s to 7days"), "{}", env.stderr());

    let probe = run(
        &args(&["probe", "http://127.0.0.1:1/", "--timeout", "2h"]),
        &[],
    )
    .await;
    assert_eq!(probe.status.code(), Some(2), "{}", text(&probe.stderr));
    assert!(
        text(&probe.stderr).contains("100ms to 1m"),
        "{}",
        text(&probe.stderr)
    );
}

/// Regression (review of the merged #13/#15 work): `token` holds its request through a
/// back-off, so it could give up (after its 60 s) while a refresh was still with the
/// provider and exit at once: the rotated refresh token in that late answer was never
/// written, the one in the state directory was spent, and the account was lost. It now
/// starts nothing more and waits for what it sent before it lets the directory go.
///
/// The command runs in-process (`cli::token`, which is all main.rs calls for it) on
/// tokio's paused clock: its 60 s wait, the 58 s Retry-After and the 6 s answer are
/// virtual, so the test takes no minute of wall time.
#[tokio::test(start_paused = true)]
async fn token_waits_for_a_refresh_still_under_way_when_its_request_gives_up() {
    let idp = MockIdp::start().await;
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(["rt-a".to_owned()].into());
    });
    // The first answer asks for 58 s: the retry falls inside the command's 60 s wait,
    // and then answers too slowly for it (6 s).
    idp.set_fault(Fault::status(503, Some(58)));
    let slow_retry = {
        let idp = idp.clone();
        tokio::spawn(async move {
            assert!(eventually(Duration::from_secs(10), || idp.calls() >= 1).await);
            idp.with(|s| {
                s.fault = Fault::None;
                s.delay = Duration::from_secs(6);
            });
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": { "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-a" } }
        }),
    );
    let (c, state) = (cfg.to_str().unwrap(), dir.path().join("state"));
    let token = args(&[
        "token",
        "--config",
        c,
        "a",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    token_in_process(&token).await;
    slow_retry.await.unwrap();
    assert_eq!(idp.calls(), 2);
    // The mock rotates when its answer is delivered; a real provider rotates whether or
    // not the client still waits. Either way the command must have waited for it.
    assert_eq!(
        idp.with(|s| s.spent.len()),
        1,
        "the command exited before the refresh it sent was answered"
    );
    // The rotation of that late answer was kept: the next run spends it, not rt-a.
    idp.with(|s| s.delay = Duration::ZERO);
    assert_eq!(token_in_process(&token).await, 0, "the next run succeeds");
    assert_eq!(
        idp.with(|s| s.reuse_detected),
        0,
        "a spent refresh token was presented"
    );
}

#[tokio::test]
async fn a_bad_state_url_is_refused_without_repeating_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("accounts.json").display().to_string();
    for bad in [
        "redis:/:hunter2pw@redis/0",
        "http://:hunter2pw@redis:6379/0",
    ] {
        let out = run(&args(&["serve", "--config", &config, "--state", bad]), &[]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("invalid --state"), "{stderr}");
        assert!(
            !stderr.contains("hunter2pw"),
            "the password was printed: {stderr}"
        );
    }
    // Nor does --help show a --state taken from the environment.
    let out = run(
        &args(&["serve", "--help"]),
        &[(
            "EE_AUTH_STATE",
            "redis://:hunter2pw@redis:6379/0".to_owned(),
        )],
    )
    .await;
    assert!(out.status.success());
    assert!(
        !text(&out.stdout).contains("hunter2pw"),
        "{}",
        text(&out.stdout)
    );
}
