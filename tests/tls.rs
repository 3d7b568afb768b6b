//! TLS and the other security checks of the listener and the state directory:
//! HTTPS with a real TLS client (reqwest + rustls verifying a self-signed certificate made
//! by rcgen), in-process and through the binary's `--tls-cert/--tls-key`; unusable TLS
//! material refused at start; a silent TLS client cut off; the state directory and its
//! files private whatever the umask; `--allow-remote` refused without `auth`, also on a
//! reload; credentials compared on every byte.
//!
//! The deployment's non-root user and restricted security context are checked by
//! deploy/tests/test_manifests.py (test_container_meets_pss_restricted,
//! test_dockerfile_runtime_stage).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf, reqwest::Certificate) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let root = reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap();
    (cert, key, root)
}

fn password_config(dir: &Path) -> PathBuf {
    write_config(
        dir,
        &json!({
            "auth": { "username": "ee", "password": "s3cret" },
            "accounts": { "pw": { "user": "p@example.com", "pass": "app-password" } }
        }),
    )
}

fn tls_client(root: &reqwest::Certificate, addr: SocketAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(root.clone())
        .tls_built_in_root_certs(false)
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(10))
}

async fn get_token(c: &reqwest::Client, url: &str) -> Result<(u16, String), reqwest::Error> {
    let r = c.get(url).basic_auth("ee", Some("s3cret")).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test]
async fn serves_https_to_a_verifying_client_with_tls_1_2_and_1_3() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = self_signed(dir.path());
    let mut o = test_options(&password_config(dir.path()));
    o.tls = Some((cert, key));
    let sc = start(o).await.expect("starts with TLS");
    let a = sc.local_addr;
    let by_name = format!(
        "https://localhost:{}/authentication?account=pw&proto=imap",
        a.port()
    );
    let by_ip = format!(
        "https://127.0.0.1:{}/authentication?account=pw&proto=imap",
        a.port()
    );

    for (version, c) in [
        ("default (1.3)", tls_client(&root, a).build().unwrap()),
        (
            "1.2",
            tls_client(&root, a)
                .min_tls_version(reqwest::tls::Version::TLS_1_2)
                .max_tls_version(reqwest::tls::Version::TLS_1_2)
                .build()
                .unwrap(),
        ),
        (
            "1.3",
            tls_client(&root, a)
                .min_tls_version(reqwest::tls::Version::TLS_1_3)
                .build()
                .unwrap(),
        ),
    ] {
        for url in [&by_name, &by_ip] {
            let (status, body) = get_token(&c, url)
                .await
                .unwrap_or_else(|e| panic!("{version} {url}: {e:?}"));
            assert_eq!(status, 200, "{version}: {body}");
            assert_eq!(body, r#"{"user":"p@example.com","pass":"app-password"}"#);
        }
        // Keep-alive over TLS: a second request on the same client.
        assert_eq!(get_token(&c, &by_name).await.unwrap().0, 200);
    }
    // Wrong credentials over TLS are still refused.
    let c = tls_client(&root, a).build().unwrap();
    let r = c
        .get(&by_name)
        .basic_auth("ee", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A client that does not trust the certificate refuses to talk.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", a)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let e = get_token(&untrusting, &by_name).await.unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    // A name the certificate does not carry fails verification.
    let other = tls_client(&root, a)
        .resolve("other.example", a)
        .build()
        .unwrap();
    assert!(get_token(
        &other,
        &format!("https://other.example:{}/healthz", a.port())
    )
    .await
    .is_err());
    // Plain HTTP to the TLS port gets no answer.
    let plain = client();
    let r = plain
        .get(format!("http://{a}/authentication?account=pw"))
        .basic_auth("ee", Some("s3cret"))
        .send()
        .await;
    assert!(r.is_err() || !r.unwrap().status().is_success());
    sc.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_completes_the_handshake_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = self_signed(dir.path());
    let mut o = test_options(&password_config(dir.path()));
    o.tls = Some((cert, key));
    let sc = start(o).await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(sc.local_addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(sc.local_addr).await.unwrap();
    // Half a ClientHello record header, then silence.
    half.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    // Meanwhile a real client is served.
    let c = tls_client(&root, sc.local_addr).build().unwrap();
    let url = format!(
        "https://localhost:{}/authentication?account=pw",
        sc.local_addr.port()
    );
    assert_eq!(get_token(&c, &url).await.unwrap().0, 200);
    let started = Instant::now();
    for s in [&mut silent, &mut half] {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "closed by the server: {r:?}"
        );
    }
    // The handshake timeout is 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(13),
        "{:?}",
        started.elapsed()
    );
    sc.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_material_is_refused_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path());
    let (other_cert, _, _) = self_signed(&{
        let d = dir.path().join("other");
        std::fs::create_dir(&d).unwrap();
        d
    });
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cfg = password_config(dir.path());
    for (what, c, k, needle) in [
        (
            "missing certificate",
            missing.clone(),
            key.clone(),
            "missing.pem",
        ),
        ("missing key", cert.clone(), missing.clone(), "missing.pem"),
        (
            "garbage certificate",
            garbage.clone(),
            key.clone(),
            "garbage.pem",
        ),
        ("garbage key", cert.clone(), garbage.clone(), "garbage.pem"),
        (
            "key of another certificate",
            other_cert.clone(),
            key.clone(),
            "do not fit",
        ),
        ("certificate as key", cert.clone(), cert.clone(), "cert.pem"),
    ] {
        let mut o = test_options(&cfg);
        o.tls = Some((c, k));
        let e = start(o)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: started"))
            .to_string();
        assert!(e.contains(needle), "{what}: {e}");
        assert!(!e.contains("PRIVATE KEY"), "{what}: {e}");
    }
}

/// The binary's own flags, end to end: `--tls-cert/--tls-key` serve HTTPS, and one
/// without the other is a usage error.
#[tokio::test]
async fn the_binary_serves_https_with_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = self_signed(dir.path());
    let cfg = password_config(dir.path());
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_ee-auth-sidecar");
    let out = std::process::Command::new(bin)
        .args([
            "--config".as_ref(),
            cfg.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "--tls-cert alone is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));

    let mut child = std::process::Command::new(bin)
        .args(["--config".as_ref(), cfg.as_os_str()])
        .args([
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ])
        .args(["--listen", &addr.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = tls_client(&root, addr).build().unwrap();
    let url = format!(
        "https://localhost:{}/authentication?account=pw&proto=smtp",
        addr.port()
    );
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = get_token(&c, &url).await {
            result = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let (status, body) = result.expect("served over TLS");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"user":"p@example.com","pass":"app-password"}"#);
}

/// Whatever the umask, the state directory is 0700 and every record 0600 — also a
/// directory that existed with looser modes.
#[tokio::test]
async fn state_directory_and_files_are_private_under_any_umask() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh-state");
    let loose = dir.path().join("loose-state");
    std::fs::create_dir_all(loose.join("refresh-tokens")).unwrap();
    for d in [&loose, &loose.join("refresh-tokens")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    for state in [&fresh, &loose] {
        // A provider of its own each time: the first run spends the config's tokens.
        let idp = MockIdp::start().await;
        idp.with(|s| s.rotate = true);
        let cfg = write_config(
            dir.path(),
            &json!({ "providers": { "idp": oauth2_provider(&idp) },
                     "accounts": { "a": { "user": "u", "provider": "idp", "refreshToken": "rt-0" },
                                   "b": { "user": "v", "provider": "idp", "refreshToken": "rt-1" } } }),
        );
        let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"umask 000; exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_ee-auth-sidecar"))
            .args([
                "--config".as_ref(),
                cfg.as_os_str(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ])
            .args(["--listen", &addr.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        let c = client();
        // Pre-warm rotates both accounts' refresh tokens: two records are written.
        let records = state.join("refresh-tokens");
        let written = eventually(Duration::from_secs(20), || {
            std::fs::read_dir(&records).map(|d| d.count()).unwrap_or(0) >= 2
        })
        .await;
        let r = c.get(format!("http://{addr}/readyz")).send().await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            written,
            "records written ({r:?}): {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(state), 0o700, "{}", state.display());
        assert_eq!(mode(&records), 0o700);
        for e in std::fs::read_dir(&records).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
}

#[tokio::test]
async fn allow_remote_without_auth_is_refused_by_the_binary_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let no_auth = dir.path().join("no-auth.json");
    std::fs::write(
        &no_auth,
        r#"{"accounts": {"pw": {"user": "u", "pass": "p"}}}"#,
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_ee-auth-sidecar");
    // The listen address is checked before anything is bound.
    for extra in [&[][..], &["--allow-remote"][..]] {
        let out = std::process::Command::new(bin)
            .args(["--config".as_ref(), no_auth.as_os_str()])
            .args(["--listen", "0.0.0.0:0"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains("refusing to listen"), "{extra:?}: {stderr}");
    }

    // Listening remotely with auth, a reload that drops `auth` is refused and the old
    // config (with its credentials) stays in force. (Binds 0.0.0.0 on an ephemeral port
    // for the length of the test; all traffic goes to 127.0.0.1.)
    let cfg = password_config(dir.path());
    let mut o = test_options(&cfg);
    o.listen = "0.0.0.0:0".parse().unwrap();
    o.allow_remote = true;
    let sc = start(o).await.expect("remote with auth");
    std::fs::copy(&no_auth, &cfg).unwrap();
    let e = sc
        .sidecar
        .reload()
        .await
        .expect_err("reload refused")
        .to_string();
    assert!(sc.sidecar.config().auth.is_some(), "{e}");
    let local: SocketAddr = ([127, 0, 0, 1], sc.local_addr.port()).into();
    let c = client();
    assert_eq!(ask(&c, local, "account=pw", None).await.status, 401);
    assert_eq!(
        ask(&c, local, "account=pw", Some(("ee", "s3cret")))
            .await
            .status,
        200
    );
    sc.shutdown().await;
}

/// Credentials are compared on every byte (constant-time in the code, with
/// `subtle::ConstantTimeEq`; timing is not measured here): prefixes, extensions,
/// case changes and the decoded form of the URL's credentials are all refused, on the
/// token endpoint and the admin API alike.
#[tokio::test]
async fn credentials_must_match_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = password_config(dir.path());
    let sc = start(test_options(&cfg)).await.unwrap();
    let c = client();
    let a = sc.local_addr;
    for (u, p) in [
        ("ee", "s3cre"),
        ("ee", "s3cret "),
        ("ee", "s3cret\0"),
        ("ee", "S3cret"),
        ("EE", "s3cret"),
        ("e", "es3cret"),
        ("ee:s3cret", ""),
        ("", "s3cret"),
    ] {
        assert_eq!(
            ask(&c, a, "account=pw", Some((u, p))).await.status,
            401,
            "{u:?}:{p:?}"
        );
        let r = c
            .get(format!("http://{a}/v1/accounts"))
            .basic_auth(u, Some(p))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "admin {u:?}:{p:?}");
    }
    for header in [
        "Basic",
        "Basic ",
        "Bearer s3cret",
        "Basic ZWU6czNjcmU=",
        "Basic ZWU6czNjcmV0 x",
    ] {
        let r = c
            .get(format!("http://{a}/authentication?account=pw"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{header}");
    }
    assert_eq!(
        ask(&c, a, "account=pw", Some(("ee", "s3cret")))
            .await
            .status,
        200
    );
    sc.shutdown().await;
}
