//! What an operator sees from the real binary: the WARN lines for the two likeliest wiring
//! mistakes (wrong Basic credentials, an account id EmailEngine has but the config does
//! not), the state-dir warning only when a grant can rotate, JSON log lines with the
//! message at the top level, start-up errors and `probe` errors as one line each, and the
//! shipped examples passing `check` as they are.

#[allow(unused_imports)]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ee-auth-sidecar");

/// `serve` as a child process with an empty environment, stderr into a file.
struct Served {
    child: Child,
    stderr: PathBuf,
}

impl Served {
    fn start(dir: &Path, extra: &[&str]) -> Served {
        let stderr = dir.join("serve-stderr.log");
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("binary starts");
        Served { child, stderr }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// The line that says `listening`, once it is there.
    async fn listening_line(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains("listening")) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar exited ({status}) before listening:\n{log}");
            }
            assert!(Instant::now() < deadline, "no `listening` line:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn addr(&mut self) -> SocketAddr {
        let line = self.listening_line().await;
        let at = line.find("127.0.0.1:").expect("loopback address");
        let digits: String = line[at + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        format!("127.0.0.1:{digits}").parse().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with an empty environment.
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .expect("binary runs")
    })
    .await
    .unwrap()
}

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// Waits until `needle` shows up in the log (the WARN is written after the answer).
async fn wait_for(served: &Served, needle: &str) -> String {
    let found = eventually(Duration::from_secs(10), || served.log().contains(needle)).await;
    let log = served.log();
    assert!(found, "no `{needle}` in the log:\n{log}");
    log
}

// ---------------------------------------------------------------------------------------
// The two wiring mistakes: WARN once per cause, naming the account id and the fix

#[tokio::test]
async fn wrong_or_missing_basic_credentials_and_unknown_accounts_log_one_warn_each() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &json!({
            "auth": { "username": "emailengine", "password": "the-right-password" },
            "accounts": { "alice": { "user": "alice@example.com", "pass": "alice-app-password" } }
        }),
    );
    let mut served = Served::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let addr = served.addr().await;
    let c = client();

    // EmailEngine sends the URL's password as written: a percent-encoded one never matches.
    let wrong = "wrong%2Fpassword-XYZZY";
    for _ in 0..5 {
        let a = ask(
            &c,
            addr,
            "account=alice&proto=imap",
            Some(("emailengine", wrong)),
        )
        .await;
        assert_eq!(a.status, 401);
    }
    for _ in 0..3 {
        assert_eq!(ask(&c, addr, "account=alice", None).await.status, 401);
    }
    // The first one logged carries a newline: it must not forge a log line.
    for id in ["Alice%0Aforged-line", "Alice", "Alice", "Alice"] {
        let a = ask(
            &c,
            addr,
            &format!("account={id}&proto=smtp"),
            Some(("emailengine", "the-right-password")),
        )
        .await;
        assert_eq!(a.status, 404);
    }
    let ok = ask(
        &c,
        addr,
        "account=alice",
        Some(("emailengine", "the-right-password")),
    )
    .await;
    assert_eq!(ok.status, 200);

    wait_for(&served, "not in the config").await;
    let log = wait_for(&served, "without Basic credentials").await;
    let wrong_lines = lines_with(&log, "wrong Basic credentials");
    assert_eq!(
        wrong_lines.len(),
        1,
        "one WARN for 5 wrong passwords:\n{log}"
    );
    let line = wrong_lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("alice"), "names the account id: {line}");
    assert!(line.contains("authServer"), "says what to fix: {line}");
    assert!(
        line.contains("percent"),
        "points at the percent-encoding: {line}"
    );

    let missing = lines_with(&log, "without Basic credentials");
    assert_eq!(
        missing.len(),
        1,
        "one WARN for 3 missing credentials:\n{log}"
    );
    assert!(missing[0].contains("WARN") && missing[0].contains("alice"));

    let unknown = lines_with(&log, "not in the config");
    assert_eq!(unknown.len(), 1, "one WARN for 4 unknown ids:\n{log}");
    assert!(unknown[0].contains("WARN") && unknown[0].contains("Alice"));
    assert!(unknown[0].contains("same account id"), "{}", unknown[0]);
    assert!(!log.lines().any(|l| l.starts_with("forged-line")), "{log}");

    use base64::Engine as _;
    let header = base64::engine::general_purpose::STANDARD.encode(format!("emailengine:{wrong}"));
    for secret in ["XYZZY", "the-right-password", "alice-app-password", &header] {
        assert!(
            !log.contains(secret),
            "`{secret}` leaked into the log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The state-dir warning

const LOST: &str = "LOST on restart";

#[tokio::test]
async fn no_state_dir_warning_without_an_account_whose_refresh_token_can_rotate() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let dir = tempfile::tempdir().unwrap();
    let mut served = Served::start(
        dir.path(),
        &["--config", examples.join("accounts.json").to_str().unwrap()],
    );
    served.listening_line().await;
    let log = served.log();
    assert!(!log.contains(LOST), "offline example warned:\n{log}");

    // A client-credentials account has no refresh token either.
    let idp = MockIdp::start().await;
    let config = write_config(
        dir.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": { "app": { "user": "app@example.com", "provider": "idp", "grant": "client_credentials" } }
        }),
    );
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--prewarm-concurrency",
        "0",
    ];
    let mut served = Served::start(dir.path(), &args);
    served.listening_line().await;
    let log = served.log();
    assert!(!log.contains(LOST), "client_credentials warned:\n{log}");

    // A refresh-token account does rotate: the warning is there.
    write_config(
        dir.path(),
        &json!({
            "providers": { "idp": oauth2_provider(&idp) },
            "accounts": { "bob": { "user": "bob@example.com", "provider": "idp", "refreshToken": "rt-bob" } }
        }),
    );
    let mut served = Served::start(dir.path(), &args);
    served.listening_line().await;
    let log = served.log();
    let warned = lines_with(&log, LOST);
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("WARN"), "{log}");
}

// ---------------------------------------------------------------------------------------
// JSON logs

#[tokio::test]
async fn json_log_lines_carry_message_and_fields_at_the_top_level() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let dir = tempfile::tempdir().unwrap();
    let config = examples.join("accounts.json");
    let mut served = Served::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
    );
    let line = served.listening_line().await;
    let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["message"], "listening", "{line}");
    assert!(v.get("fields").is_none(), "nested under `fields`: {line}");
    assert!(
        v["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert_eq!(v["level"], "INFO", "{line}");
    assert!(v["timestamp"].is_string(), "{line}");
}

// ---------------------------------------------------------------------------------------
// Start-up errors and probe errors: one line each

#[tokio::test]
async fn a_start_up_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-config.json");
    for format in ["text", "json"] {
        let out = run(&[
            "serve",
            "--config",
            missing.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            format,
        ])
        .await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The error names the file in its header and in its one detail line; printed
        // once, that is one detail line.
        let mentions = stderr.matches("cannot read config file").count();
        assert_eq!(mentions, 1, "{format}: printed {mentions} times:\n{stderr}");
        assert!(stderr.contains("no-such-config.json"), "{stderr}");
    }
}

#[tokio::test]
async fn probe_errors_are_one_clear_line() {
    // A port nobody listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let out = run(&["probe", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
    assert!(stderr.contains("connection refused"), "{stderr}");
    assert!(!stderr.contains("error sending request"), "{stderr}");

    let out = run(&["probe", "127.0.0.1:8080/readyz"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("builder error"), "{stderr}");
    assert!(
        stderr.contains("http://"),
        "says what a URL looks like: {stderr}"
    );

    // A server that never answers: the timeout is named.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", silent.local_addr().unwrap());
    let out = run(&["probe", &url, "--timeout", "300ms"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// The shipped examples

#[tokio::test]
async fn every_shipped_example_passes_check_as_it_is() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        seen += 1;
        let out = run(&["check", "--config", path.to_str().unwrap()]).await;
        assert!(
            out.status.success(),
            "{}:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(seen >= 4, "examples found: {seen}");
}
