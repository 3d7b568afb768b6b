//! Shared test harness: a real in-test identity provider (a small hyper server that
//! counts calls and can fail, stall, rotate or reject on command) and helpers that
//! start the real sidecar on an ephemeral loopback port.

#![allow(dead_code)]

pub mod authz;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
// tokio's clock: the same as std's, except under a paused clock (`start_paused`), where
// what the mock records and checks is in virtual time, like the sidecar's own schedule.
use tokio::time::Instant;

#[allow(unused_imports)] // not every test file uses each of them
pub use ee_auth_sidecar::{start, Options, Running};

/// What the mock does with the next token requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer with this status, JSON body and optional Retry-After.
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Never answer.
    Stall,
    /// Close the connection without answering.
    Reset,
    /// 200 with an empty body.
    Empty,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with JSON but no access_token.
    NoAccessToken,
    /// 200 with exactly this body (odd `expires_in` values, odd tokens).
    Body(String),
    /// A redirect: this 3xx status with this `Location`.
    Redirect { status: u16, location: String },
}

impl Fault {
    /// A 400 invalid_grant answer (optionally with Microsoft's error_codes).
    pub fn invalid_grant(aadsts: Option<u64>) -> Fault {
        let body = match aadsts {
            Some(c) => format!(r#"{{"error":"invalid_grant","error_description":"AADSTS{c}: The refresh token has expired. Trace ID: x","error_codes":[{c}]}}"#),
            None => r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#.to_owned(),
        };
        Fault::Status {
            status: 400,
            body,
            retry_after: None,
        }
    }

    /// A bare status with an empty JSON object.
    pub fn status(status: u16, retry_after: Option<u64>) -> Fault {
        Fault::Status {
            status,
            body: "{}".into(),
            retry_after,
        }
    }
}

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub form: HashMap<String, String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub at: Instant,
}

impl Recorded {
    /// The `scope` the request asked for, if any.
    pub fn scope(&self) -> Option<&str> {
        self.form.get("scope").map(String::as_str)
    }
}

/// Checks a request the way a real provider would (its wire format). An `Err` is
/// recorded in [`IdpState::violations`] and answered 400 `invalid_request`.
#[derive(Clone)]
pub struct Validator(pub Arc<WireCheck>);

/// The function behind a [`Validator`].
pub type WireCheck = dyn Fn(&Recorded) -> Result<(), String> + Send + Sync;

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Validator")
    }
}

impl Validator {
    pub fn new(f: impl Fn(&Recorded) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Validator(Arc::new(f))
    }
}

/// The mock's state; tests read and change it through [`MockIdp`].
#[derive(Debug)]
pub struct IdpState {
    /// expires_in of issued tokens (seconds, may be fractional); None omits it.
    pub lifetime: Option<f64>,
    pub fault: Fault,
    /// When set, `fault` applies to this many more calls only; then the mock answers
    /// normally again (`Fault::None`).
    pub fault_calls: Option<u64>,
    /// Extra delay before answering.
    pub delay: Duration,
    /// Issue a new refresh token on every refresh_token grant.
    pub rotate: bool,
    /// When Some, only these refresh tokens are accepted (others: invalid_grant).
    pub valid_refresh_tokens: Option<HashSet<String>>,
    /// Refresh tokens already spent (rotated away).
    pub spent: HashSet<String>,
    /// Reuse of the token superseded last is forgiven this long (strict rotation grace).
    pub reuse_grace: Option<Duration>,
    /// The newest superseded token, when, and what replaced it.
    pub last_superseded: HashMap<String, (Instant, String)>,
    pub calls: u64,
    pub calls_by_grant: HashMap<String, u64>,
    pub requests: Vec<Recorded>,
    /// Access token -> expiry.
    pub issued: HashMap<String, Instant>,
    pub inflight: u64,
    pub peak_inflight: u64,
    pub reuse_detected: u64,
    /// Reuses forgiven by `reuse_grace` (a lost in-flight answer).
    pub reuse_forgiven: u64,
    /// Answer this fraction of otherwise healthy token requests with a bare 503.
    pub transient_failure_rate: f64,
    /// Pad access tokens to this many bytes (Microsoft JWTs are ~1.5–2.5 KB).
    pub token_bytes: usize,
    /// Each access token up to this many bytes longer or shorter than `token_bytes`
    /// (uniformly), as tokens of different users and claims are.
    pub token_spread: usize,
    /// Wire-format checks; None accepts anything.
    pub validator: Option<Validator>,
    /// What the validator refused, in order.
    pub violations: Vec<String>,
    /// Access token -> index in `requests` of the request it was issued for.
    pub issued_for: HashMap<String, usize>,
    /// Strict rotation across processes: the `client_id`s of sidecar processes the test
    /// killed. Reuse of the token a dead process spent last (its answer died with it) is
    /// forgiven; any other reuse is detected and listed in `reused`.
    pub dead_clients: HashSet<String>,
    /// Refresh token -> the `client_id` that spent it.
    pub spent_by: HashMap<String, String>,
    /// Reused refresh tokens that were not forgiven, with the client that reused it.
    pub reused: Vec<(String, String)>,
    counter: u64,
}

/// A running mock identity provider.
#[derive(Clone)]
pub struct MockIdp {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<IdpState>>,
}

impl MockIdp {
    /// Starts on 127.0.0.1:0, issuing 3600 s tokens.
    pub async fn start() -> MockIdp {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on a given loopback address (the load-test example binary uses this).
    pub async fn start_on(addr: &str) -> MockIdp {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(IdpState {
            lifetime: Some(3600.0),
            fault: Fault::None,
            fault_calls: None,
            delay: Duration::ZERO,
            rotate: false,
            valid_refresh_tokens: None,
            spent: HashSet::new(),
            reuse_grace: None,
            last_superseded: HashMap::new(),
            calls: 0,
            calls_by_grant: HashMap::new(),
            requests: Vec::new(),
            issued: HashMap::new(),
            inflight: 0,
            peak_inflight: 0,
            reuse_detected: 0,
            reuse_forgiven: 0,
            transient_failure_rate: 0.0,
            token_bytes: 0,
            token_spread: 0,
            validator: None,
            violations: Vec::new(),
            issued_for: HashMap::new(),
            dead_clients: HashSet::new(),
            spent_by: HashMap::new(),
            reused: Vec::new(),
            counter: 0,
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                if st.lock().unwrap().fault == Fault::Reset {
                    st.lock().unwrap().calls += 1;
                    let _ = stream.set_zero_linger();
                    drop(stream);
                    continue;
                }
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move {
                            // A keep-alive connection opened before a Reset fault dies
                            // too, without an answer (hyper closes it on a service error).
                            if st.lock().unwrap().fault == Fault::Reset {
                                st.lock().unwrap().calls += 1;
                                return Err(std::io::Error::other("reset by the mock"));
                            }
                            Ok(handle(st, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockIdp { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut IdpState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn calls(&self) -> u64 {
        self.with(|s| s.calls)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.with(|s| {
            s.fault = fault;
            s.fault_calls = None;
        });
    }

    /// `fault` for the next `calls` token requests, then normal answers (not for
    /// `Fault::Reset`, which acts on connections).
    pub fn set_fault_for(&self, fault: Fault, calls: u64) {
        self.with(|s| {
            s.fault = fault;
            s.fault_calls = Some(calls);
        });
    }

    /// When each token request arrived, in order.
    pub fn call_times(&self) -> Vec<Instant> {
        self.with(|s| s.requests.iter().map(|r| r.at).collect())
    }

    pub fn set_lifetime(&self, secs: Option<f64>) {
        self.with(|s| s.lifetime = secs);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }

    /// Installs wire-format checks for every following request.
    pub fn set_validator(&self, v: Validator) {
        self.with(|s| s.validator = Some(v));
    }

    /// What the validator refused so far.
    pub fn violations(&self) -> Vec<String> {
        self.with(|s| s.violations.clone())
    }

    /// The request an access token was issued for (the token must be one of the mock's).
    pub fn issued_request(&self, token: &str) -> Recorded {
        self.request_for(token)
            .unwrap_or_else(|| panic!("token {token} was not issued by the mock"))
    }

    /// The request an access token was issued for.
    pub fn request_for(&self, token: &str) -> Option<Recorded> {
        self.with(|s| {
            s.issued_for
                .get(token)
                .and_then(|i| s.requests.get(*i).cloned())
        })
    }

    /// Checks that an access token served to EmailEngine was issued here and is not
    /// expired right now.
    pub fn check_valid(&self, token: &str) -> Result<Duration, String> {
        self.with(|s| match s.issued.get(token) {
            None => Err(format!("token {token} was never issued")),
            Some(exp) => exp
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("token {token} served after its expiry")),
        })
    }
}

fn json(status: u16, body: String, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(ra) = retry_after {
        b = b.header("retry-after", ra.to_string());
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

async fn handle(
    st: Arc<Mutex<IdpState>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let (fault, delay, index, refused) = {
        let mut s = st.lock().unwrap();
        s.calls += 1;
        let grant = form.get("grant_type").cloned().unwrap_or_default();
        *s.calls_by_grant.entry(grant).or_default() += 1;
        let recorded = Recorded {
            path,
            form: form.clone(),
            authorization,
            content_type,
            at: Instant::now(),
        };
        let refused = s.validator.as_ref().and_then(|v| (v.0)(&recorded).err());
        if let Some(why) = &refused {
            s.violations.push(why.clone());
        }
        s.requests.push(recorded);
        s.inflight += 1;
        s.peak_inflight = s.peak_inflight.max(s.inflight);
        let mut fault = s.fault.clone();
        if let Some(left) = s.fault_calls {
            if left == 0 {
                fault = Fault::None;
            }
            // This call takes the fault; after the last one the mock answers normally.
            s.fault_calls = left.checked_sub(1).filter(|l| *l > 0);
            if s.fault_calls.is_none() {
                s.fault = Fault::None;
            }
        }
        if fault == Fault::None
            && s.transient_failure_rate > 0.0
            && fastrand::f64() < s.transient_failure_rate
        {
            fault = Fault::status(503, None);
        }
        (fault, s.delay, s.requests.len() - 1, refused)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let resp = match refused {
        Some(why) => json(
            400,
            serde_json::json!({ "error": "invalid_request", "error_description": why }).to_string(),
            None,
        ),
        None => answer(&st, &form, fault, index).await,
    };
    st.lock().unwrap().inflight -= 1;
    resp
}

async fn answer(
    st: &Arc<Mutex<IdpState>>,
    form: &HashMap<String, String>,
    fault: Fault,
    index: usize,
) -> Response<Full<Bytes>> {
    match fault {
        Fault::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return json(500, "{}".into(), None);
        }
        Fault::Status {
            status,
            body,
            retry_after,
        } => return json(status, body, retry_after),
        Fault::Empty => return json(200, String::new(), None),
        Fault::Garbage => return json(200, "<html>oops</html>".into(), None),
        Fault::NoAccessToken => {
            return json(
                200,
                r#"{"token_type":"Bearer","expires_in":3600}"#.into(),
                None,
            )
        }
        Fault::Body(body) => return json(200, body, None),
        Fault::Redirect { status, location } => {
            let mut resp = json(status, "{}".into(), None);
            resp.headers_mut()
                .insert("location", location.parse().unwrap());
            return resp;
        }
        Fault::Reset | Fault::None => {}
    }
    let mut s = st.lock().unwrap();
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    let mut new_rt = None;
    if grant == "refresh_token" {
        let Some(rt) = form.get("refresh_token").cloned() else {
            return json(400, r#"{"error":"invalid_request"}"#.into(), None);
        };
        let now = Instant::now();
        let client = form.get("client_id").cloned().unwrap_or_default();
        let lost_with_a_dead_process = s.last_superseded.contains_key(&rt)
            && s.spent_by
                .get(&rt)
                .is_some_and(|c| s.dead_clients.contains(c));
        let forgiven = lost_with_a_dead_process
            || s.last_superseded
                .get(&rt)
                .filter(|(at, _)| s.reuse_grace.is_some_and(|g| now.duration_since(*at) <= g))
                .is_some();
        let known = s
            .valid_refresh_tokens
            .as_ref()
            .is_none_or(|v| v.contains(&rt));
        if s.spent.contains(&rt) && !forgiven {
            s.reuse_detected += 1;
            s.reused.push((rt.clone(), client.clone()));
            return json(
                400,
                r#"{"error":"invalid_grant","error_description":"refresh token reused"}"#.into(),
                None,
            );
        }
        if !known && !forgiven {
            return json(
                400,
                r#"{"error":"invalid_grant","error_description":"unknown refresh token"}"#.into(),
                None,
            );
        }
        if s.rotate {
            s.counter += 1;
            let next = format!("rt-{}-{}", s.counter, fastrand::u64(..));
            s.spent.insert(rt.clone());
            s.spent_by.insert(rt.clone(), client);
            if let Some(v) = s.valid_refresh_tokens.as_mut() {
                // The superseded token stops being valid; only the grace can forgive it.
                v.remove(&rt);
                v.insert(next.clone());
            }
            // Only the token superseded last in each chain (account) is forgiven:
            // forget this chain's previous entry (the one whose successor was just
            // spent); other accounts' entries stay.
            s.last_superseded.retain(|_, (_, succ)| *succ != rt);
            if forgiven {
                s.reuse_forgiven += 1;
            }
            s.last_superseded.insert(rt, (now, next.clone()));
            new_rt = Some(next);
        }
    }
    s.counter += 1;
    let mut token = format!("at-{}-{}-", s.counter, fastrand::u64(..));
    let spread = s.token_spread.min(s.token_bytes);
    let length = s.token_bytes - spread + fastrand::usize(..=2 * spread);
    while token.len() < length {
        token.push(fastrand::alphanumeric());
    }
    let mut v = serde_json::json!({ "access_token": token, "token_type": "Bearer" });
    let lifetime = s.lifetime;
    if let Some(l) = lifetime {
        v["expires_in"] = if l.fract() == 0.0 {
            serde_json::json!(l as u64)
        } else {
            serde_json::json!(l)
        };
    }
    if let Some(rt) = new_rt {
        v["refresh_token"] = serde_json::json!(rt);
    }
    // Expiry as the provider sees it: from when it answers.
    let exp = Instant::now() + Duration::from_secs_f64(lifetime.unwrap_or(3600.0));
    s.issued_for.insert(token.clone(), index);
    s.issued.insert(token, exp);
    json(200, v.to_string(), None)
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, value: &serde_json::Value) -> PathBuf {
    let path = dir.join("accounts.json");
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

/// Options for a test sidecar on an ephemeral port; tests tweak the rest.
pub fn test_options(config: &Path) -> Options {
    let mut o = Options::new(config);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.reload_interval = Duration::from_secs(3600);
    o.prewarm_concurrency = 0;
    o.shutdown_grace = Duration::from_secs(2);
    o
}

/// A token answer from the sidecar.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn token(&self) -> &str {
        self.body["accessToken"]
            .as_str()
            .unwrap_or_else(|| panic!("no accessToken in {} {}", self.status, self.body))
    }
}

/// A keep-alive client for the sidecar.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `GET /v1/accounts/{account}` with the admin credentials `admin`: the account's status.
pub async fn admin_account(
    c: &reqwest::Client,
    addr: SocketAddr,
    account: &str,
    admin: (&str, &str),
) -> serde_json::Value {
    let r = c
        .get(format!("http://{addr}/v1/accounts/{account}"))
        .basic_auth(admin.0, Some(admin.1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET /v1/accounts/{account}");
    r.json().await.unwrap()
}

/// `GET /authentication?account=..&proto=..` with optional Basic credentials.
pub async fn ask(
    client: &reqwest::Client,
    addr: SocketAddr,
    query: &str,
    basic: Option<(&str, &str)>,
) -> Answer {
    let mut req = client.get(format!("http://{addr}/authentication?{query}"));
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("sidecar answered");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// A config of `n` accounts `a0`, `a1`, ... of one oauth2 provider `idp` (the mock),
/// with refresh tokens `rt-0`, `rt-1`, ...
pub fn oauth2_accounts(idp: &MockIdp, n: usize) -> serde_json::Value {
    let accounts: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| (format!("a{i}"), serde_json::json!({ "user": format!("u{i}@example.com"), "provider": "idp", "refreshToken": format!("rt-{i}") })))
        .collect();
    serde_json::json!({ "providers": { "idp": oauth2_provider(idp) }, "accounts": accounts })
}

/// A generic oauth2 provider entry pointing at the mock.
pub fn oauth2_provider(idp: &MockIdp) -> serde_json::Value {
    serde_json::json!({ "type": "oauth2", "tokenUrl": idp.url("/token"), "clientId": "client-1", "clientSecret": "client-secret-value" })
}

/// The cache's status of every credential set of `account`.
pub fn status_of(sc: &Running, account: &str) -> Vec<ee_auth_sidecar::status::KeyStatus> {
    sc.sidecar
        .cache()
        .status()
        .into_iter()
        .filter(|s| s.account == account)
        .collect()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// One request of an EmailEngine credential lookup, as the client saw it.
#[derive(Clone, Debug)]
pub struct LookupRequest {
    pub sent: Instant,
    pub answered: Instant,
    /// The HTTP status, or None for a network error.
    pub status: Option<u16>,
    pub retry_after: Option<u64>,
}

/// The outcome of one credential lookup (EmailEngine's `resolveCredentials`).
#[derive(Debug)]
pub struct Lookup {
    pub requests: Vec<LookupRequest>,
    /// The final answer's body when it was a 200.
    pub body: Option<serde_json::Value>,
}

impl Lookup {
    /// Whether the lookup succeeded (EmailEngine got credentials, nothing visible).
    pub fn succeeded(&self) -> bool {
        self.body.is_some()
    }

    /// When the lookup ended.
    pub fn ended(&self) -> Instant {
        self.requests
            .last()
            .map(|r| r.answered)
            .expect("at least one request")
    }
}

/// Makes one credential lookup the way EmailEngine 2.79 does (undici's RetryAgent:
/// `maxRetries` 5, `statusCodes: [429]`, `maxTimeout` 30 s; network errors retried too;
/// 90 s per request): a 429 is retried after `min(Retry-After, 30 s)` (no header: 0.5 s
/// doubling to 30 s), a connection error after 0.5 s doubling, any other status ends it.
pub async fn emailengine_lookup(
    addr: SocketAddr,
    query: &str,
    basic: Option<(&str, &str)>,
) -> Lookup {
    const MAX_RETRIES: u32 = 5;
    const MAX_TIMEOUT: Duration = Duration::from_secs(30);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        // undici's keepAliveTimeout: an idle connection is not reused after 4 s.
        .pool_idle_timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let mut lookup = Lookup {
        requests: Vec::new(),
        body: None,
    };
    for attempt in 0..=MAX_RETRIES {
        let mut req = client.get(format!("http://{addr}/authentication?{query}"));
        if let Some((u, p)) = basic {
            req = req.basic_auth(u, Some(p));
        }
        let sent = Instant::now();
        let backoff = Duration::from_millis(500)
            .saturating_mul(1 << attempt)
            .min(MAX_TIMEOUT);
        let delay = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let bytes = resp.bytes().await.unwrap_or_default();
                lookup.requests.push(LookupRequest {
                    sent,
                    answered: Instant::now(),
                    status: Some(status),
                    retry_after,
                });
                match status {
                    200..=299 => {
                        lookup.body = serde_json::from_slice(&bytes).ok();
                        return lookup;
                    }
                    429 => retry_after.map_or(backoff, |s| Duration::from_secs(s).min(MAX_TIMEOUT)),
                    _ => return lookup,
                }
            }
            Err(e) => {
                lookup.requests.push(LookupRequest {
                    sent,
                    answered: Instant::now(),
                    status: None,
                    retry_after: None,
                });
                if e.is_timeout() {
                    return lookup;
                }
                backoff
            }
        };
        if attempt < MAX_RETRIES {
            tokio::time::sleep(delay).await;
        }
    }
    lookup
}

/// The most upstream calls the back-off schedule allows in `span`, counting the first:
/// every delay at its shortest (jitter 0) and no shorter than the provider's Retry-After.
pub fn calls_allowed(
    policy: &ee_auth_sidecar::cache::schedule::Policy,
    retry_after: Option<Duration>,
    span: Duration,
) -> u32 {
    let (mut calls, mut at) = (1, Duration::ZERO);
    loop {
        at += ee_auth_sidecar::cache::schedule::backoff(calls, retry_after, policy, 0.0);
        if at > span {
            return calls;
        }
        calls += 1;
    }
}

/// Replaces a file the way an editor or the kubelet would: a whole new file at once.
pub fn write_atomic(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Makes a FIFO (named pipe) at `path`.
pub fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {} failed", path.display());
}

/// A sidecar's `/metrics` text (the scrape must answer 200, in Prometheus text format).
pub async fn scrape(c: &reqwest::Client, addr: SocketAddr) -> String {
    let resp = c
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(resp.status().as_u16(), 200, "/metrics");
    let content_type = resp.headers().get("content-type").cloned();
    assert!(
        content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain")),
        "Prometheus text format: {content_type:?}"
    );
    resp.text().await.unwrap()
}

/// The value of one sample in Prometheus text, `series` written exactly as exported
/// (`name` or `name{labels}`); `None` when it is not there.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?.trim();
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{series}: not a number: {value}")),
        )
    })
}

/// Holds tokio's paused clock still while it lives. Under `start_paused` the clock jumps
/// to the next timer whenever no task can run, including while the runtime waits for a
/// thread outside it: the sidecar loads its config (`start`, reloads) and renders the
/// admin list (`GET /v1/accounts`) on threads of their own, and without this the next
/// timer (a client's request timeout, a refresh) fires during that wait. A running
/// `spawn_blocking` task inhibits the jump (tokio's documented remedy), so such waits
/// take no virtual time. Await only I/O while frozen: a timer would never fire.
pub struct Frozen(Option<std::sync::mpsc::Sender<()>>);

/// See [`Frozen`].
pub fn freeze() -> Frozen {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    drop(tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    }));
    Frozen(Some(tx))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // The blocking task's `recv` returns: the clock may advance again.
        self.0.take();
    }
}

/// One sample of a sidecar's `/metrics` (`name` or `name{labels}`), `None` when absent.
pub async fn scraped(c: &reqwest::Client, addr: SocketAddr, series: &str) -> Option<f64> {
    sample(&scrape(c, addr).await, series)
}

/// One sample of a sidecar's `/metrics`, 0 while it is absent (a counter before its
/// first event).
pub async fn metric(c: &reqwest::Client, addr: SocketAddr, series: &str) -> f64 {
    scraped(c, addr, series).await.unwrap_or(0.0)
}

/// Polls `/readyz` until it answers 200 (true) or `timeout` passes (false).
pub async fn wait_ready(c: &reqwest::Client, addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = c.get(format!("http://{addr}/readyz")).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Resident memory of process `pid` in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The wall clock as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Lower-case hex SHA-256 of `s` (the state directory names its records so).
pub fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A real `redis-server` on a free loopback port, with no persistence unless asked,
/// stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    persistent: bool,
}

impl RedisServer {
    /// Starts one without persistence.
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// Starts one that keeps its data across [`RedisServer::restart`] (append-only file,
    /// fsync always).
    pub async fn start_persistent() -> RedisServer {
        Self::start_with(true).await
    }

    async fn start_with(persistent: bool) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent,
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(self.dir.path())
        .args(["--maxmemory-policy", "noeviction", "--loglevel", "warning"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server runs (apt-get install redis-server)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` against it; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILLs it (its data stays on disk when persistent).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The real sidecar binary, started with `args` plus `--listen 127.0.0.1:0 --log-format
/// json`; its WARN and ERROR lines are echoed to the test's stderr.
pub struct SidecarProc {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every log line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl SidecarProc {
    /// Starts `bin` (`env!("CARGO_BIN_EXE_ee-auth-sidecar")`, which examples that include
    /// this file do not have) and waits (20 s at most) for the address it logs.
    pub fn spawn(bin: &str, args: &[&str]) -> SidecarProc {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the sidecar binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        // Reads the log for the bound address, then keeps draining it so the child never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line.clone());
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
        SidecarProc { child, addr, log }
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (at most `limit`) for the exit status.
    pub async fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
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
                let _ = self.child.kill();
                panic!("still running {limit:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
