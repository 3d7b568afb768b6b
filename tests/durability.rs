//! Durability of rotated refresh tokens, in process: shutdown starts no upstream call and
//! awaits every call sent; a write that fails (a full disk) keeps the newest token in
//! memory, says so (`/v1/accounts`, `/metrics`) and is retried until it lands, and once
//! more at shutdown; several sidecars may share a state directory, one spender at a time.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ee_auth_sidecar::config::AccountKind;
use serde_json::{json, Value};

/// The refresh token persisted for `account`, if any.
fn persisted(state: &Path, account: &str) -> Option<String> {
    let path = state
        .join("refresh-tokens")
        .join(format!("{}.json", sha256_hex(account)));
    let text = std::fs::read(path).ok()?;
    let v: Value = serde_json::from_slice(&text).ok()?;
    v["refreshToken"].as_str().map(str::to_owned)
}

/// The one live refresh token of a single-account rotating mock.
fn live_token(idp: &MockIdp) -> String {
    idp.with(|s| {
        let v = s.valid_refresh_tokens.as_ref().unwrap();
        assert_eq!(v.len(), 1, "one account, one live token");
        v.iter().next().unwrap().clone()
    })
}

fn rotating_idp_for(idp: &MockIdp, tokens: &[&str]) {
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(tokens.iter().map(|t| t.to_string()).collect());
    });
}

async fn start_on(cfg: &Path, state: &Path) -> Running {
    let mut o = test_options(cfg);
    o.state_dir = Some(state.to_owned());
    // The tests force refreshes back to back to make rotations on demand.
    o.forced_refresh_interval = Duration::ZERO;
    start(o).await.expect("sidecar starts")
}

/// Credentials of the admin API in the persist test's config.
const ADMIN: (&str, &str) = ("admin", "admin-password-1");

async fn force_refresh(c: &reqwest::Client, addr: SocketAddr, id: &str) -> u16 {
    c.post(format!("http://{addr}/v1/accounts/{id}/refresh"))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_the_first_instant_of_shutdown_no_upstream_call_starts_and_every_sent_one_is_awaited()
{
    let idp = MockIdp::start().await;
    let due: Vec<String> = (0..10).map(|i| format!("due{i}")).collect();
    let mut tokens: Vec<String> = due.iter().map(|a| format!("rt-{a}")).collect();
    tokens.extend(["rt-slow".to_owned(), "rt-idle".to_owned()]);
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(tokens.iter().cloned().collect());
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut accounts = serde_json::Map::new();
    for a in due.iter().map(String::as_str).chain(["slow", "idle"]) {
        accounts.insert(
            a.to_owned(),
            json!({ "user": format!("{a}@example.com"), "provider": "idp", "refreshToken": format!("rt-{a}") }),
        );
    }
    let config = |accounts: &serde_json::Map<String, Value>| json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts });
    let cfg = write_config(dir.path(), &config(&accounts));
    let mut o = test_options(&cfg);
    o.state_dir = Some(state.clone());
    o.shutdown_grace = Duration::from_secs(4);
    let sc = start(o).await.unwrap();
    let (addr, sidecar) = (sc.local_addr, sc.sidecar.clone());
    let c = client();

    // One refresh that will still be at the provider when shutdown begins...
    idp.with(|s| s.delay = Duration::from_millis(1500));
    let slow = tokio::spawn({
        let c = c.clone();
        async move { ask(&c, addr, "account=slow&proto=imap", None).await }
    });
    assert!(eventually(Duration::from_secs(10), || idp.with(|s| s.inflight) == 1).await);
    // ...and ten accounts whose background refreshes come due during the grace (2 s
    // tokens are refreshed 0.5-1 s after issue).
    idp.with(|s| {
        s.delay = Duration::ZERO;
        s.lifetime = Some(2.0);
    });
    for a in &due {
        let r = ask(&c, addr, &format!("account={a}&proto=imap"), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let calls_before = idp.calls();

    let began = Instant::now();
    let stopping = tokio::spawn(sc.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Nothing may start a call now: an admin refresh, a reload adding an account...
    let idle_set = match &sidecar.config().account("idle").unwrap().kind {
        AccountKind::OAuth(o) => o.set_for(None).clone(),
        AccountKind::Fixed(_) => unreachable!(),
    };
    let idle = sidecar.cache().entry(&idle_set.key).unwrap();
    assert!(sidecar.cache().force_refresh(&idle).await.is_err());
    accounts.insert(
        "added".into(),
        json!({ "user": "n@example.com", "provider": "idp", "refreshToken": "rt-added" }),
    );
    write_config(dir.path(), &config(&accounts));
    let _ = sidecar.reload().await;
    // ...nor a request that misses the cache.
    assert!(sidecar.cache().get(&idle).await.is_err());

    let _ = stopping.await.unwrap();
    let took = began.elapsed();
    let r = slow.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the call sent before shutdown was answered: {}",
        r.body
    );
    assert!(
        took >= Duration::from_millis(1200),
        "shutdown waited for the call at the provider ({took:?})"
    );
    // And the rotation it brought is on disk.
    let live_slow = idp.with(|s| s.last_superseded["rt-slow"].1.clone());
    assert_eq!(
        persisted(&state, "slow").as_deref(),
        Some(live_slow.as_str())
    );

    // The due refreshes never went out, during the grace or after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late: Vec<String> = idp
        .requests()
        .iter()
        .skip(calls_before as usize)
        .map(|r| r.form.get("refresh_token").cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        late,
        Vec::<String>::new(),
        "upstream calls started after shutdown began"
    );
}

// ---------------------------------------------------------------------------------------
// A rotated token whose write fails

/// Makes writes under a state directory fail with ENOSPC, as a full volume does: a tiny
/// tmpfs filled up when mounting is permitted (root), otherwise the account's temp file
/// pointed at /dev/full (writes to it fail with ENOSPC).
struct FullDisk {
    state: PathBuf,
    account: String,
    tmpfs: bool,
}

impl FullDisk {
    /// Prepares `state` (before the sidecar creates it).
    fn new(state: &Path, account: &str) -> FullDisk {
        std::fs::create_dir_all(state).unwrap();
        let tmpfs = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(state)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        eprintln!(
            "full disk by {}",
            if tmpfs { "a filled tmpfs" } else { "/dev/full" }
        );
        FullDisk {
            state: state.to_owned(),
            account: account.to_owned(),
            tmpfs,
        }
    }

    fn fill(&self) {
        if self.tmpfs {
            let filler = self.state.join("filler");
            let mut f = std::fs::File::create(&filler).unwrap();
            use std::io::Write;
            let block = vec![0u8; 4096];
            while f.write_all(&block).is_ok() {}
        } else {
            let tmp = self
                .state
                .join("refresh-tokens")
                .join(format!("{}.json.tmp", sha256_hex(&self.account)));
            std::os::unix::fs::symlink("/dev/full", tmp).unwrap();
        }
    }

    /// Makes the token directory read-only: a read-only bind mount over it (the volume
    /// itself cannot be remounted while the lock file is open for writing). False when
    /// mounting is not permitted.
    fn read_only(&self) -> bool {
        let tokens = self.state.join("refresh-tokens");
        if !(self.tmpfs
            && run(
                "mount",
                &["--bind".as_ref(), tokens.as_ref(), tokens.as_ref()],
            ))
        {
            return false;
        }
        assert!(run(
            "mount",
            &["-o".as_ref(), "remount,bind,ro".as_ref(), tokens.as_ref()]
        ));
        true
    }

    fn writable_again(&self) {
        assert!(run("umount", &[self.state.join("refresh-tokens").as_ref()]));
    }

    fn free(&self) {
        if self.tmpfs {
            std::fs::remove_file(self.state.join("filler")).unwrap();
        } else {
            let tmp = self
                .state
                .join("refresh-tokens")
                .join(format!("{}.json.tmp", sha256_hex(&self.account)));
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> bool {
    Command::new(cmd)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(&self.state).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_that_cannot_be_written_is_kept_used_reported_and_written_later() {
    let idp = MockIdp::start().await;
    rotating_idp_for(&idp, &["rt-0"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk = FullDisk::new(&state, "a");
    let cfg = write_config(
        dir.path(),
        &json!({ "adminAuth": { "username": ADMIN.0, "password": ADMIN.1 }, "providers": { "idp": oauth2_provider(&idp) }, "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-0" } } }),
    );
    let sc = start_on(&cfg, &state).await;
    let (c, addr) = (client(), sc.local_addr);
    assert_eq!(
        ask(&c, addr, "account=a&proto=imap", None).await.status,
        200
    );
    assert_eq!(persisted(&state, "a"), Some(live_token(&idp)));
    assert_eq!(
        scraped(&c, addr, "ee_auth_state_unpersisted_accounts").await,
        Some(0.0)
    );

    // The volume fills up; the next rotation cannot be written.
    disk.fill();
    assert_eq!(
        force_refresh(&c, addr, "a").await,
        200,
        "the fresh token is served"
    );
    let v = admin_account(&c, addr, "a", ADMIN).await;
    let error = v["persist"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no persist error: {v}"));
    assert!(
        error.contains("No space left on device"),
        "the OS reason: {error}"
    );
    assert_eq!(v["persist"]["state"], "memory_only", "{v}");
    assert_eq!(
        scraped(&c, addr, "ee_auth_state_unpersisted_accounts").await,
        Some(1.0)
    );
    let listed: Value = c
        .get(format!("http://{addr}/v1/accounts"))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["accounts"][0]["persist"]["state"], "memory_only",
        "{listed}"
    );
    let newest = live_token(&idp);
    assert_ne!(persisted(&state, "a").as_deref(), Some(newest.as_str()));

    // The newest token, in memory only, is the one spent next.
    assert_eq!(force_refresh(&c, addr, "a").await, 200);
    assert_eq!(idp.requests().last().unwrap().form["refresh_token"], newest);
    assert_eq!(idp.with(|s| s.reuse_detected), 0);

    // The write is retried (and fails while the disk is full)...
    let failed_writes = |v: &Value| v["persist"]["failedWrites"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed_writes(&admin_account(&c, addr, "a", ADMIN).await) < 3 {
        assert!(Instant::now() < deadline, "no retried write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...until the disk has room again: then it lands, and the account is clean.
    disk.free();
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin_account(&c, addr, "a", ADMIN)
        .await
        .get("persist")
        .is_some()
    {
        assert!(Instant::now() < deadline, "the retried write never landed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(persisted(&state, "a"), Some(live_token(&idp)));
    assert_eq!(
        scraped(&c, addr, "ee_auth_state_unpersisted_accounts").await,
        Some(0.0)
    );

    // A volume gone read-only is the same story, with its own reason (tmpfs only).
    if disk.read_only() {
        assert_eq!(force_refresh(&c, addr, "a").await, 200);
        let v = admin_account(&c, addr, "a", ADMIN).await;
        let error = v["persist"]["error"].as_str().unwrap_or_default();
        assert!(error.contains("Read-only file system"), "{v}");
        disk.writable_again();
        let deadline = Instant::now() + Duration::from_secs(15);
        while admin_account(&c, addr, "a", ADMIN)
            .await
            .get("persist")
            .is_some()
        {
            assert!(Instant::now() < deadline, "the retried write never landed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(persisted(&state, "a"), Some(live_token(&idp)));
    }

    // Full again; room comes back just before a shutdown, between two retries: the
    // shutdown's own last attempt writes it.
    disk.fill();
    assert_eq!(force_refresh(&c, addr, "a").await, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed_writes(&admin_account(&c, addr, "a", ADMIN).await) < 2 {
        assert!(Instant::now() < deadline, "no retried write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    disk.free();
    sc.shutdown().await;
    assert_eq!(
        persisted(&state, "a"),
        Some(live_token(&idp)),
        "written at shutdown"
    );

    // A restart spends exactly that token.
    let sc = start_on(&cfg, &state).await;
    let r = ask(&client(), sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    sc.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Several processes on one state directory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_share_a_state_directory_and_never_spend_one_refresh_token_twice() {
    let idp = MockIdp::start().await;
    // Strict rotation: every use rotates, any reuse is detected (no grace).
    rotating_idp_for(&idp, &["rt-0"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = write_config(
        dir.path(),
        &json!({ "providers": { "idp": oauth2_provider(&idp) },
            "adminAuth": { "username": ADMIN.0, "password": ADMIN.1 },
            "accounts": {
            "a": { "user": "a@example.com", "provider": "idp", "refreshToken": "rt-0" } } }),
    );
    let first = start_on(&cfg, &state).await;
    let second = start_on(&cfg, &state).await;
    let c = client();
    // Forced refreshes on both at once, over and over: each must spend the token the
    // other one stored last.
    for _ in 0..10 {
        let (x, y) = tokio::join!(
            force_refresh(&c, first.local_addr, "a"),
            force_refresh(&c, second.local_addr, "a")
        );
        assert!(x < 300 && y < 300, "{x} {y}");
    }
    assert_eq!(
        idp.with(|s| s.reuse_detected),
        0,
        "a superseded token was spent"
    );
    assert!(idp.with(|s| s.calls_by_grant["refresh_token"]) >= 10);
    assert_eq!(persisted(&state, "a"), Some(live_token(&idp)));
    for sc in [first, second] {
        let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        sc.shutdown().await;
    }
}
