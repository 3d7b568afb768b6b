//! `GET /ui`: the operator page, behind the admin credentials. One server-rendered HTML
//! page of the accounts (a page of the admin list, built off the serving thread like
//! `GET /v1/accounts`, filtered by state), and for an account that needs consent a button
//! that starts a device sign-in in the sidecar and shows the URL and code to send to the
//! mailbox owner, then the result.
//!
//! Safe by construction: every value is HTML-escaped; no script at all (the sign-in page
//! refreshes itself with `<meta http-equiv=refresh>`); the one inline style is allowed by
//! its hash in a `Content-Security-Policy` that allows nothing else; the POST carries a
//! CSRF token that is an HMAC of the admin session's `Authorization` header under a
//! per-process random key; nothing secret (tokens, codes other than the user code,
//! client secrets) is ever put into a page.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use crate::consent::{self, DevicePrompt, Target};
use crate::error::ServeError;
use crate::shared::Sidecar;

/// Builds one page of the admin list as `GET /v1/accounts?<query>` answers it.
pub type ListFn = fn(Arc<Sidecar>, String) -> BoxFuture<'static, Result<Bytes, ServeError>>;

/// Accounts per page by default, and at most.
const PAGE: usize = 50;
const MAX_PAGE: usize = 500;
/// Sign-ins under way at most, and kept (finished ones) at most; the oldest finished
/// ones go first.
const MAX_SIGN_INS: usize = 64;
/// The largest form body read.
const MAX_FORM_BYTES: usize = 4096;

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.needs_consent,.failed{color:#a00}.backing_off,.aging{color:#a60}.fresh{color:#070}code{font-size:1.3em}";

/// A sign-in started from the page.
#[derive(Clone)]
enum SignIn {
    Starting,
    Waiting(DevicePrompt),
    Done(String),
    Failed(String),
}

/// The page's state: the CSRF key and the sign-ins, one per account.
pub struct Ui {
    /// None if the system had no randomness: then every POST is refused (fail closed).
    key: Option<ring::hmac::Key>,
    sign_ins: Mutex<Vec<(Arc<str>, SignIn)>>,
    http: OnceLock<reqwest::Client>,
}

impl Default for Ui {
    fn default() -> Self {
        Self::new()
    }
}

impl Ui {
    /// A fresh key: CSRF tokens of another process (or an earlier run) are refused.
    pub fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).ok();
        if key.is_none() {
            tracing::error!("no system randomness for the operator page's CSRF key: its sign-in buttons are refused");
        }
        Ui {
            key,
            sign_ins: Mutex::new(Vec::new()),
            http: OnceLock::new(),
        }
    }

    fn sign_ins(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<str>, SignIn)>> {
        self.sign_ins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sign_in(&self, account: &str) -> Option<SignIn> {
        self.sign_ins()
            .iter()
            .find(|(a, _)| &**a == account)
            .map(|(_, s)| s.clone())
    }

    fn set(&self, account: &Arc<str>, state: SignIn) {
        let mut all = self.sign_ins();
        all.retain(|(a, _)| a != account);
        all.push((account.clone(), state));
        while all.len() > MAX_SIGN_INS {
            match all
                .iter()
                .position(|(_, s)| matches!(s, SignIn::Done(_) | SignIn::Failed(_)))
            {
                Some(i) => {
                    all.remove(i);
                }
                None => break,
            }
        }
    }

    /// The CSRF token of an admin session: its `Authorization` header, MACed.
    fn csrf(&self, authorization: &[u8]) -> String {
        self.key.as_ref().map_or_else(String::new, |key| {
            let tag = ring::hmac::sign(key, authorization);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        })
    }

    fn csrf_ok(&self, authorization: &[u8], token: &str) -> bool {
        let Some(key) = &self.key else {
            return false;
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .is_ok_and(|tag| ring::hmac::verify(key, authorization, &tag).is_ok())
    }
}

/// `/ui` and `/ui/consent`.
pub async fn handle(
    sidecar: &Arc<Sidecar>,
    ui: &Arc<Ui>,
    req: Request<hyper::body::Incoming>,
    list: ListFn,
) -> Response<Full<Bytes>> {
    match handle_inner(sidecar, ui, req, list).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle_inner(
    sidecar: &Arc<Sidecar>,
    ui: &Arc<Ui>,
    req: Request<hyper::body::Incoming>,
    list: ListFn,
) -> Result<Response<Full<Bytes>>, ServeError> {
    let config = sidecar.config();
    let Some(auth) = &config.admin_auth else {
        return Err(ServeError::AdminClosed);
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    if !auth.matches(authorization.as_deref()) {
        return Err(ServeError::Unauthorized);
    }
    let authorization = authorization.unwrap_or_default();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ui") => {
            let offset: usize = query
                .get("offset")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let limit: usize = query
                .get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(PAGE)
                .clamp(1, MAX_PAGE);
            // Only the filters the page offers; anything else lists every account.
            let state = query
                .get("state")
                .filter(|s| FILTERS.iter().any(|(v, _)| v == s))
                .cloned();
            let mut api = format!("offset={offset}&limit={limit}");
            if let Some(s) = &state {
                api.push_str("&state=");
                api.extend(form_urlencoded::byte_serialize(s.as_bytes()));
            }
            let body = list(sidecar.clone(), api).await?;
            let csrf = ui.csrf(&authorization);
            // Proportional to the page (up to 500 accounts): off the serving thread too.
            let ui = ui.clone();
            let page = tokio::task::spawn_blocking(move || {
                let listing: Value = serde_json::from_slice(&body).ok()?;
                Some(render_list(&listing, state.as_deref(), limit, &csrf, &ui))
            })
            .await
            .ok()
            .flatten()
            .ok_or(ServeError::ListFailed)?;
            Ok(html(StatusCode::OK, &page))
        }
        (&Method::POST, "/ui/consent") => {
            let body = Limited::new(req.into_body(), MAX_FORM_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|_| ServeError::InvalidParameter {
                    name: "body",
                    expected: "a form of at most 4 KiB",
                })?;
            let form: HashMap<String, String> =
                form_urlencoded::parse(&body).into_owned().collect();
            let token = form.get("csrf").map(String::as_str).unwrap_or("");
            if !ui.csrf_ok(&authorization, token) {
                return Ok(html(
                    StatusCode::FORBIDDEN,
                    &page("Refused", "<p>This form did not come from this page (CSRF check). Reload the page and try again.</p>", None)));
            }
            let id = form.get("account").cloned().unwrap_or_default();
            let account = config.account(&id).ok_or(ServeError::UnknownAccount)?;
            let target = match Target::of(account, None) {
                Ok(t) => t,
                Err(e) => {
                    let text = format!("<p>{}</p>", esc(&e.to_string()));
                    return Ok(html(
                        StatusCode::BAD_REQUEST,
                        &page("Cannot sign in", &text, None),
                    ));
                }
            };
            if !start_sign_in(sidecar, ui, target) {
                let text = "<p>As many sign-ins as the page keeps are under way; try again when one has finished.</p>";
                return Ok(html(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &page("Busy", text, None),
                ));
            }
            let location = format!("/ui/consent?account={}", url_component(&id));
            let mut resp = html(StatusCode::SEE_OTHER, "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        (&Method::GET, "/ui/consent") => {
            let id = query.get("account").cloned().unwrap_or_default();
            let (body, refresh) = match ui.sign_in(&id) {
                None => ("<p>No sign-in was started for this account.</p>".to_owned(), false),
                Some(SignIn::Starting) => ("<p id=result>Asking the provider for a code…</p>".to_owned(), true),
                Some(SignIn::Waiting(p)) => (
                    format!(
                        "<p>Send this to the mailbox owner: open <a id=verify href=\"{u}\" rel=noreferrer>{u}</a> and enter the code</p><p><code id=code>{c}</code></p><p>valid for {m} minutes. <span id=result>Waiting for the sign-in…</span></p>",
                        u = esc(&p.verification_uri),
                        c = esc(&p.user_code),
                        m = p.expires_in.as_secs().div_ceil(60)
                    ),
                    true,
                ),
                Some(SignIn::Done(who)) => (
                    format!("<p id=result class=fresh>Signed in as {}; the token is stored and in use.</p>", esc(&who)),
                    false,
                ),
                Some(SignIn::Failed(why)) => (
                    format!("<p id=result class=failed>The sign-in failed: {}</p>", esc(&why)),
                    false,
                ),
            };
            let body = format!(
                "<h1>Sign-in for {}</h1>{body}<p><a href=\"/ui\">Back to the accounts</a></p>",
                esc(&id)
            );
            Ok(html(
                StatusCode::OK,
                &page("Sign-in", &body, refresh.then_some(2)),
            ))
        }
        (_, "/ui" | "/ui/consent") => Err(ServeError::MethodNotAllowed("GET, POST")),
        _ => Err(ServeError::NotFound),
    }
}

/// Starts the device sign-in of `target` in the background, unless one is under way.
/// False when [`MAX_SIGN_INS`] are under way already.
fn start_sign_in(sidecar: &Arc<Sidecar>, ui: &Arc<Ui>, target: Target) -> bool {
    {
        // Checked and claimed under one lock: two POSTs never start two sign-ins.
        let mut all = ui.sign_ins();
        let under_way = |s: &SignIn| matches!(s, SignIn::Starting | SignIn::Waiting(_));
        if all
            .iter()
            .any(|(a, s)| *a == target.account && under_way(s))
        {
            return true;
        }
        if all.iter().filter(|(_, s)| under_way(s)).count() >= MAX_SIGN_INS {
            return false;
        }
        all.retain(|(a, _)| *a != target.account);
        all.push((target.account.clone(), SignIn::Starting));
    }
    let (sidecar, ui) = (sidecar.clone(), ui.clone());
    tokio::spawn(async move {
        let account = target.account.clone();
        let http = match ui.http.get() {
            Some(h) => h.clone(),
            None => match crate::upstream::http_client(Duration::from_secs(30)) {
                Ok(h) => ui.http.get_or_init(|| h).clone(),
                Err(e) => {
                    ui.set(&account, SignIn::Failed(format!("HTTP client: {e}")));
                    return;
                }
            },
        };
        let prompt_ui = ui.clone();
        let got = consent::device_flow(&http, &target, |p| {
            prompt_ui.set(&target.account, SignIn::Waiting(p.clone()));
        })
        .await;
        let stored = match got {
            Ok(c) => {
                // A refresh of the account under way finishes (and writes any rotation)
                // first: the consented token is the one left.
                let account: Arc<str> = Arc::from(target.account.as_ref());
                let upstream = sidecar.cache().upstream().clone();
                let _held = upstream.hold_account(&account).await;
                consent::store(sidecar.token_store(), &target, c, false).await
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(who) => {
                tracing::info!(account = %account, "consent from the operator page: refresh token stored");
                ui.set(&account, SignIn::Done(who.unwrap_or_default()));
                crate::pickup::refresh(&sidecar, &account);
            }
            Err(e) => {
                tracing::warn!(account = %account, error = %e, "consent from the operator page failed");
                ui.set(&account, SignIn::Failed(e.to_string()));
            }
        }
    });
    true
}

/// How the page names a credential set's state.
fn label(set: &Value) -> &'static str {
    match set["state"].as_str().unwrap_or("") {
        "needs_consent" => "needs consent",
        "failed_permanent" => "failed",
        "failing_transient" => "backing off",
        "refreshing" => "refreshing",
        "idle" => "idle",
        _ => match set["tokenRemainingSeconds"].as_u64() {
            Some(left) if left > 600 => "fresh",
            _ => "aging",
        },
    }
}

/// The states the filter offers: the admin API's names, as the page shows them.
const FILTERS: [(&str, &str); 6] = [
    ("ok", "fresh or aging"),
    ("refreshing", "refreshing"),
    ("failing_transient", "backing off"),
    ("failed_permanent", "failed"),
    ("needs_consent", "needs consent"),
    ("idle", "idle"),
];

fn render_list(listing: &Value, state: Option<&str>, limit: usize, csrf: &str, ui: &Ui) -> String {
    let mut b = String::with_capacity(16 * 1024);
    let total = listing["total"].as_u64().unwrap_or(0);
    let offset = listing["offset"].as_u64().unwrap_or(0);
    let _ = write!(b, "<h1>ee-auth-sidecar accounts</h1><form method=get action=\"/ui\"><label>State <select name=state><option value=\"\">any</option>");
    for (value, name) in FILTERS {
        let selected = if state == Some(value) {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option value=\"{value}\"{selected}>{name}</option>");
    }
    let _ = write!(
        b,
        "</select></label> <input type=hidden name=limit value=\"{limit}\"><button type=submit>Filter</button></form><p id=total>{total} account(s)</p><table><thead><tr><th>Account</th><th>Protocols</th><th>State</th><th>Token expires</th><th>Last error</th><th></th></tr></thead><tbody>"
    );
    for account in listing["accounts"].as_array().into_iter().flatten() {
        let id = account["id"].as_str().unwrap_or("");
        let sets = account["credentialSets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if sets.is_empty() {
            let _ = write!(b, "<tr data-account=\"{}\"><td>{}</td><td></td><td>fixed</td><td></td><td></td><td></td></tr>", esc(id), esc(id));
            continue;
        }
        let mut button_shown = false;
        for set in &sets {
            let lbl = label(set);
            let protocols: Vec<&str> = set["protocols"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let expires = set["tokenExpiresAt"].as_str().unwrap_or("");
            let error = match set.get("lastError").filter(|e| !e.is_null()) {
                Some(e) => format!(
                    "{}{}{}",
                    esc(e["code"].as_str().unwrap_or("")),
                    e["providerCode"]
                        .as_str()
                        .map(|c| format!(" ({})", esc(c)))
                        .unwrap_or_default(),
                    e["hint"]
                        .as_str()
                        .map(|h| format!(": {}", esc(h)))
                        .unwrap_or_default()
                ),
                None => String::new(),
            };
            // Also for a refused grant: signing in again is the fix (re-consent).
            let revoked =
                lbl == "failed" && set["lastError"]["code"].as_str() == Some("invalid_grant");
            let action = if (lbl == "needs consent" || revoked) && !button_shown {
                button_shown = true;
                match ui.sign_in(id) {
                    Some(SignIn::Starting | SignIn::Waiting(_)) => format!("<a href=\"/ui/consent?account={}\">sign-in under way</a>", esc(&url_component(id))),
                    _ => format!(
                        "<form method=post action=\"/ui/consent\"><input type=hidden name=account value=\"{}\"><input type=hidden name=csrf value=\"{}\"><button type=submit class=consent>Start sign-in</button></form>",
                        esc(id),
                        esc(csrf)
                    ),
                }
            } else {
                String::new()
            };
            let _ = write!(
                b,
                "<tr data-account=\"{a}\" data-state=\"{cls}\"><td>{a}</td><td>{p}</td><td class=\"{cls}\">{lbl}</td><td>{x}</td><td>{error}</td><td>{action}</td></tr>",
                a = esc(id),
                p = esc(&protocols.join(", ")),
                cls = lbl.replace(' ', "_"),
                x = esc(expires),
            );
        }
    }
    b.push_str("</tbody></table><p>");
    let link = |offset: u64, text: &str| {
        let mut q = format!("offset={offset}&limit={limit}");
        if let Some(s) = state {
            q.push_str("&state=");
            q.push_str(&url_component(s));
        }
        format!("<a href=\"/ui?{}\">{text}</a> ", esc(&q))
    };
    if offset > 0 {
        b.push_str(&link(offset.saturating_sub(limit as u64), "previous page"));
    }
    if let Some(next) = listing["nextOffset"].as_u64() {
        b.push_str(&link(next, "next page"));
    }
    b.push_str("</p>");
    page("Accounts", &b, None)
}

fn page(title: &str, body: &str, refresh_secs: Option<u32>) -> String {
    let refresh = refresh_secs
        .map(|s| format!("<meta http-equiv=refresh content=\"{s}\">"))
        .unwrap_or_default();
    format!("<!doctype html><html lang=en><head><meta charset=utf-8><title>{} – ee-auth-sidecar</title>{refresh}<style>{STYLE}</style></head><body>{body}</body></html>", esc(title))
}

/// The page's headers: no caching, no framing, and a policy that allows only the page's
/// own inline style (by hash) and forms posting back here.
fn html(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    static CSP: OnceLock<String> = OnceLock::new();
    let csp = CSP.get_or_init(|| {
        let hash = ring::digest::digest(&ring::digest::SHA256, STYLE.as_bytes());
        format!(
            "default-src 'none'; style-src 'sha256-{}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            base64::engine::general_purpose::STANDARD.encode(hash.as_ref())
        )
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

/// HTML-escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn url_component(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_attributes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("a\nb"), "a\u{fffd}b");
    }

    #[test]
    fn csrf_tokens_are_tied_to_the_session_and_the_process() {
        let ui = Ui::new();
        let t = ui.csrf(b"Basic YWRtaW46cA==");
        assert!(ui.csrf_ok(b"Basic YWRtaW46cA==", &t));
        assert!(!ui.csrf_ok(b"Basic b3RoZXI6cA==", &t), "another session");
        assert!(
            !Ui::new().csrf_ok(b"Basic YWRtaW46cA==", &t),
            "another process"
        );
        assert!(!ui.csrf_ok(b"Basic YWRtaW46cA==", ""));
    }
}
