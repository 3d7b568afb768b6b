//! Crash safety of rotated refresh tokens: the real binary, `kill -9` at random moments.
//!
//! The mock identity provider (in this test process, so it outlives every kill) rotates
//! the refresh token on every use and rejects a spent one (reuse detection), except the
//! token each account's chain superseded last, within a grace period: Okta and Auth0 do
//! the same, because no client can close the window between the provider committing a
//! rotation and the client's fsync of the new token. The grace covers exactly that lost
//! in-flight answer, never an older token.
//!
//! Each cycle starts the binary with the same `--state-dir`, checks that every account
//! gets a token (a fresh refresh with the persisted token: pre-warm spends it), lets
//! rotations run (1.5 s tokens, so every account rotates about twice a second) under
//! request load, then SIGKILLs it at a random moment — sometimes in the middle of
//! pre-warm. After every kill every record in `<state-dir>/refresh-tokens` is parsed (never
//! torn), and each account's persisted token must be its chain's live token or the one
//! superseded last (a kill inside the provider→fsync window). At the end the mock must
//! never have detected a reuse outside the grace, and no account may be lost.
//!
//! `cargo test --test crash` runs 15 kills; the 200-kill run is
//! `CRASH_KILLS=200 cargo test --test crash -- --ignored --nocapture` (scripts/crash-test.sh).
//!
//! A SIGTERM is a graceful stop, so it must lose nothing at all: the SIGTERM test runs a
//! few hundred accounts with short tokens against a slow provider that rotates on every
//! use and forgives no reuse, signals at random moments under refresh traffic, and
//! requires after every stop that each account's persisted token is its chain's live one.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const ACCOUNTS: usize = 6;
const LIFETIME: f64 = 1.5;
/// How long the provider forgives reuse of the token superseded last.
const GRACE: Duration = Duration::from_secs(30);

fn account(i: usize) -> String {
    format!("acct{i}")
}

fn config_token(i: usize) -> String {
    format!("cfg-rt-{i}")
}

/// A running sidecar binary and the address it announced.
struct Sidecar {
    child: Child,
    addr: SocketAddr,
}

fn spawn(config: &Path, state: &Path) -> Sidecar {
    spawn_with(config, state, &[])
}

fn spawn_with(config: &Path, state: &Path, extra: &[&str]) -> Sidecar {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ee-auth-sidecar"))
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--state-dir".as_ref(), state.as_os_str()])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--backoff-max",
            "1s",
            "--request-wait",
            "3s",
            "--upstream-timeout",
            "3s",
            "--reload-interval",
            "1h",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sidecar binary");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log for the bound address, then keeps draining it so the child never
    // blocks on a full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "listening" {
                    if let (Some(tx), Some(a)) = (tx.take(), v["addr"].as_str()) {
                        let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                    }
                }
                if v["level"] == "ERROR" || v["level"] == "WARN" {
                    eprintln!("sidecar: {line}");
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the sidecar logs its address");
    Sidecar { child, addr }
}

impl Sidecar {
    fn kill(mut self) {
        // std's kill is SIGKILL on Unix.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits (at most `limit`) for the exit status.
    async fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("still running {limit:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One persisted record, as src/state/record.rs writes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileRecord {
    version: u32,
    account: String,
    config_token_sha256: String,
    refresh_token: String,
    #[allow(dead_code)]
    updated_at_unix: u64,
    /// Rotations across processes (compare-and-set).
    #[allow(dead_code)]
    generation: u64,
}

/// Parses every record; returns account -> persisted token and the number of stray
/// temp files (a write that never reached its rename; harmless, removed at start).
fn read_state(state: &Path) -> Result<(HashMap<String, String>, usize), String> {
    read_state_of(state, ACCOUNTS)
}

/// [`read_state`] for a map of `accounts` accounts.
fn read_state_of(
    state: &Path,
    accounts: usize,
) -> Result<(HashMap<String, String>, usize), String> {
    let dir = state.join("refresh-tokens");
    let mut out = HashMap::new();
    let mut tmp = 0;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok((out, 0));
    };
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            tmp += 1;
            continue;
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if mode != 0o600 {
            return Err(format!("{name}: mode {mode:o}"));
        }
        let text = std::fs::read(&path).map_err(|e| e.to_string())?;
        let rec: FileRecord = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{name} is torn or not a record ({e}): {:?}",
                String::from_utf8_lossy(&text)
            )
        })?;
        let i = (0..accounts)
            .find(|i| account(*i) == rec.account)
            .ok_or_else(|| format!("{name}: unknown account {}", rec.account))?;
        if rec.version != 1
            || rec.config_token_sha256 != sha256_hex(&config_token(i))
            || rec.refresh_token.is_empty()
            || name != format!("{}.json", sha256_hex(&rec.account))
        {
            return Err(format!("{name}: inconsistent record for {}", rec.account));
        }
        out.insert(rec.account, rec.refresh_token);
    }
    Ok((out, tmp))
}

/// A config of `n` accounts `acct{i}` with refresh tokens `cfg-rt-{i}`, all on the mock.
fn accounts_config(dir: &Path, idp: &MockIdp, n: usize) -> PathBuf {
    let accounts: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| {
            (
                account(i),
                json!({ "user": format!("{}@example.com", account(i)), "provider": "idp", "refreshToken": config_token(i) }),
            )
        })
        .collect();
    write_config(
        dir,
        &json!({ "providers": { "idp": oauth2_provider(idp) }, "accounts": accounts }),
    )
}

#[derive(Default, Debug)]
struct Outcome {
    kills: usize,
    restarts_checked: usize,
    /// Kills that left at least one account's newest token unpersisted (the provider had
    /// rotated it, the answer died with the process)...
    kills_in_rotation_window: usize,
    /// ...and how many accounts in all.
    accounts_in_rotation_window: usize,
    stray_temp_files: usize,
    lost: Vec<String>,
    problems: Vec<String>,
    rotations: u64,
    reuse_forgiven: u64,
    reuse_detected: u64,
}

async fn crash_cycles(kills: usize) -> Outcome {
    // The suite's run uses a fixed schedule of kill moments (the process's own timing
    // still varies); the long run (scripts/crash-test.sh) draws a fresh one each time.
    let seed = match std::env::var("CRASH_SEED") {
        Ok(s) if s == "random" => fastrand::u64(..),
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("CRASH_SEED={s:?}: not a number or `random`")),
        Err(_) => 0x6b69_6c6c_2d39,
    };
    eprintln!("crash test: {kills} kills, CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(LIFETIME));
    idp.with(|s| {
        s.rotate = true;
        s.reuse_grace = Some(GRACE);
        s.valid_refresh_tokens = Some((0..ACCOUNTS).map(config_token).collect());
    });
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("state");
    let cfg = accounts_config(dir.path(), &idp, ACCOUNTS);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut out = Outcome::default();

    for cycle in 0..=kills {
        let sc = spawn(&cfg, &state);
        let last = cycle == kills;
        // A third of the kills land during start-up and pre-warm, when every account
        // rotates at once; the rest after a check, under load, at a random moment.
        let early = !last && rng.u32(0..3) == 0;
        if early {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
            sc.kill();
        } else {
            if !wait_ready(&c, sc.addr, Duration::from_secs(20)).await {
                out.problems.push(format!("cycle {cycle}: never ready"));
            }
            // After each restart every account must still refresh successfully: pre-warm
            // has spent each persisted token once; a rejected one answers 403 here.
            for i in 0..ACCOUNTS {
                let url = format!(
                    "http://{}/authentication?account={}&proto=imap",
                    sc.addr,
                    account(i)
                );
                let r = c.get(&url).send().await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        body["accessToken"]
                            .as_str()
                            .is_some_and(|t| idp.check_valid(t).is_ok())
                    }
                    Ok(r) => {
                        let s = r.status();
                        out.problems.push(format!(
                            "cycle {cycle}: {} answered {s}: {}",
                            account(i),
                            r.text().await.unwrap_or_default()
                        ));
                        false
                    }
                    Err(e) => {
                        out.problems
                            .push(format!("cycle {cycle}: {}: {e}", account(i)));
                        false
                    }
                };
                if !ok && !out.lost.contains(&account(i)) {
                    out.lost.push(account(i));
                }
            }
            out.restarts_checked += 1;
            if last {
                sc.kill();
                break;
            }
            // Request load while rotations run, until the kill.
            let stop = Arc::new(AtomicBool::new(false));
            let load = {
                let (c, addr, stop) = (c.clone(), sc.addr, stop.clone());
                tokio::spawn(async move {
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let url = format!(
                            "http://{addr}/authentication?account={}&proto=imap",
                            account(n % ACCOUNTS)
                        );
                        let _ = c.get(&url).send().await;
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            };
            tokio::time::sleep(Duration::from_millis(rng.u64(0..1500))).await;
            stop.store(true, Ordering::Relaxed);
            sc.kill();
            let _ = load.await;
        }
        out.kills += 1;
        // Requests the dead process already wrote may still be answered by the mock.
        tokio::time::sleep(Duration::from_millis(50)).await;
        match read_state(&state) {
            Err(e) => out.problems.push(format!("kill {}: {e}", out.kills)),
            Ok((persisted, tmp)) => {
                out.stray_temp_files += tmp;
                let mut in_window = 0;
                idp.with(|s| {
                    for i in 0..ACCOUNTS {
                        let tok = persisted
                            .get(&account(i))
                            .cloned()
                            .unwrap_or_else(|| config_token(i));
                        let live = s.valid_refresh_tokens.as_ref().unwrap().contains(&tok);
                        let superseded_last = s.last_superseded.contains_key(&tok);
                        if superseded_last && !live {
                            in_window += 1;
                        } else if !live {
                            out.problems.push(format!(
                                "kill {}: {} persisted a token the provider no longer accepts",
                                out.kills,
                                account(i)
                            ));
                        }
                    }
                });
                out.kills_in_rotation_window += usize::from(in_window > 0);
                out.accounts_in_rotation_window += in_window;
            }
        }
    }
    idp.with(|s| {
        out.rotations = s.spent.len() as u64;
        out.reuse_forgiven = s.reuse_forgiven;
        out.reuse_detected = s.reuse_detected;
    });
    out
}

fn check(out: &Outcome) {
    eprintln!("crash test result: {out:#?}");
    assert!(out.problems.is_empty(), "{:#?}", out.problems);
    assert!(out.lost.is_empty(), "accounts lost: {:?}", out.lost);
    assert_eq!(
        out.reuse_detected, 0,
        "the provider saw a refresh token reused outside its grace"
    );
    assert!(out.restarts_checked > out.kills / 2);
    assert!(
        out.rotations >= out.kills as u64,
        "too few rotations to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_account() {
    let kills = std::env::var("CRASH_KILLS_SMALL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    check(&crash_cycles(kills).await);
}

/// The long run: `CRASH_KILLS=200 cargo test --test crash -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200 kills, a few minutes; run by scripts/crash-test.sh"]
async fn kill_9_many_times_loses_no_account() {
    let kills = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let started = Instant::now();
    let out = crash_cycles(kills).await;
    eprintln!("{kills} kills in {:?}", started.elapsed());
    check(&out);
}

// ---------------------------------------------------------------------------------------
// SIGTERM: a graceful stop loses no account, ever

const TERM_ACCOUNTS: usize = 200;
/// 4 s tokens: each account refreshes every 1–2 s, so ~130 refreshes a second...
const TERM_LIFETIME: f64 = 4.0;
/// ...each taking 0.3 s at the provider: ~40 calls in flight at any moment.
const TERM_DELAY: Duration = Duration::from_millis(300);

/// Asks every account once; returns those that got no valid token.
async fn accounts_failing(
    c: &reqwest::Client,
    addr: SocketAddr,
    idp: &MockIdp,
    n: usize,
) -> Vec<(String, String)> {
    let asks = (0..n).map(|i| {
        let c = c.clone();
        async move {
            let url = format!(
                "http://{addr}/authentication?account={}&proto=imap",
                account(i)
            );
            let got = match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    match body["accessToken"].as_str() {
                        Some(t) => idp.check_valid(t).err(),
                        None => Some(format!("no token in {body}")),
                    }
                }
                Ok(r) => Some(format!(
                    "{}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(e) => Some(e.to_string()),
            };
            got.map(|why| (account(i), why))
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_random_moments_under_refresh_traffic_loses_no_account() {
    let terms: usize = std::env::var("TERM_SIGNALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = match std::env::var("CRASH_SEED") {
        Ok(s) if s == "random" => fastrand::u64(..),
        Ok(s) => s.parse().expect("CRASH_SEED: a number or `random`"),
        Err(_) => 0x7465_726d,
    };
    eprintln!("sigterm test: {terms} signals, CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let idp = MockIdp::start().await;
    idp.set_lifetime(Some(TERM_LIFETIME));
    idp.with(|s| {
        s.rotate = true;
        // Strict: a spent refresh token is refused, whenever (no grace for lost answers).
        s.reuse_grace = None;
        s.delay = TERM_DELAY;
        s.valid_refresh_tokens = Some((0..TERM_ACCOUNTS).map(config_token).collect());
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = accounts_config(dir.path(), &idp, TERM_ACCOUNTS);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let flags = [
        "--prewarm-concurrency",
        "64",
        "--provider-concurrency",
        "64",
        "--shutdown-grace",
        "5s",
    ];
    let mut problems = Vec::new();
    let mut signals_with_calls_in_flight = 0;
    let started = Instant::now();
    for round in 0..=terms {
        let sc = spawn_with(&cfg, &state, &flags);
        if round % 4 == 3 {
            // During start-up and pre-warm: every account refreshing at once.
            tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        } else {
            assert!(
                wait_ready(&c, sc.addr, Duration::from_secs(20)).await,
                "round {round}: never ready"
            );
            // Pre-warm spent every persisted token: an account lost by the previous stop
            // answers 403 invalid_grant here.
            for (acct, why) in accounts_failing(&c, sc.addr, &idp, TERM_ACCOUNTS).await {
                problems.push(format!("round {round}: {acct}: {why}"));
            }
            if round == terms {
                sc.kill();
                break;
            }
            // Refresh traffic (and some requests) until a random moment.
            let until = Instant::now() + Duration::from_millis(rng.u64(0..2000));
            while Instant::now() < until {
                let url = format!(
                    "http://{}/authentication?account={}&proto=imap",
                    sc.addr,
                    account(rng.usize(0..TERM_ACCOUNTS))
                );
                let _ = c.get(&url).send().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        signals_with_calls_in_flight += usize::from(idp.with(|s| s.inflight) > 0);
        let status = sc.terminate(Duration::from_secs(15)).await;
        if !status.success() {
            problems.push(format!("round {round}: exit {status}"));
        }
        // Every account's token on disk (or the config's, if it never rotated) must be the
        // one the provider accepts now: a rotation answered after the stop began and not
        // written, or sent and not awaited, shows up here.
        match read_state_of(&state, TERM_ACCOUNTS) {
            Err(e) => problems.push(format!("round {round}: {e}")),
            Ok((persisted, _)) => idp.with(|s| {
                let live = s.valid_refresh_tokens.as_ref().unwrap();
                for i in 0..TERM_ACCOUNTS {
                    let tok = persisted
                        .get(&account(i))
                        .cloned()
                        .unwrap_or_else(|| config_token(i));
                    if !live.contains(&tok) {
                        problems.push(format!(
                            "round {round}: {} persisted a token the provider no longer accepts",
                            account(i)
                        ));
                    }
                }
            }),
        }
    }
    let (rotations, reuse) = idp.with(|s| (s.spent.len(), s.reuse_detected));
    eprintln!(
        "sigterm test: {terms} signals in {:?}, {signals_with_calls_in_flight} with provider calls in flight, {rotations} rotations, {} problems",
        started.elapsed(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        problems
    );
    assert_eq!(reuse, 0, "a spent refresh token was sent again");
    assert!(
        signals_with_calls_in_flight >= terms / 2,
        "too few signals landed while calls were in flight ({signals_with_calls_in_flight}) to mean anything"
    );
}
