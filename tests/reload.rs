//! Hot reload, end to end (issue 4): real files laid out and swapped the way the kubelet
//! does, the real `notify` watcher, the real sidecar and the real mock identity provider.
//!
//! Every sidecar here keeps `reload_interval` at 3600 s (from `test_options`), so what is
//! proven is the watcher — except `the_periodic_re_read_alone_picks_up_a_change_the_watcher_cannot_see`,
//! which proves the backstop.

mod common;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use serde_json::{json, Value};

/// A directory laid out and updated exactly as the kubelet does for Secret and ConfigMap
/// volumes: the files live in `..<timestamp>/`, `..data` is a symlink to that directory,
/// and each visible file is a symlink to `..data/<name>`. An update writes a new
/// timestamped directory, points `..data_tmp` at it, renames `..data_tmp` over `..data`
/// (the one atomic step) and deletes the old directory.
struct KubeVolume {
    dir: PathBuf,
    current: Option<PathBuf>,
    seq: u32,
}

impl KubeVolume {
    fn new(dir: &Path, files: &[(&str, Vec<u8>)]) -> KubeVolume {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = KubeVolume {
            dir: dir.to_owned(),
            current: None,
            seq: 0,
        };
        v.update(files);
        v
    }

    /// The path a pod reads (`<dir>/<name>`, a symlink into `..data`).
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        self.seq += 1;
        let ts = format!(
            "..2026_11_27_12_{:02}_{:02}.{:09}",
            self.seq / 60 % 60,
            self.seq % 60,
            self.seq
        );
        let new_dir = self.dir.join(&ts);
        std::fs::create_dir(&new_dir).unwrap();
        for (name, content) in files {
            std::fs::write(new_dir.join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (name, _) in files {
            let visible = self.dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &visible).unwrap();
            }
        }
        if let Some(old) = self.current.replace(new_dir) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}

/// A config with the mock as provider `idp` and the given accounts, as file bytes.
/// The map with the mock as provider `idp`; `adminAuth` (ops:ops-pw) opens the admin API.
fn config(idp: &MockIdp, accounts: Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "adminAuth": { "username": "ops", "password": "ops-pw" },
        "providers": { "idp": oauth2_provider(idp) },
        "accounts": accounts
    }))
    .unwrap()
}

fn oauth(user: &str, rt: &str) -> Value {
    json!({ "user": user, "provider": "idp", "refreshToken": rt })
}

/// A Kubernetes-style ConfigMap volume holding `accounts.json`.
fn kube_config(root: &Path, content: Vec<u8>) -> KubeVolume {
    KubeVolume::new(&root.join("config"), &[("accounts.json", content)])
}

const RELOADS_OK: &str = r#"ee_auth_config_reloads_total{outcome="ok"}"#;
const RELOADS_FAILED: &str = r#"ee_auth_config_reloads_total{outcome="failed"}"#;

/// Upstream calls that spent refresh token `rt`.
fn rt_calls(idp: &MockIdp, rt: &str) -> usize {
    idp.requests()
        .iter()
        .filter(|r| r.form.get("refresh_token").map(String::as_str) == Some(rt))
        .count()
}

/// Waits until the sidecar runs a config other than the one with `before` fingerprint.
async fn swapped(sc: &Running, before: [u8; 32], within: Duration) -> bool {
    eventually(within, || sc.sidecar.config().fingerprint != before).await
}

/// Polls the token endpoint until `cond` holds for the answer; returns how long it took.
async fn until_answer(
    c: &reqwest::Client,
    sc: &Running,
    query: &str,
    within: Duration,
    cond: impl Fn(&Answer) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if cond(&ask(c, sc.local_addr, query, None).await) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn pass_is(expected: impl Into<String>) -> impl Fn(&Answer) -> bool {
    let expected = expected.into();
    move |a| a.status == 200 && a.body["pass"] == expected.as_str()
}

#[tokio::test]
async fn a_kubelet_swap_is_served_within_two_seconds_every_time() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let mut vol = kube_config(
        root.path(),
        config(&idp, json!({ "pw": { "user": "u", "pass": "v0" } })),
    );
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    assert!(pass_is("v0")(
        &ask(&c, sc.local_addr, "account=pw", None).await
    ));

    // Several swaps in a row: a watch that went deaf after the first (a watch on the
    // file, or on the first timestamped directory) fails the second.
    for i in 1..=4 {
        let expected = format!("v{i}");
        vol.update(&[(
            "accounts.json",
            config(
                &idp,
                json!({ "pw": { "user": "u", "pass": &expected }, format!("new{i}"): { "user": "n", "pass": "x" } }),
            ),
        )]);
        let took = until_answer(
            &c,
            &sc,
            "account=pw",
            Duration::from_secs(2),
            pass_is(expected),
        )
        .await;
        assert!(took.is_some(), "swap {i} was not served within 2 s");
        assert_eq!(
            ask(&c, sc.local_addr, &format!("account=new{i}"), None)
                .await
                .status,
            200
        );
    }
    assert_eq!(metric(&c, sc.local_addr, RELOADS_FAILED).await, 0.0);
    // Start-up counts as one successful load, each swap as one more.
    assert_eq!(metric(&c, sc.local_addr, RELOADS_OK).await, 5.0);
    sc.shutdown().await;
}

#[tokio::test]
async fn edit_in_place_rename_over_and_delete_recreate_all_reload() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accounts.json");
    let cfg = |pass: &str| config(&idp, json!({ "pw": { "user": "u", "pass": pass } }));
    std::fs::write(&path, cfg("initial")).unwrap();
    let sc = start(test_options(&path)).await.unwrap();
    let c = client();
    let within = Duration::from_secs(5);

    // Edit in place: same inode, truncated and rewritten.
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&path);
    std::fs::write(&path, cfg("edited")).unwrap();
    assert_eq!(inode(&path), before, "the edit kept the inode");
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("edited"))
            .await
            .is_some(),
        "edit in place"
    );

    // Write to a temp file, rename it over (what editors and `kubectl cp` tools do).
    let tmp = dir.path().join(".accounts.json.swp");
    std::fs::write(&tmp, cfg("renamed")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("renamed"))
            .await
            .is_some(),
        "rename over"
    );

    // Delete, then recreate.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, cfg("recreated")).unwrap();
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("recreated"))
            .await
            .is_some(),
        "delete + recreate"
    );

    // Delete, wait long enough for the watcher to see the file gone, then recreate: the
    // missing file is reported and the old map keeps serving in between.
    std::fs::remove_file(&path).unwrap();
    assert!(
        eventually(within, || sc.sidecar.reload_status().last_error.is_some()).await,
        "a missing config file is reported"
    );
    assert!(pass_is("recreated")(
        &ask(&c, sc.local_addr, "account=pw", None).await
    ));
    std::fs::write(&path, cfg("again")).unwrap();
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("again"))
            .await
            .is_some(),
        "recreate after a noticed delete"
    );
    assert!(sc.sidecar.reload_status().last_error.is_none());
    sc.shutdown().await;
}

#[tokio::test]
async fn a_config_that_is_a_symlink_to_another_directory_reloads() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let (mount, real) = (root.path().join("mount"), root.path().join("real"));
    std::fs::create_dir_all(&mount).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    let target = real.join("accounts.json");
    let cfg = |pass: &str| config(&idp, json!({ "pw": { "user": "u", "pass": pass } }));
    std::fs::write(&target, cfg("one")).unwrap();
    let link = mount.join("accounts.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let sc = start(test_options(&link)).await.unwrap();
    let c = client();
    let within = Duration::from_secs(5);

    // Nothing happens in the link's directory: only the target's directory sees these.
    std::fs::write(&target, cfg("two")).unwrap();
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("two"))
            .await
            .is_some(),
        "edit of the symlink's target"
    );
    let tmp = real.join("accounts.json.tmp");
    std::fs::write(&tmp, cfg("three")).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
    assert!(
        until_answer(&c, &sc, "account=pw", within, pass_is("three"))
            .await
            .is_some(),
        "rename over the symlink's target"
    );
    sc.shutdown().await;
}

/// Waits until `/v1/accounts` reports a config error containing `needle`; returns it.
async fn reported_error(c: &reqwest::Client, sc: &Running, needle: &str) -> Option<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let v: Value = c
            .get(format!("http://{}/v1/accounts", sc.local_addr))
            .basic_auth("ops", Some("ops-pw"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(errors) = v["config"]["lastError"].as_array() {
            let errors: Vec<String> = errors
                .iter()
                .map(|e| e.as_str().unwrap().to_owned())
                .collect();
            if errors.iter().any(|e| e.contains(needle)) {
                return Some(errors);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn an_invalid_config_keeps_the_old_map_and_is_reported_once() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let good_accounts = json!({
        "a": oauth("a@example.com", "rt-a-secret-value"),
        "b": { "user": "b", "pass": "b-pass" }
    });
    let good = config(&idp, good_accounts.clone());
    let mut vol = kube_config(root.path(), good.clone());
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let token = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
    assert_eq!(token.status, 200);
    let token = token.token().to_owned();
    let fingerprint = sc.sidecar.config().fingerprint;
    let calls = idp.calls();

    let mut unknown_provider = good_accounts.clone();
    unknown_provider["a"]["provider"] = json!("no-such-idp");
    unknown_provider["new"] = json!({ "user": "n", "pass": "x" });
    let mut missing_secret = good_accounts.clone();
    missing_secret["b"] = json!({ "user": "b", "provider": "idp",
        "refreshToken": { "file": secrets.join("b-refresh-token") } });
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // A write cut off half way: not JSON.
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "(file): not valid JSON",
        ),
        (
            "unknown provider",
            config(&idp, unknown_provider),
            "accounts.a.provider",
        ),
        (
            "missing secret file",
            config(&idp, missing_secret),
            "accounts.b.refreshToken",
        ),
    ];
    for (n, (what, content, field)) in cases.into_iter().enumerate() {
        vol.update(&[("accounts.json", content)]);
        let errors = reported_error(&c, &sc, field)
            .await
            .unwrap_or_else(|| panic!("{what}: not reported in /v1/accounts"));
        let joined = errors.join("\n");
        assert!(!joined.contains("rt-a-secret-value"), "{what}: {joined}");
        if what == "missing secret file" {
            assert!(
                joined.contains("b-refresh-token"),
                "names the file: {joined}"
            );
        }
        let status = sc.sidecar.reload_status();
        assert_eq!(status.last_error.as_deref(), Some(&errors[..]), "{what}");
        assert!(status.last_error_at.is_some());

        // The old map serves on, untouched: same token, no upstream call, nothing new.
        assert_eq!(sc.sidecar.config().fingerprint, fingerprint, "{what}");
        let r = ask(&c, sc.local_addr, "account=a&proto=imap", None).await;
        assert_eq!((r.status, r.token()), (200, token.as_str()), "{what}");
        assert_eq!(
            ask(&c, sc.local_addr, "account=b", None).await.body["pass"],
            "b-pass",
            "{what}"
        );
        assert_eq!(
            ask(&c, sc.local_addr, "account=new", None).await.status,
            404,
            "{what}: nothing of an invalid map is used"
        );
        assert_eq!(idp.calls(), calls, "{what}");

        // Counted once, however often the same broken file is looked at again.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            metric(&c, sc.local_addr, RELOADS_FAILED).await,
            (n + 1) as f64,
            "{what}: one failed reload"
        );
    }

    // Putting the running config back clears the error (nothing else to do).
    vol.update(&[("accounts.json", good.clone())]);
    assert!(
        eventually(Duration::from_secs(5), || sc
            .sidecar
            .reload_status()
            .last_error
            .is_none())
        .await,
        "the error is cleared when the file is valid again"
    );
    assert_eq!(
        metric(&c, sc.local_addr, RELOADS_OK).await,
        1.0,
        "no swap happened"
    );

    // And a valid change after all that is applied.
    let mut fixed = good_accounts.clone();
    fixed["b"]["pass"] = json!("b-pass-2");
    vol.update(&[("accounts.json", config(&idp, fixed))]);
    assert!(swapped(&sc, fingerprint, Duration::from_secs(5)).await);
    assert_eq!(
        ask(&c, sc.local_addr, "account=b", None).await.body["pass"],
        "b-pass-2"
    );
    assert_eq!(metric(&c, sc.local_addr, RELOADS_OK).await, 2.0);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_write_caught_half_way_is_never_used_and_the_finished_file_is() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accounts.json");
    std::fs::write(
        &path,
        config(&idp, json!({ "b": { "user": "b", "pass": "old" } })),
    )
    .unwrap();
    let sc = start(test_options(&path)).await.unwrap();
    let c = client();

    let new = config(
        &idp,
        json!({ "b": { "user": "b", "pass": "new" }, "c": { "user": "c", "pass": "c" } }),
    );
    // A slow writer: half the file, a pause longer than the debounce, the rest.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(&new[..new.len() / 2]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || sc
            .sidecar
            .reload_status()
            .last_error
            .is_some())
        .await,
        "the half-written file was read and refused"
    );
    assert_eq!(
        ask(&c, sc.local_addr, "account=b", None).await.body["pass"],
        "old"
    );
    assert_eq!(ask(&c, sc.local_addr, "account=c", None).await.status, 404);
    f.write_all(&new[new.len() / 2..]).unwrap();
    drop(f);
    assert!(
        until_answer(&c, &sc, "account=b", Duration::from_secs(5), pass_is("new"))
            .await
            .is_some()
    );
    assert_eq!(ask(&c, sc.local_addr, "account=c", None).await.status, 200);
    assert!(sc.sidecar.reload_status().last_error.is_none());
    sc.shutdown().await;
}

#[tokio::test]
async fn a_hundred_rapid_updates_end_on_the_last_one() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let cfg = |i: usize| {
        config(
            &idp,
            json!({ "pw": { "user": "u", "pass": format!("v{i}") }, format!("only{i}"): { "user": "o", "pass": "x" } }),
        )
    };
    let mut vol = kube_config(root.path(), cfg(0));
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    for i in 1..=100 {
        vol.update(&[("accounts.json", cfg(i))]);
    }
    assert!(
        until_answer(
            &c,
            &sc,
            "account=pw",
            Duration::from_secs(5),
            pass_is("v100")
        )
        .await
        .is_some(),
        "the last update is the one served"
    );
    // And it stays that way: no straggling reload of an older version lands after it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(pass_is("v100")(
        &ask(&c, sc.local_addr, "account=pw", None).await
    ));
    assert_eq!(
        ask(&c, sc.local_addr, "account=only99", None).await.status,
        404
    );
    assert_eq!(
        ask(&c, sc.local_addr, "account=only100", None).await.status,
        200
    );
    assert_eq!(metric(&c, sc.local_addr, RELOADS_FAILED).await, 0.0);
    // Debounced: a burst is a handful of reloads, not one per update.
    let reloads = metric(&c, sc.local_addr, RELOADS_OK).await - 1.0;
    assert!(
        (1.0..=10.0).contains(&reloads),
        "{reloads} reloads for one burst of 100 updates"
    );
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_account_keeps_its_token_through_reloads_under_load() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let providers = |other_secret: &str| {
        json!({
            "idp": oauth2_provider(&idp),
            "idp2": { "type": "oauth2", "tokenUrl": idp.url("/token"), "clientId": "client-2", "clientSecret": other_secret }
        })
    };
    let steady = oauth("steady@example.com", "rt-steady");
    let version = |other_rt: &str, other_secret: &str, extra: bool, pretty: bool| {
        let mut accounts = json!({
            "steady": steady.clone(),
            "other": oauth("other@example.com", other_rt),
            "other2": { "user": "o2@example.com", "provider": "idp2", "refreshToken": "rt-other2" },
            "pw": { "user": "p", "pass": "p" }
        });
        if extra {
            accounts["extra"] = json!({ "user": "e", "pass": "e" });
        }
        let v = json!({ "providers": providers(other_secret), "accounts": accounts });
        if pretty {
            serde_json::to_vec_pretty(&v).unwrap()
        } else {
            serde_json::to_vec(&v).unwrap()
        }
    };
    let mut vol = kube_config(root.path(), version("rt-other-1", "secret-2a", false, true));
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let first = ask(&c, sc.local_addr, "account=steady&proto=imap", None).await;
    let token = first.token().to_owned();
    for q in ["account=other", "account=other2"] {
        assert_eq!(ask(&c, sc.local_addr, q, None).await.status, 200);
    }
    assert_eq!(rt_calls(&idp, "rt-steady"), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = {
        let (stop, c, addr) = (stop.clone(), c.clone(), sc.local_addr);
        tokio::spawn(async move {
            let mut answers: Vec<(u16, String)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let q = if answers.len().is_multiple_of(2) {
                    "account=steady&proto=imap"
                } else {
                    "account=steady"
                };
                match c
                    .get(format!("http://{addr}/authentication?{q}"))
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        answers.push((
                            status,
                            body["accessToken"].as_str().unwrap_or("").to_owned(),
                        ));
                    }
                    Err(e) => answers.push((0, e.to_string())),
                }
            }
            answers
        })
    };

    let steps: Vec<(&str, Vec<u8>)> = vec![
        (
            "add an account",
            version("rt-other-1", "secret-2a", true, true),
        ),
        (
            "re-consent another account",
            version("rt-other-2", "secret-2a", true, true),
        ),
        (
            "rotate another provider's client secret",
            version("rt-other-2", "secret-2b", true, true),
        ),
        (
            "remove an account",
            version("rt-other-2", "secret-2b", false, true),
        ),
        (
            "reformat the file",
            version("rt-other-2", "secret-2b", false, false),
        ),
    ];
    for (what, content) in steps {
        let before = sc.sidecar.config().fingerprint;
        vol.update(&[("accounts.json", content)]);
        assert!(
            swapped(&sc, before, Duration::from_secs(5)).await,
            "{what}: not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The changed accounts were refetched in the background, with their new credentials.
    assert!(
        eventually(Duration::from_secs(5), || rt_calls(&idp, "rt-other-2") == 1).await,
        "the re-consented account is refetched once"
    );
    assert!(
        eventually(Duration::from_secs(5), || idp.requests().iter().any(|r| r
            .form
            .get("client_secret")
            .map(String::as_str)
            == Some("secret-2b")))
        .await,
        "the account on the provider whose secret changed is refetched with the new secret"
    );
    stop.store(true, Ordering::Relaxed);
    let answers = requests.await.unwrap();
    assert!(
        answers.len() >= 20,
        "only {} requests ran during the reloads",
        answers.len()
    );
    let bad: Vec<_> = answers
        .iter()
        .filter(|(s, t)| *s != 200 || *t != token)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} answers were not 200 with the unchanged token, e.g. {:?}",
        bad.len(),
        answers.len(),
        bad.first()
    );
    assert_eq!(
        rt_calls(&idp, "rt-steady"),
        1,
        "the unchanged account caused no upstream call"
    );
    assert_eq!(metric(&c, sc.local_addr, RELOADS_OK).await, 6.0);
    assert_eq!(metric(&c, sc.local_addr, RELOADS_FAILED).await, 0.0);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_removed_account_gets_404_and_is_forgotten() {
    let idp = MockIdp::start().await;
    // Short tokens: a key that was not really forgotten would keep being refreshed.
    idp.set_lifetime(Some(2.0));
    let root = tempfile::tempdir().unwrap();
    let mut vol = kube_config(
        root.path(),
        config(
            &idp,
            json!({ "keep": oauth("k", "rt-keep"), "gone": oauth("g", "rt-gone"), "pw": { "user": "p", "pass": "p" } }),
        ),
    );
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    for q in ["account=keep", "account=gone", "account=gone&proto=api"] {
        assert_eq!(ask(&c, sc.local_addr, q, None).await.status, 200, "{q}");
    }
    vol.update(&[(
        "accounts.json",
        config(&idp, json!({ "keep": oauth("k", "rt-keep") })),
    )]);
    assert!(
        until_answer(&c, &sc, "account=gone", Duration::from_secs(2), |a| a
            .status
            == 404)
        .await
        .is_some(),
        "the removed account is answered 404"
    );
    for q in [
        "account=gone&proto=imap",
        "account=gone&proto=api",
        "account=pw",
    ] {
        assert_eq!(ask(&c, sc.local_addr, q, None).await.status, 404, "{q}");
    }
    // A request that read the old map just before the swap may reach the cache after the
    // diff and track the key again; the sidecar removes such keys once more a second
    // later (`Sidecar::apply_diff`; one record per key, issue #14, will close this).
    assert!(
        eventually(Duration::from_secs(3), || sc
            .sidecar
            .cache()
            .keys()
            .iter()
            .all(|k| &*k.account != "gone"))
        .await,
        "its cache entries are evicted"
    );
    let v: Value = c
        .get(format!("http://{}/v1/accounts", sc.local_addr))
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["keep"]);
    // Its background refresh stopped: over several token lifetimes, the kept account
    // is refreshed and the removed one is never asked for again.
    let (keep_before, gone_before) = (rt_calls(&idp, "rt-keep"), rt_calls(&idp, "rt-gone"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rt_calls(&idp, "rt-keep") > keep_before,
        "the control refreshes"
    );
    assert_eq!(rt_calls(&idp, "rt-gone"), gone_before);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_re_consented_refresh_token_is_used_for_the_next_refresh() {
    let idp = MockIdp::start().await;
    // A rotating provider: the config's token is spent on the first refresh and a
    // rotated one persisted; the re-consented token must still win over that.
    idp.with(|s| {
        s.rotate = true;
        s.valid_refresh_tokens = Some(["rt-old".to_owned(), "rt-new".to_owned()].into());
    });
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let mut vol = kube_config(
        root.path(),
        config(&idp, json!({ "a": oauth("a", "rt-old") })),
    );
    let mut o = test_options(&vol.path("accounts.json"));
    o.state_dir = Some(state);
    let sc = start(o).await.unwrap();
    let c = client();
    let old = ask(&c, sc.local_addr, "account=a", None).await;
    let old = old.token().to_owned();
    assert_eq!(rt_calls(&idp, "rt-old"), 1);

    // The next fetch is slow, so requests arriving right after the swap meet it in flight.
    idp.with(|s| s.delay = Duration::from_millis(500));
    let before = sc.sidecar.config().fingerprint;
    let changed_at = Instant::now();
    vol.update(&[(
        "accounts.json",
        config(&idp, json!({ "a": oauth("a", "rt-new") })),
    )]);
    assert!(swapped(&sc, before, Duration::from_secs(5)).await);
    let answers =
        futures_util::future::join_all((0..20).map(|_| ask(&c, sc.local_addr, "account=a", None)))
            .await;
    let new = answers[0].token().to_owned();
    for a in &answers {
        assert_eq!((a.status, a.token()), (200, new.as_str()));
    }
    assert_ne!(new, old, "the token of the old credentials was dropped");
    idp.check_valid(&new).unwrap();
    let spent_new: Vec<_> = idp
        .requests()
        .into_iter()
        .filter(|r| r.form.get("refresh_token").map(String::as_str) == Some("rt-new"))
        .collect();
    assert_eq!(
        spent_new.len(),
        1,
        "one fetch with the new token, joined by all"
    );
    assert!(spent_new[0].at > changed_at);
    assert_eq!(
        rt_calls(&idp, "rt-old"),
        1,
        "the old chain was not used again"
    );
    assert_eq!(idp.with(|s| s.reuse_detected), 0);

    // The chain now continues from the re-consented token's rotation.
    idp.with(|s| s.delay = Duration::ZERO);
    let r = c
        .post(format!("http://{}/v1/accounts/a/refresh", sc.local_addr))
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let last = idp.requests().last().unwrap().form["refresh_token"].clone();
    assert!(last.starts_with("rt-"), "{last}");
    assert!(
        last != "rt-new" && last != "rt-old",
        "spent the rotated token {last}"
    );
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_changed_refresh_token_is_fetched_in_the_background_before_anyone_asks() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let mut vol = kube_config(
        root.path(),
        config(&idp, json!({ "a": oauth("a", "rt-1") })),
    );
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let old = ask(&c, sc.local_addr, "account=a", None)
        .await
        .token()
        .to_owned();
    let changed_at = Instant::now();
    vol.update(&[(
        "accounts.json",
        config(&idp, json!({ "a": oauth("a", "rt-2") })),
    )]);
    assert!(
        eventually(Duration::from_secs(5), || rt_calls(&idp, "rt-2") == 1).await,
        "refetched in the background"
    );
    // Let the background fetch land, then the request is a plain hit on the new token.
    assert!(
        eventually(Duration::from_secs(5), || sc
            .sidecar
            .cache()
            .status()
            .iter()
            .all(|s| s.state == "ok"))
        .await
    );
    let r = ask(&c, sc.local_addr, "account=a", None).await;
    assert_ne!(r.token(), old);
    idp.check_valid(r.token()).unwrap();
    let issued_after = idp.requests().iter().filter(|q| q.at > changed_at).count();
    assert_eq!(issued_after, 1, "one upstream call since the change");
    assert_eq!(rt_calls(&idp, "rt-1"), 1);
    sc.shutdown().await;
}

#[tokio::test]
async fn added_accounts_are_fetched_in_the_background_with_bounded_concurrency() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let mut vol = kube_config(
        root.path(),
        config(&idp, json!({ "a": oauth("a", "rt-a") })),
    );
    let mut o = test_options(&vol.path("accounts.json"));
    o.prewarm_concurrency = 3;
    let sc = start(o).await.unwrap();
    let c = client();
    assert!(eventually(Duration::from_secs(5), || sc.sidecar.is_ready()).await);
    assert!(eventually(Duration::from_secs(5), || idp.calls() == 1).await);
    idp.with(|s| s.delay = Duration::from_millis(150));

    let mut accounts = json!({ "a": oauth("a", "rt-a") });
    for i in 0..12 {
        accounts[format!("n{i}")] = oauth(&format!("n{i}"), &format!("rt-n{i}"));
    }
    vol.update(&[("accounts.json", config(&idp, accounts))]);
    assert!(
        eventually(Duration::from_secs(10), || idp.calls() == 13).await,
        "every added account fetched without a request: {} calls",
        idp.calls()
    );
    let peak = idp.with(|s| s.peak_inflight);
    assert!(
        (2..=3).contains(&peak),
        "warming ran {peak} fetches at once (bound is 3)"
    );
    assert!(
        eventually(Duration::from_secs(5), || sc
            .sidecar
            .cache()
            .status()
            .iter()
            .all(|s| s.state == "ok"))
        .await
    );
    for i in 0..12 {
        let r = ask(&c, sc.local_addr, &format!("account=n{i}"), None).await;
        assert_eq!(r.status, 200);
        idp.check_valid(r.token()).unwrap();
    }
    assert_eq!(idp.calls(), 13, "the first requests were hits");
    sc.shutdown().await;
}

#[tokio::test]
async fn changed_scopes_drop_the_old_token() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let with_scopes = |s: &[&str]| {
        config(
            &idp,
            json!({ "a": { "user": "a", "provider": "idp", "refreshToken": "rt", "scopes": s } }),
        )
    };
    let mut vol = kube_config(root.path(), with_scopes(&["mail.read"]));
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let old = ask(&c, sc.local_addr, "account=a", None)
        .await
        .token()
        .to_owned();
    let before = sc.sidecar.config().fingerprint;
    vol.update(&[("accounts.json", with_scopes(&["mail.read", "mail.send"]))]);
    assert!(swapped(&sc, before, Duration::from_secs(5)).await);
    let r = ask(&c, sc.local_addr, "account=a", None).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.token(), old);
    let last = idp.requests().last().unwrap().form.clone();
    assert_eq!(last["scope"], "mail.read mail.send");
    assert!(
        eventually(Duration::from_secs(2), || sc
            .sidecar
            .cache()
            .keys()
            .iter()
            .all(|k| k.set.ends_with("|mail.read mail.send")))
        .await,
        "the old scopes' entry is gone: {:?}",
        sc.sidecar.cache().keys()
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn a_rotated_secret_file_triggers_a_reload() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    // A Secret volume in its own directory, next to the ConfigMap volume.
    let mut secret = KubeVolume::new(
        &root.path().join("secret"),
        &[
            ("refresh-token", b"rt-file-1\n".to_vec()),
            ("client-secret", b"cs-1".to_vec()),
        ],
    );
    let cfg = json!({
        "providers": { "idp": { "type": "oauth2", "tokenUrl": idp.url("/token"), "clientId": "c",
            "clientSecret": { "file": secret.path("client-secret") } } },
        "accounts": { "a": { "user": "a", "provider": "idp",
            "refreshToken": { "file": secret.path("refresh-token") } } }
    });
    let vol = kube_config(root.path(), serde_json::to_vec_pretty(&cfg).unwrap());
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let first = ask(&c, sc.local_addr, "account=a", None)
        .await
        .token()
        .to_owned();
    assert_eq!(rt_calls(&idp, "rt-file-1"), 1);

    // Twice: the second proves the watch followed the Secret's new timestamped directory.
    let mut previous = first;
    for (i, rt) in [(2, "rt-file-2"), (3, "rt-file-3")] {
        let started = Instant::now();
        secret.update(&[
            ("refresh-token", format!("{rt}\n").into_bytes()),
            ("client-secret", format!("cs-{i}").into_bytes()),
        ]);
        assert!(
            eventually(Duration::from_secs(2), || rt_calls(&idp, rt) == 1).await,
            "rotation {i}: the new secret was not used within 2 s"
        );
        let call = idp.requests().into_iter().last().unwrap();
        assert_eq!(call.form["client_secret"], format!("cs-{i}"));
        assert!(call.at > started);
        let r = ask(&c, sc.local_addr, "account=a", None).await;
        assert_eq!(r.status, 200);
        assert_ne!(
            r.token(),
            previous,
            "rotation {i}: a token issued after the change"
        );
        previous = r.token().to_owned();
    }
    assert_eq!(metric(&c, sc.local_addr, RELOADS_OK).await, 3.0);
    sc.shutdown().await;
}

#[tokio::test]
async fn a_secret_file_that_appears_later_is_picked_up_by_the_watcher() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let (conf_dir, secret_dir) = (root.path().join("conf"), root.path().join("secret"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&secret_dir).unwrap();
    let path = conf_dir.join("accounts.json");
    std::fs::write(
        &path,
        config(&idp, json!({ "pw": { "user": "p", "pass": "p" } })),
    )
    .unwrap();
    let sc = start(test_options(&path)).await.unwrap();
    let c = client();
    // The operator adds an account whose secret is not there yet ...
    let rt_file = secret_dir.join("b-refresh-token");
    std::fs::write(
        &path,
        config(
            &idp,
            json!({ "pw": { "user": "p", "pass": "p" },
                "b": { "user": "b", "provider": "idp", "refreshToken": { "file": rt_file } } }),
        ),
    )
    .unwrap();
    assert!(reported_error(&c, &sc, "accounts.b.refreshToken")
        .await
        .is_some());
    // ... then it appears, in a directory the running config never referenced.
    std::fs::write(&rt_file, "rt-late").unwrap();
    assert!(
        until_answer(&c, &sc, "account=b", Duration::from_secs(5), |a| a.status
            == 200)
        .await
        .is_some(),
        "the new secret file was not noticed"
    );
    assert_eq!(rt_calls(&idp, "rt-late"), 1);
    assert!(sc.sidecar.reload_status().last_error.is_none());
    sc.shutdown().await;
}

#[tokio::test]
async fn changes_to_auth_take_effect_for_the_next_request() {
    let root = tempfile::tempdir().unwrap();
    let with_auth = |auth: Option<(&str, &str)>| {
        let mut v = json!({ "accounts": { "pw": { "user": "p", "pass": "p" } } });
        if let Some((u, p)) = auth {
            v["auth"] = json!({ "username": u, "password": p });
        }
        serde_json::to_vec(&v).unwrap()
    };
    let mut vol = kube_config(root.path(), with_auth(None));
    let sc = start(test_options(&vol.path("accounts.json")))
        .await
        .unwrap();
    let c = client();
    let a = sc.local_addr;
    let status = |basic: Option<(&'static str, &'static str)>| {
        let c = c.clone();
        async move { ask(&c, a, "account=pw", basic).await.status }
    };
    assert_eq!(status(None).await, 200);

    for (auth, ok, refused) in [
        (Some(("ee", "pw-1")), Some(("ee", "pw-1")), None),
        (
            Some(("ee", "pw-2")),
            Some(("ee", "pw-2")),
            Some(("ee", "pw-1")),
        ),
        (None, None, Some(("nobody", "x"))),
    ] {
        let before = sc.sidecar.config().fingerprint;
        vol.update(&[("accounts.json", with_auth(auth))]);
        assert!(swapped(&sc, before, Duration::from_secs(5)).await);
        // The very next request after the swap is judged by the new rules.
        assert_eq!(status(ok).await, 200, "{auth:?}");
        if auth.is_some() {
            assert_eq!(status(refused).await, 401, "{auth:?}");
        }
    }
    sc.shutdown().await;
}

/// Counts `open()`s of files under `dir`, as inotify reports them.
fn count_opens(dir: &Path) -> (notify::RecommendedWatcher, Arc<AtomicU64>) {
    use notify::Watcher;
    let opens = Arc::new(AtomicU64::new(0));
    let o = opens.clone();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res {
            if matches!(
                e.kind,
                notify::EventKind::Access(notify::event::AccessKind::Open(_))
            ) {
                o.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .unwrap();
    w.watch(dir, notify::RecursiveMode::NonRecursive).unwrap();
    (w, opens)
}

#[tokio::test]
async fn an_idle_sidecar_does_not_keep_re_reading_its_config() {
    let idp = MockIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("accounts.json");
    let cfg = |pass: &str| config(&idp, json!({ "pw": { "user": "u", "pass": pass } }));
    std::fs::write(&path, cfg("one")).unwrap();
    let sc = start(test_options(&path)).await.unwrap();
    let c = client();
    // The sidecar reading its own file is an inotify event too; it must not count as a
    // change, or every reload schedules the next one.
    std::fs::write(&path, cfg("two")).unwrap();
    assert!(until_answer(
        &c,
        &sc,
        "account=pw",
        Duration::from_secs(5),
        pass_is("two")
    )
    .await
    .is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_watcher, opens) = count_opens(dir.path());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        opens.load(Ordering::Relaxed),
        0,
        "the config was re-read while nothing changed"
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn the_periodic_re_read_alone_picks_up_a_change_the_watcher_cannot_see() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let (watched, elsewhere) = (root.path().join("watched"), root.path().join("elsewhere"));
    std::fs::create_dir_all(&watched).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let path = watched.join("accounts.json");
    let cfg = |pass: &str| config(&idp, json!({ "pw": { "user": "u", "pass": pass } }));
    std::fs::write(&path, cfg("before")).unwrap();
    // A hard link: writing through it changes the config's content, but inotify reports
    // the write only to the directory the write went through, which nobody watches —
    // like a change on a network filesystem that sends no events.
    let other_name = elsewhere.join("same-inode.json");
    std::fs::hard_link(&path, &other_name).unwrap();

    let mut periodic = test_options(&path);
    periodic.reload_interval = Duration::from_secs(1);
    let periodic = start(periodic).await.unwrap();
    // The control: the same file, the watcher only.
    let watcher_only = start(test_options(&path)).await.unwrap();
    let c = client();

    std::fs::write(&other_name, cfg("after")).unwrap();
    assert!(
        until_answer(
            &c,
            &periodic,
            "account=pw",
            Duration::from_secs(5),
            pass_is("after")
        )
        .await
        .is_some(),
        "the periodic re-read did not pick up the change"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        pass_is("before")(&ask(&c, watcher_only.local_addr, "account=pw", None).await),
        "the control saw the change without a periodic re-read, so this test proves nothing"
    );
    periodic.shutdown().await;
    watcher_only.shutdown().await;
}

/// Kills the child process (by its id) when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// JSON log lines written so far.
fn log_lines(path: &Path) -> Vec<Value> {
    let f = std::fs::File::open(path).unwrap();
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_one_clear_error_for_a_bad_config_and_no_secret() {
    let idp = MockIdp::start().await;
    let root = tempfile::tempdir().unwrap();
    let good = config(
        &idp,
        json!({ "a": oauth("a@example.com", "rt-must-not-be-logged"), "pw": { "user": "p", "pass": "pass-must-not-be-logged" } }),
    );
    let mut vol = kube_config(root.path(), good);
    let log = root.path().join("stderr.log");
    let config_path = vol.path("accounts.json");
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_ee-auth-sidecar"))
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            // A short periodic re-read: the same bad file is looked at many times.
            .args(["--reload-interval", "300ms"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while addr.is_none() && Instant::now() < deadline {
        addr = log_lines(&log)
            .iter()
            .find(|l| l["message"] == "listening")
            .and_then(|l| l["addr"].as_str())
            .map(|a| a.parse::<std::net::SocketAddr>().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addr = addr.expect("the binary logged its address");
    let c = client();
    assert_eq!(ask(&c, addr, "account=a", None).await.status, 200);

    let mut bad: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    bad["accounts"]["a"]["provider"] = json!("no-such-idp");
    vol.update(&[("accounts.json", serde_json::to_vec_pretty(&bad).unwrap())]);
    // Ten periodic re-reads of the same bad file.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ask(&c, addr, "account=a", None).await.status, 200);

    let lines = log_lines(&log);
    let errors: Vec<&Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "one error for one bad config: {errors:#?}");
    let text = errors[0].to_string();
    for needle in [
        config_path.to_str().unwrap(),
        "accounts.a.provider",
        "no-such-idp",
    ] {
        assert!(text.contains(needle), "the error names {needle}: {text}");
    }
    let all = std::fs::read_to_string(&log).unwrap();
    assert!(!all.contains("must-not-be-logged"), "a secret was logged");
    let metrics = scrape(&c, addr).await;
    assert!(
        metrics.lines().any(|l| l == format!("{RELOADS_FAILED} 1")),
        "{metrics}"
    );
    drop(child);
}

// ---------------------------------------------------------------------------------------
// Hostile files and busy directories

/// Whether account `pw` answers with `pass` within 5 s.
async fn pw_pass_becomes(c: &reqwest::Client, sc: &Running, pass: impl Into<String>) -> bool {
    let within = Duration::from_secs(5);
    until_answer(c, sc, "account=pw", within, pass_is(pass))
        .await
        .is_some()
}

/// Peak resident memory of this test process so far (KiB).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// What a file the operator points at is replaced with (in one rename, as a deploy would).
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// A symlink to `/dev/zero`: endless.
    DevZero,
    /// A FIFO nobody writes to: `open` blocks for good.
    Fifo,
    /// A 300 MB file (sparse: no disk used).
    Huge,
}

fn replace_with(path: &Path, what: Hostile) {
    let tmp = path.with_extension("hostile-tmp");
    match what {
        Hostile::DevZero => std::os::unix::fs::symlink("/dev/zero", &tmp).unwrap(),
        Hostile::Fifo => mkfifo(&tmp),
        Hostile::Huge => std::fs::File::create(&tmp)
            .unwrap()
            .set_len(300 * 1024 * 1024)
            .unwrap(),
    }
    std::fs::rename(&tmp, path).unwrap();
}

/// A sidecar serving password account `pw` from secret file `<root>/secrets/pw`, its
/// config in `<root>/config/accounts.json`.
async fn secret_file_sidecar(root: &Path) -> (Running, PathBuf, PathBuf) {
    let (config_dir, secrets) = (root.join("config"), root.join("secrets"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    let secret = secrets.join("pw");
    std::fs::write(&secret, "pass-1\n").unwrap();
    let path = write_config(
        &config_dir,
        &json!({
            // Opens the admin API, where the tests read `lastError`.
            "adminAuth": { "username": "ops", "password": "ops-pw" },
            "accounts": { "pw": { "user": "u", "pass": { "file": secret } } }
        }),
    );
    let sc = start(test_options(&path)).await.unwrap();
    (sc, path, secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_or_huge_files_fail_the_reload_clearly_with_bounded_memory() {
    let root = tempfile::tempdir().unwrap();
    let (sc, config_path, secret) = secret_file_sidecar(root.path()).await;
    let c = client();
    let cases = [
        (
            &secret,
            Hostile::DevZero,
            "is a character device, not a regular file",
        ),
        (
            &secret,
            Hostile::Huge,
            "is larger than 1 MiB, the limit for a secret file",
        ),
        (
            &config_path,
            Hostile::Huge,
            "is larger than 256 MiB, the limit for a config file",
        ),
    ];
    for (n, (path, what, needle)) in cases.into_iter().enumerate() {
        let good = std::fs::read(path).unwrap();
        let peak_before = peak_rss_kib();
        replace_with(path, what);
        let errors = reported_error(&c, &sc, needle)
            .await
            .unwrap_or_else(|| panic!("{what:?} {}: no `{needle}` in lastError", path.display()));
        let joined = errors.join("\n");
        assert!(
            joined.contains(path.to_str().unwrap()),
            "names the file: {joined}"
        );
        // Let a read that is not bounded show itself.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let grown_mib = peak_rss_kib().saturating_sub(peak_before) / 1024;
        assert!(
            grown_mib < 100,
            "{what:?}: peak RSS grew by {grown_mib} MiB"
        );
        assert_eq!(
            ask(&c, sc.local_addr, "account=pw", None).await.body["pass"],
            format!("pass-{}", n + 1),
            "the old map serves on"
        );
        // A valid change afterwards is applied.
        if path == &secret {
            write_atomic(&secret, format!("pass-{}\n", n + 2).as_bytes());
        } else {
            let mut v: Value = serde_json::from_slice(&good).unwrap();
            v["accounts"]["pw"]["pass"] = json!(format!("pass-{}", n + 2));
            write_atomic(path, &serde_json::to_vec(&v).unwrap());
            // The secret file still says pass-n+1; the config now names it literally.
        }
        assert!(
            pw_pass_becomes(&c, &sc, format!("pass-{}", n + 2)).await,
            "{what:?}: a valid change after the failure is applied"
        );
    }
    sc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_secret_fails_the_reload_clearly_and_later_changes_still_apply() {
    let root = tempfile::tempdir().unwrap();
    let (sc, _config_path, secret) = secret_file_sidecar(root.path()).await;
    let c = client();
    replace_with(&secret, Hostile::Fifo);
    let errors = reported_error(&c, &sc, "is a FIFO (named pipe), not a regular file")
        .await
        .expect("the FIFO is reported in lastError");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("accounts.pw.pass") && e.contains(secret.to_str().unwrap())),
        "{errors:?}"
    );
    assert_eq!(
        ask(&c, sc.local_addr, "account=pw", None).await.body["pass"],
        "pass-1"
    );
    write_atomic(&secret, b"pass-2\n");
    assert!(
        pw_pass_becomes(&c, &sc, "pass-2").await,
        "the reloader is not stuck on the FIFO"
    );
    // And shutdown is prompt (nothing is left blocked on the FIFO).
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), sc.shutdown())
        .await
        .expect("shutdown finishes");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_written_every_100_ms_does_not_hold_back_a_config_change() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |pass: &str| json!({ "accounts": { "pw": { "user": "u", "pass": pass } } });
    let path = write_config(dir.path(), &cfg("before"));
    let sc = start(test_options(&path)).await.unwrap();
    let c = client();
    // An unrelated file in the watched directory, written every 100 ms for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, noise) = (stop.clone(), dir.path().join("noise.log"));
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&noise).unwrap();
            while !stop.load(Ordering::Relaxed) {
                writeln!(f, "tick").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (i, pass) in ["after-1", "after-2"].into_iter().enumerate() {
        write_atomic(&path, &serde_json::to_vec(&cfg(pass)).unwrap());
        let took = until_answer(&c, &sc, "account=pw", Duration::from_secs(6), pass_is(pass)).await;
        let took = took.unwrap_or_else(|| {
            panic!("change {i} not applied within 6 s while the directory was busy")
        });
        assert!(
            took < Duration::from_millis(3500),
            "change {i} took {took:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    sc.shutdown().await;
}

#[tokio::test]
async fn a_reload_interval_beyond_the_clock_s_range_does_not_stop_the_reloader() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |pass: &str| json!({ "accounts": { "pw": { "user": "u", "pass": pass } } });
    let path = write_config(dir.path(), &cfg("before"));
    let mut o = test_options(&path);
    // `now + interval` overflows: the reloader must clamp it, not die silently.
    o.reload_interval = Duration::MAX;
    let sc = start(o).await.unwrap();
    let c = client();
    write_atomic(&path, &serde_json::to_vec(&cfg("after")).unwrap());
    assert!(
        pw_pass_becomes(&c, &sc, "after").await,
        "the reloader is alive"
    );
    sc.shutdown().await;
}
