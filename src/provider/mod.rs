//! Identity providers: how to ask each one for an access token, and how to read its answer.
//!
//! One file per provider type. Each owns its part of the config schema (parsed once per
//! config load) and its request format; this module holds what they share: the grant
//! names, the token-endpoint round trip, token-response parsing and error classification.

mod code;
pub mod google;
pub mod google_service_account;
pub mod microsoft;
pub mod oauth2;

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::credentials::{ConfigError, Grant};
use crate::protocol::Proto;
use crate::secret::{ScopedResolver, Secret};

pub use code::{ErrorCode, OAuthCode, OurCode};

/// The longest `Retry-After` we honour; a provider asking for more is retried after this.
/// A throttled provider that recovers is then back in use within two minutes, not parked
/// for whatever a misconfigured gateway asked (one `Retry-After: 86400` used to cost an
/// hour); one retry per key every two minutes is no burden on a provider that still throttles.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// What one token fetch needs.
#[derive(Debug)]
pub struct TokenRequest<'a> {
    /// The grant.
    pub grant: Grant,
    /// Scopes to request.
    pub scopes: &'a [String],
    /// Whether the operator configured the scopes (providers that don't need a `scope`
    /// on refresh send it only then).
    pub scopes_explicit: bool,
    /// The refresh token to spend (refresh_token grant).
    pub refresh_token: Option<&'a Secret>,
    /// The mailbox user (`sub` of a service-account assertion).
    pub subject: &'a str,
}

/// A successful token response.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// The access token; `None` when the answer had none. Not a parse error, for the same
    /// reason as [`ExpiresIn::Unusable`]: the answer may carry a rotated refresh token.
    pub access_token: Option<Secret>,
    /// Its lifetime, as the provider said it.
    pub expires_in: ExpiresIn,
    /// A new refresh token, when the provider rotated it.
    pub refresh_token: Option<Secret>,
}

/// What a token response says about the token's lifetime. An unusable one is not a parse
/// error: the answer may carry a rotated refresh token, which must still be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiresIn {
    /// No `expires_in` (or `null`): the caller assumes `--default-lifetime`.
    Absent,
    /// At least a second (not clamped: that is the caller's policy).
    Given(Duration),
    /// Zero, negative, under a second or not a number: the token is already unusable.
    Unusable,
}

/// Whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network trouble, 5xx, 429, a garbled answer: retry with back-off.
    Transient,
    /// The grant or client is rejected: only a person (re-consent, config fix) can help.
    Permanent,
}

impl ErrorClass {
    /// A metric label / status field.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Why a token fetch failed. Carries codes, never the provider's free-text description
/// (which may echo request data) and never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}{}{}{}", .provider_code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(), .redirect_host.as_deref().map(|h| format!(" (to {h})")).unwrap_or_default(), .hint.map(|h| format!(": {h}")).unwrap_or_default())]
pub struct ProviderError {
    /// Transient or permanent.
    pub class: ErrorClass,
    /// The OAuth2 `error` code (`invalid_grant`), or ours (`timeout`, `http_503`, `invalid_response`).
    pub code: ErrorCode,
    /// A provider-specific code such as `AADSTS70008`.
    pub provider_code: Option<String>,
    /// What the operator should do, where we know.
    pub hint: Option<&'static str>,
    /// The provider's `Retry-After`, at most [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
    /// The host (and port) a redirect pointed at; never its path or query, which may
    /// carry request data. Boxed: errors travel inside every serving error.
    pub redirect_host: Option<Box<str>>,
}

impl ProviderError {
    /// A transient failure with our own code.
    pub fn transient(code: impl Into<ErrorCode>) -> Self {
        ProviderError {
            class: ErrorClass::Transient,
            code: code.into(),
            provider_code: None,
            hint: None,
            retry_after: None,
            redirect_host: None,
        }
    }
}

/// Why a provider cannot perform a grant an account asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// This provider type does not implement the grant.
    #[error("a {kind} provider does not support the {} grant (supported: {})", .grant.as_str(), grant_names(.supported))]
    Unsupported {
        /// The provider type.
        kind: &'static str,
        /// The grant asked for.
        grant: Grant,
        /// The grants it implements.
        supported: &'static [Grant],
    },
    /// App-only access needs a tenant to be issued in.
    #[error("the client_credentials grant needs a specific tenant (a tenant id or domain), not `{tenant}`")]
    PublicTenant {
        /// The configured multi-tenant name (`common`, …).
        tenant: String,
    },
    /// App-only access needs the client's own secret.
    #[error("the client_credentials grant needs the provider's clientSecret")]
    NoClientSecret,
}

fn grant_names(grants: &[Grant]) -> String {
    grants
        .iter()
        .map(|g| g.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a set of scopes cannot be asked for in one token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// A service-account assertion without a scope.
    #[error("a service-account assertion needs at least one scope")]
    Missing,
    /// App-only tokens take a single `<resource>/.default` scope.
    #[error(
        "the client_credentials grant takes exactly one scope of the form `<resource>/.default`"
    )]
    NotDefault,
    /// Scopes of several resources (audiences), which no single token can have.
    #[error("scopes for different resources ({}) cannot be in one token; give the Graph scopes their own set under `protocols.api`", .0.join(", "))]
    MixedResources(Vec<String>),
}

/// A configured identity provider.
#[derive(Debug)]
pub enum Provider {
    /// Any OAuth2 token endpoint.
    OAuth2(oauth2::OAuth2),
    /// Microsoft identity platform (Entra ID, Outlook, Microsoft 365).
    Microsoft(microsoft::Microsoft),
    /// Google user accounts (Gmail, Workspace) with refresh tokens.
    Google(google::Google),
    /// Google Workspace domain-wide delegation with a service-account key.
    /// Boxed: the parsed RSA key makes it far larger than the other variants.
    GoogleServiceAccount(Box<google_service_account::ServiceAccount>),
}

impl Provider {
    /// Builds a provider of type `kind` from its config object (without `type`).
    pub fn from_config(
        kind: &str,
        value: &Value,
        path: &str,
        secrets: &mut ScopedResolver<'_>,
    ) -> Result<Provider, ConfigError> {
        Ok(match kind {
            "oauth2" => Provider::OAuth2(oauth2::OAuth2::from_config(value, path, secrets)?),
            "microsoft" => {
                Provider::Microsoft(microsoft::Microsoft::from_config(value, path, secrets)?)
            }
            "google" => Provider::Google(google::Google::from_config(value, path, secrets)?),
            "google-service-account" => Provider::GoogleServiceAccount(Box::new(
                google_service_account::ServiceAccount::from_config(value, path, secrets)?,
            )),
            other => {
                return Err(ConfigError::new(
                    format!("{path}.type"),
                    format!(
                        "unknown provider type `{other}`; one of oauth2, microsoft, google, google-service-account"
                    ),
                ))
            }
        })
    }

    /// The provider type name.
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::OAuth2(_) => "oauth2",
            Provider::Microsoft(_) => "microsoft",
            Provider::Google(_) => "google",
            Provider::GoogleServiceAccount(_) => "google-service-account",
        }
    }

    /// The grant an account gets when it names none.
    pub fn default_grant(&self) -> Grant {
        match self {
            Provider::GoogleServiceAccount(_) => Grant::JwtBearer,
            _ => Grant::RefreshToken,
        }
    }

    /// Whether this provider can perform `grant`; the error says why not.
    pub fn check_grant(&self, grant: Grant) -> Result<(), GrantError> {
        let supported: &[Grant] = match self {
            Provider::OAuth2(_) => &[Grant::RefreshToken, Grant::ClientCredentials],
            Provider::Microsoft(m) => return m.check_grant(grant),
            Provider::Google(_) => &[Grant::RefreshToken],
            Provider::GoogleServiceAccount(_) => &[Grant::JwtBearer],
        };
        if supported.contains(&grant) {
            Ok(())
        } else {
            Err(GrantError::Unsupported {
                kind: self.kind(),
                grant,
                supported,
            })
        }
    }

    /// Whether `scopes` are acceptable for `grant`.
    pub fn check_scopes(
        &self,
        grant: Grant,
        scopes: &[String],
        explicit: bool,
    ) -> Result<(), ScopeError> {
        match self {
            Provider::Microsoft(m) => m.check_scopes(grant, scopes),
            Provider::GoogleServiceAccount(_) if scopes.is_empty() => Err(ScopeError::Missing),
            _ => {
                let _ = explicit;
                Ok(())
            }
        }
    }

    /// Scopes an account gets when it configures none.
    pub fn default_scopes(&self, grant: Grant, proto: Option<Proto>) -> Vec<String> {
        match self {
            Provider::OAuth2(_) => Vec::new(),
            Provider::Microsoft(m) => m.default_scopes(grant, proto),
            Provider::Google(_) | Provider::GoogleServiceAccount(_) => {
                vec![google::GMAIL_SCOPE.to_owned()]
            }
        }
    }

    /// How a person signs in to give this provider's client a refresh token (`consent`);
    /// `None` for a provider that needs no person (a service account).
    pub fn consent_client(&self) -> Option<ConsentClient> {
        match self {
            Provider::OAuth2(p) => Some(p.consent_client()),
            Provider::Microsoft(p) => Some(p.consent_client()),
            Provider::Google(p) => Some(p.consent_client()),
            Provider::GoogleServiceAccount(_) => None,
        }
    }

    /// Fetches one access token.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        req: &TokenRequest<'_>,
    ) -> Result<TokenGrant, ProviderError> {
        match self {
            Provider::OAuth2(p) => p.fetch(http, req).await,
            Provider::Microsoft(p) => p.fetch(http, req).await,
            Provider::Google(p) => p.fetch(http, req).await,
            Provider::GoogleServiceAccount(p) => p.fetch(http, req).await,
        }
    }
}

/// How a person signs in to consent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsentFlow {
    /// Device authorization (RFC 8628): a code typed in on any device.
    Device,
    /// Authorization code with PKCE (RFC 7636) through a browser on this machine.
    Browser,
}

impl ConsentFlow {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentFlow::Device => "device",
            ConsentFlow::Browser => "browser",
        }
    }
}

/// A provider's client as the consent flows need it.
#[derive(Clone, Debug)]
pub struct ConsentClient {
    /// The client id.
    pub client_id: String,
    /// The client secret, for confidential clients.
    pub client_secret: Option<Secret>,
    /// Client authentication with HTTP Basic rather than in the form.
    pub basic_auth: bool,
    /// The token endpoint.
    pub token_url: String,
    /// The device authorization endpoint, if the provider has one.
    pub device_authorization_url: Option<String>,
    /// The authorization endpoint, if the provider has one.
    pub authorize_url: Option<String>,
    /// The flow used when none is asked for.
    pub default_flow: ConsentFlow,
    /// Scopes this provider needs to issue a refresh token (`offline_access`).
    pub extra_scopes: &'static [&'static str],
}

/// The largest token response we read; anything bigger is not a token response.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// What came back from a token endpoint that was not a token.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No usable HTTP answer.
    Network(ProviderError),
    /// A non-2xx answer, with the OAuth2 error body if it had one.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        body: Option<OAuthErrorBody>,
    },
    /// A 2xx answer that is not a usable token response.
    Invalid(ProviderError),
    /// A 3xx answer: never followed.
    Redirect(ProviderError),
}

/// The standard OAuth2 error body (RFC 6749 §5.2) plus Microsoft's `error_codes`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct OAuthErrorBody {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub error_codes: Option<Vec<u64>>,
}

/// How the client authenticates to the token endpoint.
pub(crate) enum ClientAuth<'a> {
    /// Credentials in the form body (or none).
    Post,
    /// HTTP Basic, with id and secret form-encoded first (RFC 6749 §2.3.1).
    Basic(&'a str, &'a Secret),
}

/// POSTs a token request form and returns the parsed token, or what went wrong.
pub(crate) async fn post_form(
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
    auth: ClientAuth<'_>,
) -> Result<TokenGrant, Failure> {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut req = http
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body);
    if let ClientAuth::Basic(id, secret) = auth {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        req = req.basic_auth(enc(id), Some(enc(secret.expose())));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Failure::Network(network_error(&e)))?;
    let status = resp.status().as_u16();
    if (300..400).contains(&status) {
        return Err(Failure::Redirect(redirect_error(&resp)));
    }
    // Capped here, so neither the back-off nor EmailEngine's Retry-After can be parked
    // for a day by one throttled answer.
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
        .map(|d| d.min(MAX_RETRY_AFTER));
    let body = read_limited(resp).await.map_err(Failure::Network)?;
    if (200..300).contains(&status) {
        parse_token_response(&body).map_err(Failure::Invalid)
    } else {
        Err(Failure::Status {
            status,
            retry_after,
            body: serde_json::from_slice::<OAuthErrorBody>(&body)
                .ok()
                .filter(|b| b.error.is_some()),
        })
    }
}

/// The error for a redirect: the target's host and port (the path and query may carry
/// request data, e.g. a tenant or a signed parameter), and what the operator should do.
/// Transient: a token endpoint redirecting may be mid-migration or maintenance, and
/// retrying sends nothing anywhere else; the operator sees it in the status and logs.
fn redirect_error(resp: &reqwest::Response) -> ProviderError {
    let redirect_host = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| resp.url().join(l).ok())
        .and_then(|u| {
            let host = u.host_str()?;
            Some(match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            })
        })
        // No DNS name is longer; a longer one is not worth echoing.
        .filter(|h| h.len() <= 260)
        .map(String::into_boxed_str);
    ProviderError {
        hint: Some(
            "the token endpoint answered with a redirect, which is never followed (it would re-send the credentials); set tokenUrl to the final URL",
        ),
        redirect_host,
        ..ProviderError::transient(OurCode::Redirect)
    }
}

/// The response body, at most [`MAX_RESPONSE_BYTES`]. A body that arrives in one chunk
/// (a token response nearly always does) is used as it came, not copied.
async fn read_limited(mut resp: reqwest::Response) -> Result<bytes::Bytes, ProviderError> {
    let mut chunks: Vec<bytes::Bytes> = Vec::new();
    let mut total = 0;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                total += chunk.len();
                if total > MAX_RESPONSE_BYTES {
                    return Err(ProviderError::transient(OurCode::ResponseTooLarge));
                }
                chunks.push(chunk);
            }
            Ok(None) if chunks.len() == 1 => return Ok(chunks.swap_remove(0)),
            Ok(None) => return Ok(chunks.concat().into()),
            Err(e) => return Err(network_error(&e)),
        }
    }
}

fn network_error(e: &reqwest::Error) -> ProviderError {
    // reqwest's Display names the URL, which is fine, but our own codes are steadier.
    let code = if e.is_timeout() {
        OurCode::Timeout
    } else if e.is_connect() {
        OurCode::ConnectFailed
    } else if e.is_body() || e.is_decode() {
        OurCode::ConnectionLost
    } else {
        OurCode::NetworkError
    };
    ProviderError::transient(code)
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A JSON string borrowed from the response when it has no escapes (a JWT never does):
/// the 2 KB access token is then not copied on its way to the [`Secret`].
#[derive(Deserialize, PartialEq, Eq, Hash)]
struct JsonStr<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

/// A raw JSON value as a string, if it is one.
fn json_string(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    serde_json::from_str::<JsonStr<'_>>(raw).ok().map(|s| s.0)
}

/// Parses a 2xx token response (RFC 6749 §5.1).
///
/// Fields are read from a map of raw values rather than a `serde_json::Value`: a refresh
/// then allocates the access token once, not three times, which keeps the heap of a
/// sidecar refreshing 100k tokens from fragmenting (BENCHMARKS.md, P5). As with a
/// `Value`, a repeated key counts once, with its last value.
pub fn parse_token_response(body: &[u8]) -> Result<TokenGrant, ProviderError> {
    let invalid = |what: &'static str| ProviderError {
        hint: Some(what),
        ..ProviderError::transient(OurCode::InvalidResponse)
    };
    let fields: HashMap<JsonStr<'_>, &serde_json::value::RawValue> = serde_json::from_slice(body)
        .map_err(|_| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
            invalid("token response is not a JSON object")
        } else {
            invalid("token response is not JSON")
        }
    })?;
    let field = |name: &'static str| fields.get(&JsonStr(name.into())).map(|raw| raw.get());
    let access_token = match field("access_token").and_then(json_string) {
        Some(s) if !s.is_empty() => Some(Secret::new(&*s)),
        _ => None,
    };
    // Some servers send expires_in as a string. Under a second is unusable too: planning
    // refreshes for such a token would call the provider in a tight loop.
    let expires_in = match field("expires_in") {
        None | Some("null") => ExpiresIn::Absent,
        Some(raw) => serde_json::from_str::<f64>(raw)
            .ok()
            .or_else(|| json_string(raw)?.trim().parse::<f64>().ok())
            .filter(|s| *s >= 1.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map_or(ExpiresIn::Unusable, ExpiresIn::Given),
    };
    let refresh_token = match field("refresh_token").and_then(json_string) {
        Some(s) if !s.is_empty() => Some(Secret::new(&*s)),
        _ => None,
    };
    Ok(TokenGrant {
        access_token,
        expires_in,
        refresh_token,
    })
}

/// Classifies a failure the standard way; providers refine the result.
pub(crate) fn classify(f: Failure) -> ProviderError {
    match f {
        Failure::Network(e) | Failure::Invalid(e) | Failure::Redirect(e) => e,
        Failure::Status {
            status,
            retry_after,
            body,
        } => {
            // A code that is too long or not printable is not echoed (nor one we know).
            let code = body
                .as_ref()
                .and_then(|b| b.error.as_deref())
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
                .map(OAuthCode::parse);
            let transient_status = status == 408 || status == 425 || status == 429 || status >= 500;
            let class = match code.as_ref().and_then(OAuthCode::needs_a_person) {
                _ if transient_status => ErrorClass::Transient,
                Some(true) => ErrorClass::Permanent,
                Some(false) => ErrorClass::Transient,
                // Any other 4xx: a request this client keeps making will keep failing.
                None => ErrorClass::Permanent,
            };
            ProviderError {
                class,
                code: code.map_or(ErrorCode::Http(status), ErrorCode::Provider),
                provider_code: None,
                hint: None,
                retry_after,
                redirect_host: None,
            }
        }
    }
}

/// The Basic or form-body client authentication setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
pub enum ClientAuthMethod {
    /// `client_id` / `client_secret` in the form body.
    #[default]
    #[serde(rename = "post")]
    Post,
    /// HTTP Basic.
    #[serde(rename = "basic")]
    Basic,
}

/// Checks that a configured token URL is an absolute https:// URL, or http:// to a
/// loopback host (a test IdP, a local egress proxy): anything else would send client
/// secrets and refresh tokens in the clear.
pub(crate) fn check_url(url: &str, path: &str) -> Result<(), ConfigError> {
    let refused = |why: &str| Err(ConfigError::new(path, why));
    let Ok(u) = reqwest::Url::parse(url) else {
        return refused("must be an absolute https:// URL");
    };
    let Some(host) = u.host_str() else {
        return refused("must be an absolute https:// URL");
    };
    match u.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        "http" => refused(
            "must be an https:// URL: plain http:// would send the client secret and refresh tokens unencrypted (allowed only for a loopback host such as 127.0.0.1)",
        ),
        _ => refused("must be an absolute https:// URL"),
    }
}

/// Whether a URL's host (as `Url::host_str` gives it) is this machine.
fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_response_parsing() {
        let g =
            parse_token_response(br#"{"access_token":"a","expires_in":3599,"refresh_token":"r"}"#)
                .unwrap();
        assert_eq!(g.access_token.as_ref().map(Secret::expose), Some("a"));
        assert_eq!(g.expires_in, ExpiresIn::Given(Duration::from_secs(3599)));
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        let g = parse_token_response(br#"{"access_token":"a","expires_in":"60"}"#).unwrap();
        assert_eq!(g.expires_in, ExpiresIn::Given(Duration::from_secs(60)));
        assert!(g.refresh_token.is_none());
        // Escapes are decoded; a repeated key counts once, with its last value; fields of
        // the wrong type count as absent; other fields are ignored whatever they hold.
        let g = parse_token_response(
            br#"{"access_token":"x","access_token":"a\/b\u0041","expires_in":null,
                "refresh_token":7,"scope":["a",{"b":1}],"id_token":"\"q\""}"#,
        )
        .unwrap();
        assert_eq!(g.access_token.as_ref().map(Secret::expose), Some("a/bA"));
        assert_eq!(g.expires_in, ExpiresIn::Absent);
        assert!(g.refresh_token.is_none());
        // expires_in: a number or numeric string of at least a second; too long is the
        // cache's to clamp; anything else is unusable (the cache refuses it, after the
        // answer's refresh token is kept).
        for (v, secs) in [
            ("1", 1.0),
            ("3599.5", 3599.5),
            ("\" 60 \"", 60.0),
            ("1e12", 1e12),
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v}}}"#);
            let g = parse_token_response(body.as_bytes()).unwrap();
            assert_eq!(
                g.expires_in,
                ExpiresIn::Given(Duration::from_secs_f64(secs)),
                "{v}"
            );
        }
        for v in [
            "0", "-0", "-1", "0.999", "1e-300", "1e400", "\"\"", "\"soon\"", "true", "{}", "[1]",
        ] {
            let body = format!(r#"{{"access_token":"a","expires_in":{v},"refresh_token":"r"}}"#);
            let g = parse_token_response(body.as_bytes()).unwrap();
            assert_eq!(g.expires_in, ExpiresIn::Unusable, "{v}");
            assert_eq!(g.refresh_token.unwrap().expose(), "r");
        }
        let not_object = parse_token_response(b"[1]").unwrap_err();
        assert_eq!(not_object.hint, Some("token response is not a JSON object"));
        let not_json = parse_token_response(b"{").unwrap_err();
        assert_eq!(not_json.hint, Some("token response is not JSON"));
        for bad in [
            &b""[..],
            b"garbage",
            b"[]",
            br#"{"access_token":"a"} trailing"#,
        ] {
            let e = parse_token_response(bad).unwrap_err();
            assert_eq!(e.class, ErrorClass::Transient);
            assert_eq!(e.code, ErrorCode::Ours(OurCode::InvalidResponse));
            assert_eq!(e.code.to_string(), "invalid_response");
        }
        // No usable access token is not a parse error: a rotated refresh token in the
        // same answer must still reach the state store (the cache then refuses it).
        for no_token in [
            &br#"{"expires_in":1}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":1,"refresh_token":"r"}"#,
        ] {
            let g = parse_token_response(no_token).unwrap();
            assert!(g.access_token.is_none());
        }
        let g = parse_token_response(br#"{"refresh_token":"r"}"#).unwrap();
        assert_eq!(g.refresh_token.as_ref().map(Secret::expose), Some("r"));
    }

    #[test]
    fn classification() {
        let st = |status, error: Option<&str>| {
            classify(Failure::Status {
                status,
                retry_after: None,
                body: error.map(|e| OAuthErrorBody {
                    error: Some(e.into()),
                    ..Default::default()
                }),
            })
        };
        assert_eq!(st(400, Some("invalid_grant")).class, ErrorClass::Permanent);
        assert_eq!(st(401, Some("invalid_client")).class, ErrorClass::Permanent);
        assert_eq!(st(503, None).class, ErrorClass::Transient);
        assert_eq!(st(503, None).code, ErrorCode::Http(503));
        assert_eq!(
            st(400, Some("invalid_grant")).code,
            ErrorCode::Provider(OAuthCode::InvalidGrant)
        );
        // Unknown codes are kept as sent and are permanent on a 4xx; unprintable or
        // overlong ones are not echoed.
        let other = st(400, Some("weird_code"));
        assert_eq!(other.code.to_string(), "weird_code");
        assert_eq!(other.class, ErrorClass::Permanent);
        assert_eq!(st(400, Some("bad code")).code, ErrorCode::Http(400));
        assert_eq!(st(400, Some(&"x".repeat(65))).code, ErrorCode::Http(400));
        assert_eq!(st(400, Some("slow_down")).class, ErrorClass::Transient);
        assert_eq!(st(429, Some("invalid_grant")).class, ErrorClass::Transient);
        assert_eq!(
            st(400, Some("temporarily_unavailable")).class,
            ErrorClass::Transient
        );
    }

    #[test]
    fn config_check_messages_name_what_to_change() {
        let both = &[Grant::RefreshToken, Grant::ClientCredentials][..];
        let cases = [
            (
                GrantError::Unsupported {
                    kind: "oauth2",
                    grant: Grant::JwtBearer,
                    supported: both,
                }
                .to_string(),
                "a oauth2 provider does not support the jwt_bearer grant (supported: refresh_token, client_credentials)",
            ),
            (
                GrantError::PublicTenant {
                    tenant: "common".into(),
                }
                .to_string(),
                "the client_credentials grant needs a specific tenant (a tenant id or domain), not `common`",
            ),
            (
                GrantError::NoClientSecret.to_string(),
                "the client_credentials grant needs the provider's clientSecret",
            ),
            (
                ScopeError::Missing.to_string(),
                "a service-account assertion needs at least one scope",
            ),
            (
                ScopeError::NotDefault.to_string(),
                "the client_credentials grant takes exactly one scope of the form `<resource>/.default`",
            ),
            (
                ScopeError::MixedResources(vec!["a".into(), "b".into()]).to_string(),
                "scopes for different resources (a, b) cannot be in one token; give the Graph scopes their own set under `protocols.api`",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn token_urls_must_be_https_unless_loopback() {
        for ok in [
            "https://login.example/t",
            "http://127.0.0.1:9/t",
            "http://127.1/t",
            "http://[::1]/t",
            "http://LOCALHOST/t",
        ] {
            assert!(check_url(ok, "p").is_ok(), "{ok}");
        }
        for bad in [
            "http://login.example/t",
            "http://[::2]/t",
            "http://localhost.example/t",
            "ftp://127.0.0.1/t",
            "/token",
            "https://",
            "mailto:a@b.example",
        ] {
            let e = check_url(bad, "p.tokenUrl").unwrap_err();
            assert_eq!(e.path, "p.tokenUrl", "{bad}");
            assert!(e.message.contains("https://"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
