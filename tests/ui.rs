//! The operator page (`GET /ui`) in a real headless Chromium driven through chromedriver
//! (Debian's `chromium` and `chromium-driver`): the list renders and pages, the consent
//! button starts a device sign-in in the sidecar and shows the code, the account turns
//! fresh when the mock authorization server completes it, and no secret is in the HTML.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::authz::{DeviceStep, MockAuthz};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const ADMIN: (&str, &str) = ("ops", "ops-page-pass");
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port; killed with the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(profile: &Path) -> (Driver, Client) {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: install the Debian packages `chromium` and `chromium-driver` (apt-get install chromium chromium-driver; .ci/run installs them)"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let status = format!("http://127.0.0.1:{port}/status");
    assert!(
        eventually(Duration::from_secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await,
        "chromedriver did not listen at {status}"
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// The page's HTML carries nothing secret.
fn assert_no_secret(html: &str) {
    for secret in [
        "rt-consented",
        "rt-known",
        "at-refreshed",
        "at-consent",
        "device-code-secret",
        "consent-client-secret",
        ADMIN.1,
    ] {
        assert!(!html.contains(secret), "`{secret}` in the page:\n{html}");
    }
}

async fn state_of(c: &Client, account: &str) -> Option<String> {
    let row = c
        .find(Locator::Css(&format!("tr[data-account='{account}']")))
        .await
        .ok()?;
    row.attr("data-state").await.ok().flatten()
}

#[tokio::test]
async fn the_operator_page_lists_pages_and_signs_an_account_in_from_a_real_browser() {
    let authz = MockAuthz::start("owner@example.com").await;
    authz.with(|s| {
        s.after_script = Some(DeviceStep::Pending);
        s.refresh_tokens.insert("rt-known".into());
    });
    let dir = tempfile::tempdir().unwrap();
    let mut accounts = serde_json::Map::new();
    accounts.insert(
        "c".into(),
        json!({ "user": "owner@example.com", "provider": "as", "scopes": ["mail.read"] }),
    );
    for i in 0..60 {
        accounts.insert(
            format!("bulk-{i:02}"),
            json!({ "user": format!("u{i}@example.com"), "provider": "as", "refreshToken": "rt-known" }),
        );
    }
    let path = write_config(
        dir.path(),
        &json!({
            "adminAuth": { "username": ADMIN.0, "password": ADMIN.1 },
            "providers": { "as": authz.provider() },
            "accounts": accounts,
        }),
    );
    let mut o = test_options(&path);
    o.state_dir = Some(dir.path().join("state"));
    o.prewarm_concurrency = 8;
    o.consent_poll_interval = Duration::from_millis(200);
    let sc = start(o).await.unwrap();
    let http = client();
    assert!(wait_ready(&http, sc.local_addr, Duration::from_secs(20)).await);
    let base = format!("http://{}:{}@{}", ADMIN.0, ADMIN.1, sc.local_addr);

    // Headers and refusals, without the browser.
    let r = http
        .get(format!("http://{}/ui", sc.local_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("http://{}/ui", sc.local_addr))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let r = http
        .post(format!("http://{}/ui/consent", sc.local_addr))
        .basic_auth(ADMIN.0, Some(ADMIN.1))
        .form(&[("account", "c"), ("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a POST without the page's CSRF token");
    assert_eq!(authz.with(|s| s.device_requests.len()), 0);

    let profile = tempfile::tempdir().unwrap();
    let (_driver, c) = browser(profile.path()).await;
    // The list renders, paged: 61 accounts, 50 on the first page.
    c.goto(&format!("{base}/ui")).await.unwrap();
    let total = c
        .find(Locator::Id("total"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(total, "61 account(s)");
    let rows = c.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 50);
    assert_eq!(state_of(&c, "bulk-00").await.as_deref(), Some("fresh"));
    c.find(Locator::LinkText("next page"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rows = c.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 11);
    assert_no_secret(&c.source().await.unwrap());

    // Filtered to the accounts that need consent: the button starts a device sign-in.
    c.goto(&format!("{base}/ui?state=needs_consent"))
        .await
        .unwrap();
    assert_eq!(state_of(&c, "c").await.as_deref(), Some("needs_consent"));
    assert_eq!(c.find_all(Locator::Css("tbody tr")).await.unwrap().len(), 1);
    assert_no_secret(&c.source().await.unwrap());
    c.find(Locator::Css("tr[data-account='c'] button.consent"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut code = String::new();
    for _ in 0..50 {
        if let Ok(e) = c.find(Locator::Id("code")).await {
            code = e.text().await.unwrap_or_default();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = c.refresh().await;
    }
    assert_eq!(code, "WDJB-MJHT", "{}", c.source().await.unwrap());
    assert_no_secret(&c.source().await.unwrap());
    assert_eq!(
        authz.with(|s| s.device_requests[0]["scope"].clone()),
        "mail.read openid email"
    );

    // The owner signs in: the page says so, and the account turns fresh.
    authz.with(|s| s.after_script = Some(DeviceStep::Approve));
    let mut result = String::new();
    for _ in 0..100 {
        if let Ok(e) = c.find(Locator::Id("result")).await {
            result = e.text().await.unwrap_or_default();
            if result.starts_with("Signed in") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        result.contains("Signed in as owner@example.com"),
        "{result}"
    );
    assert_no_secret(&c.source().await.unwrap());
    let mut state = None;
    for _ in 0..50 {
        // `c` sorts after the 60 `bulk-` accounts: the second page.
        c.goto(&format!("{base}/ui?offset=50")).await.unwrap();
        state = state_of(&c, "c").await;
        if state.as_deref() == Some("fresh") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state.as_deref(),
        Some("fresh"),
        "{}",
        c.source().await.unwrap()
    );
    assert_no_secret(&c.source().await.unwrap());
    let a = ask(&http, sc.local_addr, "account=c", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    c.close().await.unwrap();
    sc.shutdown().await;
}
