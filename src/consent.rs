//! Getting an account's refresh token from the person who owns the mailbox: the device
//! flow (RFC 8628) and the browser flow (authorization code with PKCE, RFC 7636), the
//! check that the person who signed in is the account's `user`, and storing the token as
//! a re-consent in the state store.
//!
//! Nothing secret is printed or logged: the device code, the authorization code, the PKCE
//! verifier, the tokens and the id_token stay in memory; what is shown is the URL to open
//! and the user code, which are meant for the mailbox owner.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::config::{Account, AccountKind, CredentialSet};
use crate::credentials::Grant;
use crate::protocol::Proto;
use crate::provider::{ConsentClient, ConsentFlow};
use crate::secret::Secret;
use crate::state::{StateError, TokenStore};

/// The most the device flow waits for the sign-in, whatever the provider says.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(30 * 60);
/// The device flow's polling interval when the provider names none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The bounds of a polling interval a provider may ask for.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// What `slow_down` adds to the interval (RFC 8628 §3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The largest answer read from an authorization server.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a consent did not store a token. Messages name what to do and carry no secret.
#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    /// The account is not in the config.
    #[error("no account `{0}` in the config")]
    UnknownAccount(String),
    /// A password, static-token or app-only account.
    #[error("account `{account}` {why}: it needs no consent")]
    NothingToConsent {
        /// The account.
        account: String,
        /// What it is.
        why: &'static str,
    },
    /// The provider has no endpoint for the flow asked for.
    #[error("provider `{provider}` has no {what} endpoint for the {} flow; set `{field}` in its config, or use --flow {}", .flow.as_str(), if *.flow == ConsentFlow::Device { "browser" } else { "device" })]
    NoEndpoint {
        /// The provider's name.
        provider: String,
        /// The flow.
        flow: ConsentFlow,
        /// The endpoint's name.
        what: &'static str,
        /// The config field that sets it.
        field: &'static str,
    },
    /// The device code expired before the sign-in finished.
    #[error("the code expired before the sign-in was finished (expired_token); run `consent` again and finish the sign-in within {}", humantime::format_duration(*.0))]
    Expired(Duration),
    /// The mailbox owner declined.
    #[error("the sign-in was declined (access_denied); nothing was stored")]
    Denied,
    /// The authorization server refused, with this OAuth2 error code.
    #[error("the authorization server refused: {code}{}", .hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Refused {
        /// The OAuth2 `error` (or `http_<status>`).
        code: String,
        /// What it likely means.
        hint: Option<&'static str>,
    },
    /// The authorization server could not be reached.
    #[error("cannot reach the authorization server: {0}")]
    Network(String),
    /// An answer that is not what the protocol says.
    #[error("the authorization server's answer is unusable: {0}")]
    Invalid(&'static str),
    /// The token answer has no refresh token.
    #[error("the provider issued no refresh token; for Microsoft the app needs `offline_access`, for Google the consent must be offline (the browser flow asks for it)")]
    NoRefreshToken,
    /// Someone other than the account's user signed in.
    #[error("signed in as `{signed_in}`, but account `{account}` is for `{user}`: refused, nothing was stored (a token of another mailbox would serve the wrong mail); sign in as `{user}`, or pass --accept-user if this identity is really meant to serve the account")]
    WrongUser {
        /// The account.
        account: String,
        /// Its configured user.
        user: String,
        /// Who signed in.
        signed_in: String,
    },
    /// The answer does not say who signed in.
    #[error("the token answer has no id_token naming who signed in, so it cannot be checked against `{user}`: refused, nothing was stored; pass --accept-user to store it anyway")]
    NoIdentity {
        /// The account's user.
        user: String,
    },
    /// The redirect did not carry the `state` this flow sent.
    #[error("the sign-in redirect carries a state that this consent did not send: refused (a forged or stale redirect); open the URL printed by this run")]
    StateMismatch,
    /// The redirect reported an error.
    #[error("the sign-in ended with {0}; nothing was stored")]
    Authorize(String),
    /// The browser flow timed out.
    #[error("the sign-in did not finish within {}; run `consent` again (or give it more time with --timeout)", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The redirect listener could not be started.
    #[error("cannot listen for the sign-in redirect on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The token could not be stored.
    #[error("cannot store the refresh token: {0}")]
    State(#[from] StateError),
}

/// What the consent of one account needs from the config.
#[derive(Debug)]
pub struct Target {
    /// The account id.
    pub account: Arc<str>,
    /// The mailbox user the signed-in identity must match.
    pub user: Arc<str>,
    /// The provider's name (messages).
    pub provider: Arc<str>,
    /// Its client.
    pub client: ConsentClient,
    /// The scopes to ask for.
    pub scopes: Vec<String>,
    /// The config's refresh token, whose digest is the stored token's origin.
    pub config_token: Option<Secret>,
}

impl Target {
    /// The consent target of `account`: the scopes of its credential sets (only the set
    /// of `proto`, if given) that spend its refresh token, plus what identifies the user
    /// (`openid email`) and what the provider needs for a refresh token.
    pub fn of(account: &Account, proto: Option<Proto>) -> Result<Target, ConsentError> {
        let id = account.id.to_string();
        let AccountKind::OAuth(o) = &account.kind else {
            return Err(ConsentError::NothingToConsent {
                account: id,
                why: "is a password or static-token account",
            });
        };
        let sets: Vec<&Arc<CredentialSet>> = match proto {
            Some(p) => vec![o.set_for(Some(p))],
            None => o.sets(),
        };
        let sets: Vec<&Arc<CredentialSet>> = sets
            .into_iter()
            .filter(|s| s.grant == Grant::RefreshToken)
            .collect();
        let Some(first) = sets.first() else {
            return Err(ConsentError::NothingToConsent {
                account: id,
                why: "uses no refresh_token grant",
            });
        };
        let Some(client) = first.provider.consent_client() else {
            return Err(ConsentError::NothingToConsent {
                account: id,
                why: "uses a provider without user sign-in",
            });
        };
        // Microsoft's v2 endpoint takes the scopes of one resource per request (Outlook's
        // or Graph's); one consent per resource, and the refresh token serves both.
        let one_resource = matches!(*first.provider, crate::provider::Provider::Microsoft(_));
        let resource = first.scopes.iter().find_map(|s| resource_of(s));
        let mut scopes: Vec<String> = Vec::new();
        let wanted = sets
            .iter()
            .flat_map(|s| s.scopes.iter().cloned())
            .filter(|s| !one_resource || resource_of(s).is_none() || resource_of(s) == resource)
            .chain(["openid", "email"].map(str::to_owned))
            .chain(client.extra_scopes.iter().map(|s| (*s).to_owned()));
        for s in wanted {
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        Ok(Target {
            account: account.id.clone(),
            user: first.user.clone(),
            provider: first.provider_name.clone(),
            client,
            scopes,
            config_token: first.refresh_token.clone(),
        })
    }

    /// The origin the stored token is recorded with: the config token's digest, or none.
    pub fn origin(&self) -> [u8; 32] {
        self.config_token.as_ref().map_or([0; 32], Secret::digest)
    }

    fn endpoint(&self, flow: ConsentFlow) -> Result<&str, ConsentError> {
        let (url, what, field) = match flow {
            ConsentFlow::Device => (
                &self.client.device_authorization_url,
                "device authorization",
                "deviceAuthorizationUrl",
            ),
            ConsentFlow::Browser => (&self.client.authorize_url, "authorization", "authorizeUrl"),
        };
        url.as_deref().ok_or_else(|| ConsentError::NoEndpoint {
            provider: self.provider.to_string(),
            flow,
            what,
            field,
        })
    }
}

/// What a successful sign-in gave.
pub struct Consented {
    /// The refresh token.
    pub refresh_token: Secret,
    /// The id_token, if the answer had one.
    pub id_token: Option<Secret>,
}

/// What the mailbox owner is asked to do in the device flow (nothing secret).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePrompt {
    /// Where to sign in.
    pub verification_uri: String,
    /// The code to type in there.
    pub user_code: String,
    /// How long the code is valid.
    #[serde(skip)]
    pub expires_in: Duration,
}

#[derive(Deserialize)]
struct DeviceAnswer {
    device_code: String,
    user_code: String,
    // Google calls it `verification_url`.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    expires_in: Option<f64>,
    #[serde(default)]
    interval: Option<f64>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: Option<String>,
}

/// One form POST to the authorization server: the status and the body (bounded).
async fn post(
    http: &reqwest::Client,
    url: &str,
    client: &ConsentClient,
    form: &[(&str, &str)],
    authenticate: bool,
) -> Result<(u16, bytes::Bytes), ConsentError> {
    let mut form: Vec<(&str, &str)> = form.to_vec();
    let mut req = http
        .post(url)
        .header(reqwest::header::ACCEPT, "application/json");
    match (&client.client_secret, client.basic_auth && authenticate) {
        (Some(secret), true) => {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            req = req.basic_auth(enc(&client.client_id), Some(enc(secret.expose())));
        }
        (secret, _) => {
            form.push(("client_id", &client.client_id));
            if let (Some(s), true) = (secret, authenticate) {
                form.push(("client_secret", s.expose()));
            }
        }
    }
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&form)
        .finish();
    let mut resp = req
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .map_err(|e| ConsentError::Network(innermost(&e)))?;
    let status = resp.status().as_u16();
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ConsentError::Network(innermost(&e)))?
    {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ConsentError::Invalid("larger than any OAuth2 answer"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((status, out.into()))
}

/// The OAuth2 `error` of a refusal, or `http_<status>` (a printable, bounded code only).
fn error_code(status: u16, body: &[u8]) -> String {
    serde_json::from_slice::<ErrorAnswer>(body)
        .ok()
        .and_then(|e| e.error)
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| format!("http_{status}"))
}

fn refused(code: String) -> ConsentError {
    let hint = match code.as_str() {
        "invalid_client" | "unauthorized_client" => Some(
            "check clientId and clientSecret; Microsoft's device flow needs \"Allow public client flows\" on the app registration",
        ),
        "invalid_scope" => Some("the app is not allowed these scopes; check the app registration"),
        "invalid_grant" => Some("the code or verifier was not accepted"),
        _ => None,
    };
    ConsentError::Refused { code, hint }
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// A token answer: its refresh token (required) and id_token.
fn consented(body: &[u8]) -> Result<Consented, ConsentError> {
    let answer: TokenAnswer = serde_json::from_slice(body)
        .map_err(|_| ConsentError::Invalid("the token answer is not a JSON object"))?;
    let refresh_token = answer
        .refresh_token
        .filter(|t| !t.is_empty())
        .ok_or(ConsentError::NoRefreshToken)?;
    Ok(Consented {
        refresh_token: Secret::new(refresh_token),
        id_token: answer.id_token.filter(|t| !t.is_empty()).map(Secret::new),
    })
}

/// A duration in seconds from an answer, clamped to `min..=max` (`default` when absent
/// or not a positive number).
fn seconds(v: Option<f64>, default: Duration, min: Duration, max: Duration) -> Duration {
    v.filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::try_from_secs_f64(s.min(max.as_secs_f64())).unwrap_or(max))
        .unwrap_or(default)
        .clamp(min, max)
}

/// Now plus `d`, saturating far in the future.
fn later(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(MAX_DEVICE_WAIT))
        .unwrap_or(now)
}

/// The device flow (RFC 8628): asks for a device code, hands the prompt (URL and user
/// code) to `prompt`, then polls the token endpoint as the server says (`interval`,
/// `slow_down`, `authorization_pending`) until the owner signs in, declines, or the code
/// expires (at most [`MAX_DEVICE_WAIT`]).
pub async fn device_flow(
    http: &reqwest::Client,
    target: &Target,
    prompt: impl FnOnce(&DevicePrompt),
) -> Result<Consented, ConsentError> {
    let url = target.endpoint(ConsentFlow::Device)?;
    let scope = target.scopes.join(" ");
    let (status, body) = post(http, url, &target.client, &[("scope", &scope)], false).await?;
    if !(200..300).contains(&status) {
        return Err(refused(error_code(status, &body)));
    }
    let answer: DeviceAnswer = serde_json::from_slice(&body).map_err(|_| {
        ConsentError::Invalid(
            "the device authorization answer lacks device_code, user_code or verification_uri",
        )
    })?;
    let expires_in = seconds(
        answer.expires_in,
        Duration::from_secs(15 * 60),
        MIN_INTERVAL,
        MAX_DEVICE_WAIT,
    );
    let mut interval = seconds(
        answer.interval,
        DEFAULT_INTERVAL,
        MIN_INTERVAL,
        MAX_INTERVAL,
    );
    // Shown as given; a URL that would not open in a browser is not worth showing.
    if !answer.verification_uri.starts_with("https://")
        && !answer.verification_uri.starts_with("http://")
    {
        return Err(ConsentError::Invalid(
            "verification_uri is not an http(s) URL",
        ));
    }
    prompt(&DevicePrompt {
        verification_uri: answer.verification_uri.chars().take(2048).collect(),
        user_code: answer.user_code.chars().take(64).collect(),
        expires_in,
    });
    let deadline = later(expires_in);
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", answer.device_code.as_str()),
    ];
    loop {
        let next = later(interval);
        if next > deadline {
            return Err(ConsentError::Expired(expires_in));
        }
        tokio::time::sleep_until(next).await;
        // RFC 8628 §3.5: a connection that fails, or a server that is down for a moment,
        // backs off (twice the interval) rather than ending a sign-in the owner may
        // already be finishing.
        let back_off = interval.saturating_mul(2).min(MAX_INTERVAL);
        let (status, body) =
            match post(http, &target.client.token_url, &target.client, &form, true).await {
                Ok(answer) => answer,
                Err(ConsentError::Network(_)) => {
                    interval = back_off;
                    continue;
                }
                Err(e) => return Err(e),
            };
        if (200..300).contains(&status) {
            return consented(&body);
        }
        match error_code(status, &body).as_str() {
            "authorization_pending" => {}
            "slow_down" => interval = interval.saturating_add(SLOW_DOWN_STEP).min(MAX_INTERVAL),
            "temporarily_unavailable" => interval = back_off,
            _ if status >= 500 => interval = back_off,
            "expired_token" => return Err(ConsentError::Expired(expires_in)),
            // Microsoft answers a declined sign-in with its own code.
            "access_denied" | "authorization_declined" => return Err(ConsentError::Denied),
            other => return Err(refused(other.to_owned())),
        }
    }
}

/// The largest request head the redirect listener reads.
const MAX_REDIRECT_HEAD: usize = 8 * 1024;
/// How long one connection to the redirect listener may take to send its request.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// 32 random bytes, base64url: a `state` or a PKCE verifier (RFC 7636 §4.1: 43 characters).
fn random_token() -> Result<String, ConsentError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ConsentError::Invalid("no system randomness for state and PKCE"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The browser flow: authorization code with PKCE S256 and a random `state`, the redirect
/// received by a one-shot listener on 127.0.0.1 (`port`, 0 for any). `open` gets the URL
/// to open. Ends with the first redirect to `/callback` (a wrong `state` is refused), or
/// after `timeout`.
pub async fn browser_flow(
    http: &reqwest::Client,
    target: &Target,
    port: u16,
    timeout: Duration,
    open: impl FnOnce(&str),
) -> Result<Consented, ConsentError> {
    let authorize = target.endpoint(ConsentFlow::Browser)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ConsentError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ConsentError::Listen { addr, source })?;
    let redirect_uri = format!("http://127.0.0.1:{}/callback", bound.port());
    let state = random_token()?;
    let verifier = Secret::new(random_token()?);
    let scope = target.scopes.join(" ");
    let challenge = pkce_challenge(verifier.expose());
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("response_type", "code"),
            ("client_id", target.client.client_id.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("scope", scope.as_str()),
            ("state", state.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            // Google issues a refresh token only for offline access, and again on a
            // re-consent only when the consent screen is shown; others ignore these.
            ("access_type", "offline"),
            ("prompt", "consent"),
        ])
        .finish();
    let sep = if authorize.contains('?') { '&' } else { '?' };
    open(&format!("{authorize}{sep}{query}"));
    let code = tokio::time::timeout(timeout, receive_code(&listener, &state))
        .await
        .map_err(|_| ConsentError::Timeout(timeout))??;
    drop(listener);
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", redirect_uri.as_str()),
        ("code_verifier", verifier.expose()),
    ];
    let (status, body) = post(http, &target.client.token_url, &target.client, &form, true).await?;
    if !(200..300).contains(&status) {
        return Err(refused(error_code(status, &body)));
    }
    consented(&body)
}

/// Waits for the redirect to `/callback` and answers the browser; other paths (a
/// favicon) get a 404 and the wait goes on.
async fn receive_code(
    listener: &tokio::net::TcpListener,
    state: &str,
) -> Result<Secret, ConsentError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let mut head = Vec::new();
        let read = tokio::time::timeout(REDIRECT_READ_TIMEOUT, async {
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REDIRECT_HEAD {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        if read.is_err() {
            continue;
        }
        let line = String::from_utf8_lossy(&head);
        let target = line
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != "/callback" {
            let _ = stream.write_all(&page(404, "Not found.")).await;
            continue;
        }
        let mut code = None;
        let mut got_state = None;
        let mut error = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "code" => code = Some(Secret::new(v.into_owned())),
                "state" => got_state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        // Compared in constant time: the state is what ties the redirect to this run.
        let state_ok = got_state.as_deref().is_some_and(|s| {
            use subtle::ConstantTimeEq;
            s.len() == state.len() && bool::from(s.as_bytes().ct_eq(state.as_bytes()))
        });
        if !state_ok {
            let _ = stream
                .write_all(&page(400, "Refused: this sign-in was not started here (state mismatch). Nothing was stored."))
                .await;
            return Err(ConsentError::StateMismatch);
        }
        if let Some(e) = error {
            let code: String = e.chars().filter(char::is_ascii_graphic).take(64).collect();
            let _ = stream
                .write_all(&page(
                    400,
                    "The sign-in did not complete. Nothing was stored.",
                ))
                .await;
            return Err(ConsentError::Authorize(code));
        }
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            let _ = stream.write_all(&page(400, "No authorization code.")).await;
            return Err(ConsentError::Invalid("the redirect has no code"));
        };
        let _ = stream
            .write_all(&page(
                200,
                "Signed in. You can close this tab; the consent command finishes the rest.",
            ))
            .await;
        return Ok(code);
    }
}

/// A minimal HTML answer for the browser.
fn page(status: u16, text: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>ee-auth-sidecar consent</title><p>{text}</p>\n"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nContent-Security-Policy: default-src 'none'\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Who signed in, as the id_token says (`email`, `preferred_username` or `upn`), if it
/// matches `user`; else the first of them, to name in the refusal.
///
/// The payload is decoded, not verified: the id_token came straight from the token
/// endpoint over TLS in answer to this client's own request (OpenID Connect Core
/// §3.1.3.7: the TLS server validation may be used instead of checking the signature),
/// and the check guards against a wrong person signing in, not against a forged server.
pub fn identity_matches(id_token: &Secret, user: &str) -> Result<(), Option<String>> {
    let payload = id_token
        .expose()
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok());
    let Some(payload) = payload else {
        return Err(None);
    };
    // `email` only when the provider says it verified it: Microsoft's is whatever the
    // signer's tenant admin typed (its identity is `preferred_username` / `upn`), and
    // Google marks an unverified one.
    let verified = matches!(
        payload.get("email_verified"),
        Some(serde_json::Value::Bool(true))
    ) || payload.get("email_verified").and_then(|v| v.as_str()) == Some("true");
    let names: Vec<&str> = ["email", "preferred_username", "upn"]
        .iter()
        .filter(|claim| **claim != "email" || verified)
        .filter_map(|claim| payload.get(*claim).and_then(|v| v.as_str()))
        .collect();
    if names.iter().any(|n| n.eq_ignore_ascii_case(user)) {
        return Ok(());
    }
    Err(names
        .first()
        .map(|n| n.chars().filter(|c| !c.is_control()).take(256).collect()))
}

/// Checks the signed-in identity (unless `accept_user`) and stores the refresh token as
/// the account's newest: it replaces any rotated one, and a running sidecar picks it up.
/// Returns who signed in, when the id_token said.
pub async fn store(
    store: &Arc<TokenStore>,
    target: &Target,
    consented: Consented,
    accept_user: bool,
) -> Result<Option<String>, ConsentError> {
    let identity = match &consented.id_token {
        Some(t) => identity_matches(t, &target.user),
        None => Err(None),
    };
    let signed_in = match identity {
        Ok(()) => Some(target.user.to_string()),
        Err(other) if accept_user => other,
        Err(Some(signed_in)) => {
            return Err(ConsentError::WrongUser {
                account: target.account.to_string(),
                user: target.user.to_string(),
                signed_in,
            })
        }
        Err(None) => {
            return Err(ConsentError::NoIdentity {
                user: target.user.to_string(),
            })
        }
    };
    store
        .rotate(&target.account, target.origin(), consented.refresh_token)
        .await?;
    Ok(signed_in)
}

/// The resource a scope URL names (`https://graph.microsoft.com/` of
/// `https://graph.microsoft.com/.default`); none for a bare scope such as `openid`.
fn resource_of(scope: &str) -> Option<&str> {
    let rest = scope.strip_prefix("https://")?;
    let host_end = rest.find('/')?;
    scope.get(.."https://".len() + host_end + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: serde_json::Value) -> Secret {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        Secret::new(format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256"}"#),
            b64(payload.to_string().as_bytes())
        ))
    }

    #[test]
    fn the_identity_is_any_of_the_usual_claims_case_insensitively() {
        let user = "Alice@Example.com";
        assert!(identity_matches(
            &jwt(serde_json::json!({"email": "alice@example.com", "email_verified": true})),
            user
        )
        .is_ok());
        assert_eq!(
            identity_matches(
                &jwt(serde_json::json!({"email": "alice@example.com", "email_verified": false})),
                user
            ),
            Err(None),
            "an email the provider did not verify names nobody"
        );
        assert_eq!(
            identity_matches(
                &jwt(serde_json::json!({"email": "alice@example.com"})),
                user
            ),
            Err(None),
            "nor one it says nothing about (Microsoft's, set by any tenant's admin)"
        );
        assert!(identity_matches(
            &jwt(serde_json::json!({"preferred_username": "ALICE@example.COM"})),
            user
        )
        .is_ok());
        assert!(identity_matches(
            &jwt(serde_json::json!({"upn": "alice@example.com", "email": "a@b"})),
            user
        )
        .is_ok());
        assert_eq!(
            identity_matches(
                &jwt(serde_json::json!({"email": "mallory@example.com", "email_verified": true})),
                user
            ),
            Err(Some("mallory@example.com".to_owned()))
        );
        assert_eq!(
            identity_matches(&jwt(serde_json::json!({"sub": "x"})), user),
            Err(None)
        );
        assert_eq!(identity_matches(&Secret::new("not-a-jwt"), user), Err(None));
    }

    #[test]
    fn a_microsoft_consent_asks_for_one_resource_at_a_time() {
        let config = crate::config::parse(
            br#"{"providers": {"ms": {"type": "microsoft", "clientId": "c", "tenant": "t"}},
                "accounts": {"a": {"user": "a@example.com", "provider": "ms"}}}"#,
            std::path::Path::new("."),
        )
        .unwrap();
        let account = config.account("a").unwrap();
        let resources = |t: &Target| -> Vec<String> {
            let mut r: Vec<String> = t
                .scopes
                .iter()
                .filter_map(|s| resource_of(s))
                .map(str::to_owned)
                .collect();
            r.dedup();
            r
        };
        // Entra refuses scopes of two resources in one request: without --proto, the
        // default set's (Outlook); Graph's with --proto api.
        let all = Target::of(account, None).unwrap();
        assert_eq!(
            resources(&all),
            ["https://outlook.office.com/"],
            "{:?}",
            all.scopes
        );
        assert!(all.scopes.iter().any(|s| s == "offline_access"));
        let api = Target::of(account, Some(Proto::Api)).unwrap();
        assert_eq!(
            resources(&api),
            ["https://graph.microsoft.com/"],
            "{:?}",
            api.scopes
        );
    }

    #[test]
    fn intervals_are_bounded() {
        let s = |v| seconds(v, DEFAULT_INTERVAL, MIN_INTERVAL, MAX_INTERVAL);
        assert_eq!(s(None), DEFAULT_INTERVAL);
        assert_eq!(s(Some(0.0)), DEFAULT_INTERVAL);
        assert_eq!(s(Some(-3.0)), DEFAULT_INTERVAL);
        assert_eq!(s(Some(f64::NAN)), DEFAULT_INTERVAL);
        assert_eq!(s(Some(0.2)), MIN_INTERVAL);
        assert_eq!(s(Some(1e30)), MAX_INTERVAL);
        assert_eq!(s(Some(7.0)), Duration::from_secs(7));
    }
}
