//! The identity providers, end to end: each provider type against a mock identity provider
//! that checks the provider's wire format (form fields, client authentication, scope per
//! protocol, the service account's signed assertion), plus how every provider error reaches
//! EmailEngine and the account status, and the config errors an operator gets.
//!
//! Microsoft's default token URL (tenant and cloud → host and path) cannot be reached from
//! here (only loopback is allowed); it is covered by the unit tests in
//! `src/provider/microsoft.rs`. Everything else the cloud decides (scope hosts) is tested here.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use ee_auth_sidecar::config;
use ee_auth_sidecar::credentials::ConfigError;
use serde_json::{json, Value};

const MS_ID: &str = "ms-app-id";
const MS_SECRET: &str = "ms-client-secret~value";
const OUTLOOK_DEFAULT: &str = "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access";
const GRAPH_SCOPES: [&str; 3] = [
    "https://graph.microsoft.com/Mail.ReadWrite",
    "https://graph.microsoft.com/Mail.Send",
    "offline_access",
];
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const FORM: &str = "application/x-www-form-urlencoded";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn start_config(dir: &Path, cfg: Value, tweak: impl FnOnce(&mut Options)) -> Running {
    let path = write_config(dir, &cfg);
    let mut o = test_options(&path);
    tweak(&mut o);
    start(o).await.expect("sidecar starts")
}

fn form<'a>(r: &'a Recorded, key: &str) -> Result<&'a str, String> {
    r.form
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| format!("form field `{key}` missing"))
}

fn expect_field(r: &Recorded, key: &str, want: &str) -> Result<(), String> {
    let got = form(r, key)?;
    if got == want {
        Ok(())
    } else {
        Err(format!("form field `{key}` is `{got}`, expected `{want}`"))
    }
}

fn expect_keys(r: &Recorded, want: &[&str]) -> Result<(), String> {
    let got: BTreeSet<&str> = r.form.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = want.iter().copied().collect();
    if got == want {
        Ok(())
    } else {
        Err(format!("form fields {got:?}, expected exactly {want:?}"))
    }
}

fn expect_form_body(r: &Recorded) -> Result<(), String> {
    match r.content_type.as_deref() {
        Some(FORM) => Ok(()),
        other => Err(format!("content-type {other:?}, expected {FORM}")),
    }
}

/// The Microsoft identity platform v2.0 token endpoint, as far as a mock can tell:
/// credentials in the form, a `scope` always, one resource (audience) per request,
/// `<resource>/.default` only for client credentials.
fn microsoft_validator() -> Validator {
    Validator::new(|r| {
        expect_form_body(r)?;
        if r.authorization.is_some() {
            return Err("Microsoft: client credentials belong in the form here".into());
        }
        let segments: Vec<&str> = r.path.split('/').collect();
        if !matches!(segments.as_slice(), ["", tenant, "oauth2", "v2.0", "token"] if !tenant.is_empty())
        {
            return Err(format!(
                "path {} is not /<tenant>/oauth2/v2.0/token",
                r.path
            ));
        }
        expect_field(r, "client_id", MS_ID)?;
        expect_field(r, "client_secret", MS_SECRET)?;
        let scope = form(r, "scope")?;
        let resources: BTreeSet<&str> = scope
            .split(' ')
            .filter(|s| s.contains("://"))
            .map(|s| s.rsplit_once('/').map_or(s, |(res, _)| res))
            .collect();
        if resources.len() > 1 {
            return Err(format!(
                "AADSTS28000: scopes of several resources in one request: {scope}"
            ));
        }
        match form(r, "grant_type")? {
            "refresh_token" => {
                if form(r, "refresh_token")?.is_empty() {
                    return Err("empty refresh_token".into());
                }
                expect_keys(
                    r,
                    &[
                        "client_id",
                        "client_secret",
                        "grant_type",
                        "refresh_token",
                        "scope",
                    ],
                )
            }
            "client_credentials" => {
                if scope.split(' ').count() != 1 || !scope.ends_with("/.default") {
                    return Err(format!(
                        "client_credentials scope must be <resource>/.default, got {scope}"
                    ));
                }
                expect_keys(r, &["client_id", "client_secret", "grant_type", "scope"])
            }
            other => Err(format!("unsupported grant_type {other}")),
        }
    })
}

fn ms_provider(idp: &MockIdp, tenant: &str, extra: Value) -> Value {
    let mut p = json!({
        "type": "microsoft",
        "clientId": MS_ID,
        "clientSecret": MS_SECRET,
        "tenant": tenant,
        "tokenUrl": idp.url(&format!("/{tenant}/oauth2/v2.0/token")),
    });
    if let Value::Object(extra) = extra {
        p.as_object_mut().unwrap().extend(extra);
    }
    p
}

/// The one persisted refresh-token record of a state directory.
fn persisted_refresh_token(state: &Path) -> String {
    let files: Vec<_> = std::fs::read_dir(state.join("refresh-tokens"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(files.len(), 1, "one account, one record: {files:?}");
    let v: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    v["refreshToken"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// Microsoft
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn outlook_imap_and_api_get_two_tokens_from_one_rotating_refresh_token() {
    let idp = MockIdp::start().await;
    idp.set_validator(microsoft_validator());
    idp.with(|s| {
        // Microsoft rotates on every refresh; strict reuse detection catches a token
        // spent twice (two credential sets racing with one refresh token).
        s.rotate = true;
        s.valid_refresh_tokens = Some(["rt-0".to_owned()].into());
        s.delay = Duration::from_millis(200);
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = json!({
        "providers": { "ms": ms_provider(&idp, "contoso.onmicrosoft.com", json!({})) },
        "accounts": { "outlook": {
            "user": "ada@contoso.com",
            "provider": "ms",
            "refreshToken": "rt-0",
            "protocols": {
                "api": { "scopes": GRAPH_SCOPES },
                // Spelled out, but the same as the default: must share imap's token.
                "smtp": { "scopes": OUTLOOK_DEFAULT.split(' ').collect::<Vec<_>>() }
            }
        } }
    });
    let sc = start_config(dir.path(), cfg.clone(), |o| {
        o.state_dir = Some(state.clone())
    })
    .await;
    let c = client();
    let a = sc.local_addr;

    // Both at once: the two refreshes spend the same account's refresh token, so they
    // must be serialized and the second must spend what the first got back.
    let (imap, api) = tokio::join!(
        ask(&c, a, "account=outlook&proto=imap", None),
        ask(&c, a, "account=outlook&proto=api", None)
    );
    assert_eq!(imap.status, 200, "{}", imap.body);
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(imap.body["user"], "ada@contoso.com");
    assert_eq!(api.body["user"], "ada@contoso.com");
    assert_ne!(imap.token(), api.token(), "two audiences, two tokens");
    idp.check_valid(imap.token()).unwrap();
    idp.check_valid(api.token()).unwrap();
    assert_eq!(
        idp.issued_request(imap.token()).scope(),
        Some(OUTLOOK_DEFAULT)
    );
    assert_eq!(
        idp.issued_request(api.token()).scope(),
        Some(GRAPH_SCOPES.join(" ").as_str())
    );
    assert_eq!(idp.violations(), Vec::<String>::new());

    let reqs = idp.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].form["refresh_token"], "rt-0");
    let second = reqs[1].form["refresh_token"].clone();
    assert_ne!(
        second, "rt-0",
        "the second refresh spends the rotated token"
    );
    let (newest, reuse, peak, spent) = idp.with(|s| {
        let v = s.valid_refresh_tokens.clone().unwrap();
        assert_eq!(v.len(), 1);
        (
            v.into_iter().next().unwrap(),
            s.reuse_detected,
            s.peak_inflight,
            s.spent.clone(),
        )
    });
    assert!(spent.contains(&second));
    assert_eq!(reuse, 0, "no refresh token was spent twice");
    assert_eq!(peak, 1, "refreshes of one account are serialized");
    assert_eq!(persisted_refresh_token(&state), newest);

    // smtp, spelled out with the default scopes, and no proto share imap's token.
    for q in ["account=outlook&proto=smtp", "account=outlook"] {
        let r = ask(&c, a, q, None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.token(), imap.token(), "{q}");
    }
    assert_eq!(idp.calls(), 2);
    assert_eq!(status_of(&sc, "outlook").len(), 2, "two credential sets");
    sc.shutdown().await;

    // A restart keeps nothing in memory: the next refresh spends the newest token.
    let sc = start_config(dir.path(), cfg, |o| o.state_dir = Some(state.clone())).await;
    let r = ask(&c, sc.local_addr, "account=outlook&proto=api", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(idp.requests()[2].form["refresh_token"], newest);
    assert_eq!(idp.with(|s| s.reuse_detected), 0);
    assert_eq!(idp.violations(), Vec::<String>::new());
    sc.shutdown().await;
}

#[tokio::test]
async fn microsoft_scopes_follow_the_cloud_and_app_only_tokens_ask_for_default() {
    let idp = MockIdp::start().await;
    idp.set_validator(microsoft_validator());
    let dir = tempfile::tempdir().unwrap();
    let tenant_id = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let cfg = json!({
        "providers": {
            "global": ms_provider(&idp, "common", json!({})),
            "gcc": ms_provider(&idp, "contoso.onmicrosoft.us", json!({ "cloud": "gcc-high" })),
            "dod": ms_provider(&idp, "army.onmicrosoft.us", json!({ "cloud": "dod" })),
            "china": ms_provider(&idp, "contoso.partner.onmschina.cn", json!({ "cloud": "china" })),
            "app": ms_provider(&idp, tenant_id, json!({})),
        },
        "accounts": {
            "g": { "user": "g@contoso.com", "provider": "global", "refreshToken": "rt-g" },
            "gcc": { "user": "u@contoso.us", "provider": "gcc", "refreshToken": "rt-gcc" },
            "dod": { "user": "u@army.mil", "provider": "dod", "refreshToken": "rt-dod" },
            "cn": { "user": "u@contoso.cn", "provider": "china", "refreshToken": "rt-cn" },
            "daemon": { "user": "shared@contoso.com", "provider": "app", "grant": "client_credentials" },
            "mixed": {
                "user": "mixed@contoso.com", "provider": "global", "refreshToken": "rt-mixed",
                "protocols": { "api": { "provider": "app", "grant": "client_credentials" } }
            }
        }
    });
    let sc = start_config(dir.path(), cfg, |_| {}).await;
    let c = client();
    let a = sc.local_addr;
    let scope = |account: &'static str, proto: &'static str| {
        let c = c.clone();
        let idp = idp.clone();
        async move {
            let r = ask(&c, a, &format!("account={account}&proto={proto}"), None).await;
            assert_eq!(r.status, 200, "{account}/{proto}: {}", r.body);
            let req = idp.request_for(r.token()).unwrap();
            (
                req.form.get("grant_type").cloned().unwrap_or_default(),
                req.form.get("scope").cloned().unwrap_or_default(),
                req.path,
            )
        }
    };

    let delegated =
        |host: &str| format!("{host}/IMAP.AccessAsUser.All {host}/SMTP.Send offline_access");
    assert_eq!(scope("g", "imap").await.1, OUTLOOK_DEFAULT);
    assert_eq!(
        scope("g", "api").await.1,
        "https://graph.microsoft.com/.default offline_access"
    );
    assert_eq!(
        scope("gcc", "imap").await.1,
        delegated("https://outlook.office365.us")
    );
    assert_eq!(
        scope("gcc", "api").await.1,
        "https://graph.microsoft.us/.default offline_access"
    );
    assert_eq!(
        scope("dod", "smtp").await.1,
        delegated("https://outlook-dod.office365.us")
    );
    assert_eq!(
        scope("dod", "api").await.1,
        "https://dod-graph.microsoft.us/.default offline_access"
    );
    assert_eq!(
        scope("cn", "imap").await.1,
        delegated("https://partner.outlook.cn")
    );
    assert_eq!(
        scope("cn", "api").await.1,
        "https://microsoftgraph.chinacloudapi.cn/.default offline_access"
    );

    // App-only: client_credentials, `<resource>/.default`, no refresh token.
    let (grant, s, path) = scope("daemon", "imap").await;
    assert_eq!(
        (grant.as_str(), s.as_str()),
        (
            "client_credentials",
            "https://outlook.office365.com/.default"
        )
    );
    assert_eq!(path, format!("/{tenant_id}/oauth2/v2.0/token"));
    let (grant, s, _) = scope("daemon", "api").await;
    assert_eq!(
        (grant.as_str(), s.as_str()),
        ("client_credentials", "https://graph.microsoft.com/.default")
    );

    // A protocol can switch to a whole other provider and grant.
    let (grant, s, _) = scope("mixed", "imap").await;
    assert_eq!(
        (grant.as_str(), s.as_str()),
        ("refresh_token", OUTLOOK_DEFAULT)
    );
    let (grant, s, path) = scope("mixed", "api").await;
    assert_eq!(
        (grant.as_str(), s.as_str()),
        ("client_credentials", "https://graph.microsoft.com/.default")
    );
    assert_eq!(path, format!("/{tenant_id}/oauth2/v2.0/token"));

    assert_eq!(idp.violations(), Vec::<String>::new());
    sc.shutdown().await;
}

/// One error answer and what EmailEngine (and the account status) must see.
struct ErrorCase {
    status: u16,
    body: &'static str,
    retry_after: Option<u64>,
    /// 403 (permanent) or 429 (transient).
    want: u16,
    code: Option<&'static str>,
    provider_code: Option<&'static str>,
    /// Must appear in the error text EmailEngine gets.
    says: Option<&'static str>,
}

/// Runs each case against its own account (first request = first fetch) of one sidecar.
async fn check_error_cases(
    idp: &MockIdp,
    provider: Value,
    account: impl Fn(&str) -> Value,
    cases: &[ErrorCase],
) {
    let dir = tempfile::tempdir().unwrap();
    let accounts: serde_json::Map<String, Value> = (0..cases.len())
        .map(|i| (format!("e{i}"), account(&format!("e{i}"))))
        .collect();
    // At most half the first back-off (1 s): each request sees exactly its one attempt
    // (a longer hold would ride the retries, tests/outage.rs).
    let sc = start_config(
        dir.path(),
        json!({ "providers": { "p": provider }, "accounts": accounts }),
        |o| o.policy.request_wait = Duration::from_millis(500),
    )
    .await;
    let c = client();
    for (i, case) in cases.iter().enumerate() {
        let id = format!("e{i}");
        idp.set_fault(Fault::Status {
            status: case.status,
            body: case.body.into(),
            retry_after: case.retry_after,
        });
        let calls = idp.calls();
        let r = ask(&c, sc.local_addr, &format!("account={id}&proto=imap"), None).await;
        let what = format!(
            "case {i} ({} {}): {} {}",
            case.status, case.body, r.status, r.body
        );
        assert_eq!(idp.calls(), calls + 1, "{what}");
        assert_eq!(r.status, case.want, "{what}");
        let error = r.body["error"].as_str().unwrap_or_default().to_owned();
        // The provider's free text never reaches EmailEngine (it may echo request data).
        assert!(!error.contains("DESCRIPTION-MARKER"), "{what}");
        assert!(!r.body.to_string().contains("rt-e"), "{what}");
        if let Some(says) = case.says {
            assert!(error.contains(says), "{what}: error should say `{says}`");
        }
        let st = status_of(&sc, &id);
        assert_eq!(st.len(), 1);
        let last = st[0].last_error.as_ref().expect("status has lastError");
        assert_eq!(last.provider_code.as_deref(), case.provider_code, "{what}");
        match case.want {
            403 => {
                assert_eq!(r.body["code"].as_str(), case.code, "{what}");
                assert_eq!(r.body["provider"], "p", "{what}");
                if let Some(pc) = case.provider_code {
                    assert!(error.contains(pc), "{what}: error should carry {pc}");
                }
                assert_eq!(st[0].state, "failed_permanent", "{what}");
                assert_eq!(last.class, "permanent");
                assert_eq!(Some(last.code.as_str()), case.code, "{what}");
            }
            429 => {
                let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                match case.retry_after {
                    // One second before the sidecar's next attempt, which waits the
                    // provider's Retry-After; never under 3 s.
                    Some(want) => assert_eq!(
                        ra,
                        want.saturating_sub(1).max(3),
                        "{what}: provider's Retry-After"
                    ),
                    None => assert!((1..=30).contains(&ra), "{what}"),
                }
                assert_eq!(st[0].state, "failing_transient", "{what}");
                assert_eq!(last.class, "transient");
            }
            _ => unreachable!(),
        }
    }
    sc.shutdown().await;
}

fn ms_invalid_grant(code: u64) -> &'static str {
    Box::leak(
        format!(
            r#"{{"error":"invalid_grant","error_description":"AADSTS{code}: DESCRIPTION-MARKER for rt-e0. Trace ID: 1","error_codes":[{code}],"timestamp":"2026-11-27 10:00:00Z","trace_id":"t","correlation_id":"c"}}"#
        )
        .into_boxed_str(),
    )
}

#[tokio::test]
async fn microsoft_errors_reach_emailengine_with_their_aadsts_code() {
    let idp = MockIdp::start().await;
    idp.set_validator(microsoft_validator());
    let permanent = |body: &'static str, code: &'static str, aadsts: &'static str| ErrorCase {
        status: 400,
        body,
        retry_after: None,
        want: 403,
        code: Some(code),
        provider_code: Some(aadsts),
        says: Some(aadsts),
    };
    let cases = [
        permanent(ms_invalid_grant(50173), "invalid_grant", "AADSTS50173"),
        permanent(ms_invalid_grant(700082), "invalid_grant", "AADSTS700082"),
        permanent(ms_invalid_grant(70008), "invalid_grant", "AADSTS70008"),
        permanent(ms_invalid_grant(70000), "invalid_grant", "AADSTS70000"),
        // invalid_grant in general, whatever the code.
        permanent(ms_invalid_grant(54005), "invalid_grant", "AADSTS54005"),
        // The code only in the description (no error_codes array).
        permanent(
            r#"{"error":"invalid_grant","error_description":"AADSTS700082: DESCRIPTION-MARKER inactive for 90 days."}"#,
            "invalid_grant",
            "AADSTS700082",
        ),
        permanent(
            r#"{"error":"interaction_required","error_description":"AADSTS50076: DESCRIPTION-MARKER MFA.","error_codes":[50076]}"#,
            "interaction_required",
            "AADSTS50076",
        ),
        permanent(
            r#"{"error":"consent_required","error_description":"AADSTS65001: DESCRIPTION-MARKER consent.","error_codes":[65001]}"#,
            "consent_required",
            "AADSTS65001",
        ),
        ErrorCase {
            status: 401,
            ..permanent(
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: DESCRIPTION-MARKER secret.","error_codes":[7000215]}"#,
                "invalid_client",
                "AADSTS7000215",
            )
        },
        // Transient: throttling (Retry-After passed on), outages, a temporary refusal.
        ErrorCase {
            status: 429,
            body: "{}",
            retry_after: Some(7),
            want: 429,
            code: None,
            provider_code: None,
            says: None,
        },
        // A throttling answer stays transient even if its body names a grant error.
        ErrorCase {
            status: 429,
            body: ms_invalid_grant(70000),
            retry_after: Some(5),
            want: 429,
            code: None,
            provider_code: Some("AADSTS70000"),
            says: None,
        },
        ErrorCase {
            status: 503,
            body: "{}",
            retry_after: None,
            want: 429,
            code: None,
            provider_code: None,
            says: None,
        },
        ErrorCase {
            status: 500,
            body: r#"{"error":"server_error","error_description":"AADSTS90033: DESCRIPTION-MARKER","error_codes":[90033]}"#,
            retry_after: None,
            want: 429,
            code: None,
            provider_code: Some("AADSTS90033"),
            says: None,
        },
        ErrorCase {
            status: 400,
            body: r#"{"error":"temporarily_unavailable","error_description":"DESCRIPTION-MARKER"}"#,
            retry_after: Some(3),
            want: 429,
            code: None,
            provider_code: None,
            says: None,
        },
    ];
    check_error_cases(
        &idp,
        ms_provider(&idp, "organizations", json!({})),
        |id| json!({ "user": format!("{id}@contoso.com"), "provider": "p", "refreshToken": format!("rt-{id}") }),
        &cases,
    )
    .await;
    assert_eq!(idp.violations(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------
// Google
// ---------------------------------------------------------------------------------------

const G_ID: &str = "1234-abc.apps.googleusercontent.com";
const G_SECRET: &str = "GOCSPX-google-secret";

fn google_validator() -> Validator {
    Validator::new(|r| {
        expect_form_body(r)?;
        if r.path != "/google/token" {
            return Err(format!("path {}", r.path));
        }
        if r.authorization.is_some() {
            return Err("Google: client credentials are expected in the form".into());
        }
        expect_field(r, "grant_type", "refresh_token")?;
        expect_field(r, "client_id", G_ID)?;
        expect_field(r, "client_secret", G_SECRET)?;
        form(r, "refresh_token")?;
        let allowed = [
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
        ];
        match r.form.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!("unexpected form field {k}")),
            None => Ok(()),
        }
    })
}

fn google_provider(idp: &MockIdp) -> Value {
    json!({ "type": "google", "clientId": G_ID, "clientSecret": G_SECRET, "tokenUrl": idp.url("/google/token") })
}

#[tokio::test]
async fn google_refresh_sends_the_client_in_the_form_and_keeps_the_refresh_token() {
    let idp = MockIdp::start().await;
    idp.set_validator(google_validator());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let modify = "https://www.googleapis.com/auth/gmail.modify";
    let sc = start_config(
        dir.path(),
        json!({
            "adminAuth": { "username": "ops", "password": "ops-pw" },
            "providers": { "google": google_provider(&idp) },
            "accounts": { "gmail": {
                "user": "ada@gmail.com", "provider": "google", "refreshToken": "g-rt",
                "protocols": { "api": { "scopes": [modify] } }
            } }
        }),
        |o| o.state_dir = Some(state.clone()),
    )
    .await;
    let c = client();
    let a = sc.local_addr;
    let imap = ask(&c, a, "account=gmail&proto=imap", None).await;
    assert_eq!(imap.status, 200, "{}", imap.body);
    idp.check_valid(imap.token()).unwrap();
    // Without configured scopes no `scope` is sent: Google returns what the user granted
    // (the default, https://mail.google.com/, covers IMAP and SMTP).
    assert_eq!(idp.issued_request(imap.token()).scope(), None);
    let api = ask(&c, a, "account=gmail&proto=api", None).await;
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(idp.issued_request(api.token()).scope(), Some(modify));
    let st = status_of(&sc, "gmail");
    assert!(
        st.iter()
            .any(|s| s.scopes == vec!["https://mail.google.com/".to_owned()]),
        "default scope: {st:?}"
    );

    // Google's answers carry no refresh token: the account keeps the one it has.
    let r = c
        .post(format!("http://{a}/v1/accounts/gmail/refresh"))
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let reqs = idp.requests();
    assert_eq!(reqs.len(), 4);
    for r in &reqs {
        assert_eq!(r.form["refresh_token"], "g-rt");
    }
    assert!(
        !state.join("refresh-tokens").exists()
            || std::fs::read_dir(state.join("refresh-tokens"))
                .unwrap()
                .next()
                .is_none(),
        "nothing rotated, nothing persisted"
    );
    assert_eq!(idp.violations(), Vec::<String>::new());
    sc.shutdown().await;
}

#[tokio::test]
async fn google_errors_map_to_403_or_429() {
    let idp = MockIdp::start().await;
    idp.set_validator(google_validator());
    let cases = [
        ErrorCase {
            status: 400,
            body: r#"{"error":"invalid_grant","error_description":"DESCRIPTION-MARKER Token has been expired or revoked."}"#,
            retry_after: None,
            want: 403,
            code: Some("invalid_grant"),
            provider_code: None,
            says: Some("consent again"),
        },
        ErrorCase {
            status: 401,
            body: r#"{"error":"invalid_client","error_description":"DESCRIPTION-MARKER The OAuth client was deleted."}"#,
            retry_after: None,
            want: 403,
            code: Some("invalid_client"),
            provider_code: None,
            says: Some("invalid_client"),
        },
        ErrorCase {
            status: 429,
            body: r#"{"error":"rate_limit_exceeded"}"#,
            retry_after: Some(4),
            want: 429,
            code: None,
            provider_code: None,
            says: None,
        },
        ErrorCase {
            status: 500,
            body: r#"{"error":"internal_failure"}"#,
            retry_after: None,
            want: 429,
            code: None,
            provider_code: None,
            says: None,
        },
    ];
    check_error_cases(
        &idp,
        google_provider(&idp),
        |id| json!({ "user": format!("{id}@gmail.com"), "provider": "p", "refreshToken": format!("rt-{id}") }),
        &cases,
    )
    .await;
    assert_eq!(idp.violations(), Vec::<String>::new());
}

#[test]
fn the_wire_checks_refuse_what_a_real_provider_would() {
    // The mock's checks are what make the tests above meaningful; show they can fail.
    let rec = |path: &str, auth: Option<&str>, fields: &[(&str, &str)]| Recorded {
        path: path.into(),
        form: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        authorization: auth.map(str::to_owned),
        content_type: Some(FORM.into()),
        at: tokio::time::Instant::now(),
    };
    let ms = microsoft_validator();
    let ms_ok = [
        ("client_id", MS_ID),
        ("client_secret", MS_SECRET),
        ("grant_type", "refresh_token"),
        ("refresh_token", "rt"),
        ("scope", OUTLOOK_DEFAULT),
    ];
    let path = "/common/oauth2/v2.0/token";
    (ms.0)(&rec(path, None, &ms_ok)).unwrap();
    let mut mixed = ms_ok;
    mixed[4].1 =
        "https://outlook.office.com/IMAP.AccessAsUser.All https://graph.microsoft.com/Mail.Send";
    assert!((ms.0)(&rec(path, None, &mixed))
        .unwrap_err()
        .contains("AADSTS28000"));
    assert!((ms.0)(&rec(path, None, &ms_ok[..4])).is_err(), "no scope");
    assert!((ms.0)(&rec(path, Some("Basic eA=="), &ms_ok)).is_err());
    assert!((ms.0)(&rec("/oauth2/v2.0/token", None, &ms_ok)).is_err());
    let cc = [
        ("client_id", MS_ID),
        ("client_secret", MS_SECRET),
        ("grant_type", "client_credentials"),
        ("scope", "https://graph.microsoft.com/Mail.Send"),
    ];
    assert!(
        (ms.0)(&rec(path, None, &cc)).is_err(),
        "app-only needs /.default"
    );

    let g = google_validator();
    let g_ok = [
        ("client_id", G_ID),
        ("client_secret", G_SECRET),
        ("grant_type", "refresh_token"),
        ("refresh_token", "rt"),
    ];
    (g.0)(&rec("/google/token", None, &g_ok)).unwrap();
    assert!((g.0)(&rec("/google/token", None, &g_ok[1..])).is_err());
    assert!((g.0)(&rec("/google/token", Some("Basic eA=="), &g_ok)).is_err());
}

// ---------------------------------------------------------------------------------------
// Google service account (domain-wide delegation)
// ---------------------------------------------------------------------------------------

const SA_EMAIL: &str = "mail-sidecar@example-project.iam.gserviceaccount.com";

/// One RSA key for the whole test binary (generation is the slow part).
struct TestKey {
    private_pkcs8_pem: String,
    private_pkcs8_der: Vec<u8>,
    public_pkcs1_der: Vec<u8>,
}

fn test_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        TestKey {
            private_pkcs8_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            private_pkcs8_der: key.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            public_pkcs1_der: key.to_public_key().to_pkcs1_der().unwrap().into_vec(),
        }
    })
}

/// A Google JSON key file, as the Cloud console downloads it.
fn service_account_key(token_uri: &str) -> Value {
    json!({
        "type": "service_account",
        "project_id": "example-project",
        "private_key_id": "0123456789abcdef",
        "private_key": test_key().private_pkcs8_pem,
        "client_email": SA_EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
}

fn b64_json(part: &str) -> Result<Value, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| format!("not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))
}

/// Verifies an RS256 JWT with the public key; returns its claims.
fn verify_assertion(jwt: &str, public_pkcs1_der: &[u8]) -> Result<Value, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, sig] = parts.as_slice() else {
        return Err(format!("assertion has {} parts", parts.len()));
    };
    let h = b64_json(header)?;
    if h["alg"] != "RS256" {
        return Err(format!("alg {}", h["alg"]));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|e| format!("signature not base64url: {e}"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_pkcs1_der,
    )
    .verify(format!("{header}.{claims}").as_bytes(), &sig)
    .map_err(|_| "bad signature".to_owned())?;
    b64_json(claims)
}

/// Google's token endpoint for the JWT bearer grant, with the scope each mailbox is
/// expected to ask for.
fn service_account_validator(
    token_url: String,
    scopes: HashMap<&'static str, &'static str>,
) -> Validator {
    Validator::new(move |r| {
        expect_form_body(r)?;
        if r.authorization.is_some() {
            return Err("the JWT bearer grant carries no client authentication".into());
        }
        expect_keys(r, &["grant_type", "assertion"])?;
        expect_field(r, "grant_type", JWT_BEARER)?;
        let claims = verify_assertion(form(r, "assertion")?, &test_key().public_pkcs1_der)?;
        let sub = claims["sub"].as_str().ok_or("no sub")?;
        let want_scope = scopes
            .get(sub)
            .ok_or_else(|| format!("unexpected sub {sub}"))?;
        let checks = [
            ("iss", claims["iss"] == SA_EMAIL),
            ("aud", claims["aud"] == token_url.as_str()),
            ("scope", claims["scope"] == *want_scope),
        ];
        if let Some((name, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(format!("claim {name} wrong in {claims}"));
        }
        let (iat, exp) = (
            claims["iat"].as_i64().ok_or("no iat")?,
            claims["exp"].as_i64().ok_or("no exp")?,
        );
        if exp != iat + 3600 {
            return Err(format!("exp {exp} != iat {iat} + 3600"));
        }
        if (iat as f64 - unix_now()).abs() > 60.0 {
            return Err(format!("iat {iat} is not now"));
        }
        Ok(())
    })
}

#[test]
fn the_assertion_check_rejects_a_tampered_or_foreign_assertion() {
    // The mock's signature check is what makes the service-account test meaningful;
    // show it can fail.
    let key = ring::signature::RsaKeyPair::from_pkcs8(&test_key().private_pkcs8_der).unwrap();
    let sign = |claims: &Value| {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    };
    let good = sign(&json!({ "sub": "alice@corp.example" }));
    let pk = &test_key().public_pkcs1_der;
    assert_eq!(
        verify_assertion(&good, pk).unwrap()["sub"],
        "alice@corp.example"
    );
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(json!({ "sub": "ceo@corp.example" }).to_string()),
        parts[2]
    );
    assert_eq!(
        verify_assertion(&tampered, pk).unwrap_err(),
        "bad signature"
    );
    assert!(verify_assertion("a.b", pk).is_err());
}

#[tokio::test]
async fn a_workspace_user_is_served_through_the_service_account() {
    let idp = MockIdp::start().await;
    let token_url = idp.url("/sa/token");
    let modify = "https://www.googleapis.com/auth/gmail.modify";
    idp.set_validator(service_account_validator(
        token_url.clone(),
        [
            ("alice@corp.example", "https://mail.google.com/"),
            ("bob@corp.example", modify),
            ("carol@corp.example", "https://mail.google.com/"),
        ]
        .into(),
    ));
    let dir = tempfile::tempdir().unwrap();
    // The key file is a secret file next to the config, as a mounted Secret would be.
    std::fs::write(
        dir.path().join("sa.json"),
        serde_json::to_vec_pretty(&service_account_key(&token_url)).unwrap(),
    )
    .unwrap();
    let sc = start_config(
        dir.path(),
        json!({
            "providers": { "workspace": { "type": "google-service-account", "serviceAccountKey": { "file": "sa.json" } } },
            "accounts": {
                "alice": { "user": "alice@corp.example", "provider": "workspace" },
                "bob": { "user": "bob@corp.example", "provider": "workspace", "scopes": [modify] },
                "carol": { "user": "carol@corp.example", "provider": "workspace" }
            }
        }),
        |_| {},
    )
    .await;
    let c = client();
    let a = sc.local_addr;

    let alice = ask(&c, a, "account=alice&proto=imap", None).await;
    assert_eq!(alice.status, 200, "{}", alice.body);
    assert_eq!(alice.body["user"], "alice@corp.example");
    idp.check_valid(alice.token()).unwrap();
    let bob = ask(&c, a, "account=bob&proto=smtp", None).await;
    assert_eq!(bob.status, 200, "{}", bob.body);
    assert_ne!(alice.token(), bob.token());
    // One key, every mailbox: each token was bought with an assertion for its own user.
    for (ans, user) in [(&alice, "alice@corp.example"), (&bob, "bob@corp.example")] {
        let req = idp.request_for(ans.token()).unwrap();
        let claims =
            verify_assertion(&req.form["assertion"], &test_key().public_pkcs1_der).unwrap();
        assert_eq!(claims["sub"], user);
    }
    assert_eq!(idp.violations(), Vec::<String>::new());
    assert_eq!(
        idp.with(|s| s.calls_by_grant.get(JWT_BEARER).copied()),
        Some(2)
    );

    // Delegation not set up for this client: a permanent error that says exactly that.
    idp.set_fault(Fault::Status {
        status: 401,
        body: r#"{"error":"unauthorized_client","error_description":"Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."}"#.into(),
        retry_after: None,
    });
    let r = ask(&c, a, "account=carol&proto=imap", None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["code"], "unauthorized_client");
    assert_eq!(r.body["provider"], "workspace");
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.contains("domain-wide delegation is not configured"),
        "{error}"
    );
    let st = status_of(&sc, "carol");
    assert_eq!(st[0].state, "failed_permanent");
    assert!(st[0]
        .last_error
        .as_ref()
        .unwrap()
        .hint
        .unwrap()
        .contains("domain-wide delegation"));
    // Alice is unaffected.
    let again = ask(&c, a, "account=alice&proto=imap", None).await;
    assert_eq!(again.token(), alice.token());
    assert!(!r.body.to_string().contains("PRIVATE KEY"));
    sc.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Generic OAuth2 client authentication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oauth2_client_auth_basic_and_post() {
    const ID: &str = "client id/1";
    const SECRET: &str = "s3c:r&t+=%";
    let idp = MockIdp::start().await;
    idp.set_validator(Validator::new(|r| {
        expect_form_body(r)?;
        match r.path.as_str() {
            // RFC 6749 §2.3.1: id and secret form-urlencoded, then Basic.
            "/basic" => {
                let header = r.authorization.as_deref().ok_or("no Authorization")?;
                let b64 = header.strip_prefix("Basic ").ok_or("not Basic")?;
                let raw = String::from_utf8(STANDARD.decode(b64).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                let (id, secret) = raw.split_once(':').ok_or("no colon")?;
                let decode = |s: &str| -> String {
                    form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                if id.contains(' ') || id.contains('/') || secret.contains(':') {
                    return Err(format!("not form-urlencoded before Basic: {raw}"));
                }
                if (decode(id).as_str(), decode(secret).as_str()) != (ID, SECRET) {
                    return Err(format!("wrong Basic credentials {raw}"));
                }
                if r.form.contains_key("client_secret") {
                    return Err("client_secret in the form next to Basic".into());
                }
                Ok(())
            }
            "/post" => {
                if r.authorization.is_some() {
                    return Err("Authorization header with clientAuth post".into());
                }
                expect_field(r, "client_id", ID)?;
                expect_field(r, "client_secret", SECRET)
            }
            p => Err(format!("path {p}")),
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    let provider = |path: &str, auth: &str| json!({ "type": "oauth2", "tokenUrl": idp.url(path), "clientId": ID, "clientSecret": SECRET, "clientAuth": auth });
    let sc = start_config(
        dir.path(),
        json!({
            "providers": { "basic": provider("/basic", "basic"), "post": provider("/post", "post") },
            "accounts": {
                "b": { "user": "b@example.com", "provider": "basic", "refreshToken": "rt-b", "scopes": ["mail"] },
                "p": { "user": "p@example.com", "provider": "post", "refreshToken": "rt-p" }
            }
        }),
        |_| {},
    )
    .await;
    let c = client();
    for acct in ["b", "p"] {
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account={acct}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{acct}: {}", r.body);
    }
    let reqs = idp.requests();
    assert_eq!(reqs.len(), 2);
    let b = reqs.iter().find(|r| r.path == "/basic").unwrap();
    assert_eq!(b.form["grant_type"], "refresh_token");
    assert_eq!(b.form["refresh_token"], "rt-b");
    assert_eq!(b.form["scope"], "mail");
    assert_eq!(idp.violations(), Vec::<String>::new());
    sc.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Config errors
// ---------------------------------------------------------------------------------------

fn parse_errors(cfg: Value, base: &Path) -> Vec<ConfigError> {
    match config::parse(cfg.to_string().as_bytes(), base) {
        Ok(_) => panic!("config accepted: {cfg}"),
        Err(e) => e,
    }
}

fn find<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}: {errors:?}"))
}

#[test]
fn client_credentials_with_a_public_tenant_is_refused_naming_the_account() {
    for tenant in ["common", "organizations", "consumers"] {
        let errors = parse_errors(
            json!({
                "providers": { "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s", "tenant": tenant } },
                "accounts": { "x": { "user": "x@contoso.com", "provider": "ms", "grant": "client_credentials" } }
            }),
            Path::new("."),
        );
        let e = find(&errors, "accounts.x.grant");
        assert!(
            e.message
                .contains("client_credentials grant needs a specific tenant")
                && e.message.contains(tenant),
            "{e}"
        );
    }
    // The default tenant is `common` too.
    let errors = parse_errors(
        json!({
            "providers": { "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s" } },
            "accounts": { "x": { "user": "x@contoso.com", "provider": "ms", "grant": "client_credentials" } }
        }),
        Path::new("."),
    );
    assert!(find(&errors, "accounts.x.grant")
        .message
        .contains("`common`"));
    // A protocol override that turns app-only on a public tenant is caught as well.
    let errors = parse_errors(
        json!({
            "providers": { "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s" } },
            "accounts": { "y": { "user": "y@contoso.com", "provider": "ms", "refreshToken": "r",
                "protocols": { "api": { "grant": "client_credentials" } } } }
        }),
        Path::new("."),
    );
    assert!(
        errors
            .iter()
            .any(|e| e.path.starts_with("accounts.y")
                && e.message.contains("needs a specific tenant")),
        "{errors:?}"
    );
    // A specific tenant is fine, but app-only scopes must be `<resource>/.default`.
    let errors = parse_errors(
        json!({
            "providers": { "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s", "tenant": "contoso.onmicrosoft.com" } },
            "accounts": { "x": { "user": "x@contoso.com", "provider": "ms", "grant": "client_credentials",
                "scopes": ["https://outlook.office.com/IMAP.AccessAsUser.All"] } }
        }),
        Path::new("."),
    );
    assert!(find(&errors, "accounts.x.scopes")
        .message
        .contains("/.default"));
}

#[test]
fn unknown_cloud_and_bad_tenant_are_named_with_the_accounts_they_break() {
    let errors = parse_errors(
        json!({
            "providers": {
                "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s", "cloud": "moon" },
                "bad": { "type": "microsoft", "clientId": "c", "tenant": "contoso.com/../evil" }
            },
            "accounts": {
                "x": { "user": "x@contoso.com", "provider": "ms", "refreshToken": "r" },
                "y": { "user": "y@contoso.com", "provider": "bad", "refreshToken": "r" }
            }
        }),
        Path::new("."),
    );
    let cloud = find(&errors, "providers.ms.cloud");
    assert!(
        cloud.message.contains("moon") && cloud.message.contains("gcc-high"),
        "{cloud}"
    );
    assert!(find(&errors, "providers.bad.tenant")
        .message
        .contains("tenant id or a domain"));
    for acct in ["x", "y"] {
        let e = find(&errors, &format!("accounts.{acct}.provider"));
        assert!(e.message.contains("has errors of its own"), "{e}");
    }
}

#[test]
fn bad_service_account_keys_are_clear_leak_nothing_and_name_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let ec_pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let good = service_account_key("http://127.0.0.1:9/token");
    let with_key = |pem: &str| {
        let mut k = good.clone();
        k["private_key"] = json!(pem);
        k.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (
            "this is not json SECRET-MARKER".into(),
            "not a service-account JSON key",
        ),
        (
            json!({ "client_email": SA_EMAIL }).to_string(),
            "not a service-account JSON key",
        ),
        (with_key("SECRET-MARKER not a pem"), "not a PEM"),
        (with_key(&ec_pem), "not a usable RSA key"),
        (
            {
                let mut k = good.clone();
                k["client_email"] = json!("");
                k.to_string()
            },
            "client_email is empty",
        ),
    ];
    for (i, (key, says)) in cases.iter().enumerate() {
        std::fs::write(dir.path().join(format!("key{i}.json")), key).unwrap();
        let errors = parse_errors(
            json!({
                "providers": {
                    "inline": { "type": "google-service-account", "serviceAccountKey": key },
                    "file": { "type": "google-service-account", "serviceAccountKey": { "file": format!("key{i}.json") } }
                },
                "accounts": {
                    "a": { "user": "a@corp.example", "provider": "inline" },
                    "b": { "user": "b@corp.example", "provider": "file" }
                }
            }),
            dir.path(),
        );
        for p in ["inline", "file"] {
            let e = find(&errors, &format!("providers.{p}.serviceAccountKey"));
            assert!(e.message.contains(says), "case {i}: {e}");
        }
        for a in ["a", "b"] {
            assert!(find(&errors, &format!("accounts.{a}.provider"))
                .message
                .contains("has errors of its own"));
        }
        let all = format!("{errors:?}");
        assert!(
            !all.contains("SECRET-MARKER") && !all.contains("-----BEGIN") && !all.contains("MII"),
            "case {i}: key material in {all}"
        );
    }

    // A missing key file names the file and the provider.
    let errors = parse_errors(
        json!({
            "providers": { "sa": { "type": "google-service-account", "serviceAccountKey": { "file": "nope.json" } } },
            "accounts": { "a": { "user": "a@corp.example", "provider": "sa" } }
        }),
        dir.path(),
    );
    assert!(find(&errors, "providers.sa.serviceAccountKey")
        .message
        .contains("nope.json"));
    find(&errors, "accounts.a.provider");

    // A good key parses; a refresh token on a service-account account is a mistake.
    let ok = json!({
        "providers": { "sa": { "type": "google-service-account", "serviceAccountKey": good.to_string() } },
        "accounts": { "a": { "user": "a@corp.example", "provider": "sa" } }
    });
    config::parse(ok.to_string().as_bytes(), dir.path()).expect("a good key parses");
    let mut with_rt = ok.clone();
    with_rt["accounts"]["a"]["refreshToken"] = json!("r");
    let errors = parse_errors(with_rt, dir.path());
    assert!(find(&errors, "accounts.a.refreshToken")
        .message
        .contains("jwt_bearer"));
}

#[test]
fn grants_a_provider_cannot_do_are_refused_naming_the_account() {
    let errors = parse_errors(
        json!({
            "providers": { "g": { "type": "google", "clientId": "c", "clientSecret": "s" } },
            "accounts": { "x": { "user": "x@gmail.com", "provider": "g", "grant": "client_credentials" } }
        }),
        Path::new("."),
    );
    let e = find(&errors, "accounts.x.grant");
    assert!(
        e.message.contains("google") && e.message.contains("client_credentials"),
        "{e}"
    );
    // Without `refreshToken` a Google account is valid since issue 18: it waits for
    // consent (tests/consent.rs); the grant is still checked.
    let errors = parse_errors(
        json!({
            "providers": { "g": { "type": "google", "clientId": "c", "clientSecret": "s" } },
            "accounts": { "x": { "user": "x@gmail.com", "provider": "g", "grant": "jwt_bearer" } }
        }),
        Path::new("."),
    );
    assert!(find(&errors, "accounts.x.grant")
        .message
        .contains("jwt_bearer"));
}

#[tokio::test]
async fn a_config_error_stops_startup_with_the_account_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &json!({
            "providers": { "ms": { "type": "microsoft", "clientId": "c", "clientSecret": "s" } },
            "accounts": { "daemon": { "user": "d@contoso.com", "provider": "ms", "grant": "client_credentials" } }
        }),
    );
    let e = start(test_options(&cfg))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("accounts.daemon.grant: the client_credentials grant needs a specific tenant"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// Where token requests may go
// ---------------------------------------------------------------------------------------

/// Regression (#13 item 3): a token endpoint's redirect is never followed. A 307/308 used
/// to re-POST the refresh token and client secret to the `Location` host and serve its
/// token; a 302 became a GET. Every 3xx is now an error naming the target host (never
/// its path or query) with a hint to set `tokenUrl`, retried on the transient back-off
/// (not parked for `--permanent-retry`), and the second host never hears from us.
#[tokio::test]
async fn a_token_endpoint_redirect_is_never_followed_and_names_its_target_host() {
    let idp = MockIdp::start().await;
    let elsewhere = MockIdp::start().await;
    let statuses = [301u16, 302, 303, 307, 308];
    let accounts: serde_json::Map<String, Value> = statuses
        .iter()
        .map(|s| {
            (
                format!("r{s}"),
                json!({ "user": "u@example.com", "provider": "idp", "refreshToken": format!("refresh-token-secret-{s}") }),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    // At most half the first back-off (1 s): each request sees exactly its one attempt
    // (a longer hold would ride the retries, tests/outage.rs).
    let sc = start_config(
        dir.path(),
        json!({ "providers": { "idp": oauth2_provider(&idp) }, "accounts": accounts }),
        |o| o.policy.request_wait = Duration::from_millis(500),
    )
    .await;
    let c = client();
    for status in statuses {
        idp.set_fault(Fault::Redirect {
            status,
            location: elsewhere.url("/final/token?tenant=query-part"),
        });
        let account = format!("r{status}");
        let r = ask(
            &c,
            sc.local_addr,
            &format!("account={account}&proto=imap"),
            None,
        )
        .await;
        assert_eq!(r.status, 429, "{status}: {}", r.body);
        assert!(!r.body.to_string().contains("secret"), "{}", r.body);
        assert_eq!(elsewhere.calls(), 0, "{status}: the redirect was followed");
        let st = serde_json::to_value(status_of(&sc, &account)).unwrap();
        let err = &st[0]["lastError"];
        assert_eq!(err["code"], "redirect", "{status}: {st}");
        assert_eq!(err["class"], "transient", "{status}: {st}");
        assert_eq!(
            err["redirectHost"],
            elsewhere.addr.to_string(),
            "{status}: {st}"
        );
        assert!(
            err["hint"].as_str().unwrap_or("").contains("tokenUrl"),
            "{status}: {st}"
        );
        let text = st.to_string();
        assert!(
            !text.contains("query-part") && !text.contains("/final") && !text.contains("secret"),
            "{text}"
        );
        let retry = err["retryInSeconds"].as_u64().unwrap();
        assert!(retry <= 60, "{status}: parked for {retry} s");
    }
    assert_eq!(idp.calls(), statuses.len() as u64);
    sc.shutdown().await;
}

/// Regression (#13 item 3): a plain `http://` token URL would send client secrets and
/// refresh tokens in the clear; it is refused at load time, naming the field, unless the
/// host is loopback (tests, a local egress proxy).
#[test]
fn plain_http_token_urls_are_refused_unless_the_host_is_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |provider: Value| {
        json!({ "providers": { "idp": provider },
                "accounts": { "a": { "user": "u", "provider": "idp", "refreshToken": "rt" } } })
    };
    for provider in [
        json!({ "type": "oauth2", "tokenUrl": "http://idp.example/token", "clientId": "c" }),
        json!({ "type": "oauth2", "tokenUrl": "http://10.0.0.1:8080/token", "clientId": "c" }),
        json!({ "type": "oauth2", "tokenUrl": "http://127.0.0.1.example/token", "clientId": "c" }),
        json!({ "type": "microsoft", "clientId": "c", "tokenUrl": "http://login.example/t" }),
        json!({ "type": "google", "clientId": "c", "clientSecret": "s", "tokenUrl": "http://[2001:db8::1]/t" }),
    ] {
        let errors = parse_errors(cfg(provider.clone()), dir.path());
        let e = find(&errors, "providers.idp.tokenUrl");
        assert!(
            e.message.contains("https://") && e.message.contains("loopback"),
            "{provider}: {e:?}"
        );
    }
    for url in [
        "https://idp.example/token",
        "http://127.0.0.1:9/token",
        "http://127.8.9.10/token",
        "http://[::1]:9/token",
        "http://localhost:9/token",
    ] {
        let c = cfg(json!({ "type": "oauth2", "tokenUrl": url, "clientId": "c" }));
        if let Err(e) = config::parse(c.to_string().as_bytes(), dir.path()) {
            panic!("{url} refused: {e:?}");
        }
    }
}
