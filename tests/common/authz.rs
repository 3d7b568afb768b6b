//! A mock OAuth2 authorization server for the consent flows: a device authorization
//! endpoint that gives every RFC 8628 answer on command, an authorization endpoint that
//! checks PKCE S256 and `state` and redirects, and a token endpoint for the device code,
//! authorization code and refresh token grants, issuing an id_token that names who
//! signed in. The sidecar refreshes against the same token endpoint.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// What the token endpoint answers to the next device-code poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStep {
    Pending,
    SlowDown,
    Expired,
    Denied,
    /// The token endpoint is down for a moment: 503 `temporarily_unavailable`.
    Unavailable,
    /// The owner signed in: tokens.
    Approve,
}

#[derive(Debug, Default)]
pub struct AuthzState {
    /// Who signs in (the id_token's `email`).
    pub signed_in: String,
    /// The device authorization answer's `interval` and `expires_in` (seconds).
    pub interval: u64,
    pub expires_in: u64,
    /// Answers to the coming polls, in order; then `after_script`.
    pub script: VecDeque<DeviceStep>,
    pub after_script: Option<DeviceStep>,
    /// When each device-code poll arrived.
    pub polls: Vec<Instant>,
    /// Form of each device authorization request.
    pub device_requests: Vec<HashMap<String, String>>,
    /// Query of each authorization request.
    pub authorize_requests: Vec<HashMap<String, String>>,
    /// Form of each token request.
    pub token_requests: Vec<HashMap<String, String>>,
    /// Redirect with this `state` instead of the one sent (a forged redirect).
    pub tamper_state: Option<String>,
    /// Leave the id_token out of token answers.
    pub no_id_token: bool,
    /// Remember another PKCE challenge than the one sent (so the verifier will not match).
    pub tamper_challenge: bool,
    device_codes: HashSet<String>,
    /// Authorization code -> (PKCE challenge, redirect_uri).
    codes: HashMap<String, (String, String)>,
    pub refresh_tokens: HashSet<String>,
    /// What the authorization endpoint refused, and why.
    pub refusals: Vec<String>,
    counter: u64,
}

#[derive(Clone)]
pub struct MockAuthz {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<AuthzState>>,
}

impl MockAuthz {
    pub async fn start(signed_in: &str) -> MockAuthz {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(AuthzState {
            signed_in: signed_in.to_owned(),
            interval: 1,
            expires_in: 600,
            after_script: Some(DeviceStep::Approve),
            ..AuthzState::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::io::Error>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockAuthz { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut AuthzState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// A provider entry (`oauth2`) with all three endpoints of this server.
    pub fn provider(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "oauth2",
            "tokenUrl": self.url("/token"),
            "deviceAuthorizationUrl": self.url("/devicecode"),
            "authorizeUrl": self.url("/authorize"),
            "clientId": "consent-client",
            "clientSecret": "consent-client-secret",
        })
    }
}

fn answer(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(code: &str) -> Response<Full<Bytes>> {
    answer(400, serde_json::json!({ "error": code }))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An id_token naming `email` (signature not checked by the client; see src/consent.rs).
pub fn id_token(email: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(
            serde_json::json!({ "iss": "mock", "email": email, "preferred_username": email })
                .to_string()
                .as_bytes()
        ),
        b64(b"not-checked")
    )
}

fn tokens(s: &mut AuthzState) -> Response<Full<Bytes>> {
    s.counter += 1;
    let rt = format!("rt-consented-{}-{}", s.counter, fastrand::u64(..));
    s.refresh_tokens.insert(rt.clone());
    let mut v = serde_json::json!({
        "access_token": format!("at-consent-{}", s.counter),
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": rt,
    });
    if !s.no_id_token {
        v["id_token"] = serde_json::json!(id_token(&s.signed_in));
    }
    answer(200, v)
}

async fn handle(
    st: &Arc<Mutex<AuthzState>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let mut s = st.lock().unwrap();
    match path.as_str() {
        "/devicecode" => {
            s.device_requests.push(form);
            s.counter += 1;
            let code = format!("device-code-secret-{}", s.counter);
            s.device_codes.insert(code.clone());
            answer(
                200,
                serde_json::json!({
                    "device_code": code,
                    "user_code": "WDJB-MJHT",
                    "verification_uri": format!("http://{}/device", "mock.example"),
                    "expires_in": s.expires_in,
                    "interval": s.interval,
                }),
            )
        }
        "/authorize" => {
            s.authorize_requests.push(query.clone());
            let get = |k: &str| query.get(k).cloned().unwrap_or_default();
            let checks = [
                (get("response_type") == "code", "response_type must be code"),
                (
                    get("code_challenge_method") == "S256",
                    "code_challenge_method must be S256",
                ),
                (
                    get("code_challenge").len() == 43,
                    "code_challenge must be 43 characters",
                ),
                (get("state").len() >= 16, "state must be random"),
                (
                    get("redirect_uri").starts_with("http://127.0.0.1:"),
                    "redirect_uri must be loopback",
                ),
                (get("client_id") == "consent-client", "unknown client_id"),
            ];
            if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
                s.refusals.push((*why).to_owned());
                return Response::builder()
                    .status(400)
                    .body(Full::new(Bytes::from(*why)))
                    .unwrap();
            }
            s.counter += 1;
            let code = format!("auth-code-secret-{}", s.counter);
            let challenge = if s.tamper_challenge {
                b64(&[0u8; 32])
            } else {
                get("code_challenge")
            };
            s.codes
                .insert(code.clone(), (challenge, get("redirect_uri")));
            let state = s.tamper_state.clone().unwrap_or_else(|| get("state"));
            let location = format!(
                "{}?{}",
                get("redirect_uri"),
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs([("code", code.as_str()), ("state", state.as_str())])
                    .finish()
            );
            Response::builder()
                .status(302)
                .header("location", location)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        "/token" => {
            s.token_requests.push(form.clone());
            let get = |k: &str| form.get(k).cloned().unwrap_or_default();
            if get("client_id") != "consent-client"
                || get("client_secret") != "consent-client-secret"
            {
                return error("invalid_client");
            }
            match get("grant_type").as_str() {
                "urn:ietf:params:oauth:grant-type:device_code" => {
                    if !s.device_codes.contains(&get("device_code")) {
                        return error("invalid_grant");
                    }
                    s.polls.push(Instant::now());
                    let step = s
                        .script
                        .pop_front()
                        .or(s.after_script)
                        .unwrap_or(DeviceStep::Pending);
                    match step {
                        DeviceStep::Pending => error("authorization_pending"),
                        DeviceStep::SlowDown => error("slow_down"),
                        DeviceStep::Expired => error("expired_token"),
                        DeviceStep::Denied => error("access_denied"),
                        DeviceStep::Unavailable => answer(
                            503,
                            serde_json::json!({ "error": "temporarily_unavailable" }),
                        ),
                        DeviceStep::Approve => {
                            let code = get("device_code");
                            s.device_codes.remove(&code);
                            tokens(&mut s)
                        }
                    }
                }
                "authorization_code" => {
                    let Some((challenge, redirect)) = s.codes.remove(&get("code")) else {
                        return error("invalid_grant");
                    };
                    let digest = ring::digest::digest(
                        &ring::digest::SHA256,
                        get("code_verifier").as_bytes(),
                    );
                    if b64(digest.as_ref()) != challenge || redirect != get("redirect_uri") {
                        s.refusals
                            .push("PKCE verifier or redirect_uri does not match".into());
                        return error("invalid_grant");
                    }
                    tokens(&mut s)
                }
                "refresh_token" => {
                    if !s.refresh_tokens.contains(&get("refresh_token")) {
                        return error("invalid_grant");
                    }
                    s.counter += 1;
                    answer(
                        200,
                        serde_json::json!({
                            "access_token": format!("at-refreshed-{}", s.counter),
                            "token_type": "Bearer",
                            "expires_in": 3600,
                        }),
                    )
                }
                _ => error("unsupported_grant_type"),
            }
        }
        _ => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    }
}
