//! Error codes of a failed token fetch: our own (the fetch never got a token answer) or
//! the provider's OAuth2 `error`. Parsed once from the answer; decided on as values, shown
//! as the same snake_case strings everywhere (logs, admin API `lastError.code`, the 403
//! body's `code`).

use std::borrow::Cow;
use std::fmt;

/// Why a fetch failed, in one code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// We gave up before or while talking to the provider, or its answer was unusable.
    Ours(OurCode),
    /// A non-2xx answer without a usable OAuth2 `error`: `http_<status>`.
    Http(u16),
    /// The provider's OAuth2 `error` code.
    Provider(OAuthCode),
}

impl ErrorCode {
    /// The code as logged and reported (`timeout`, `http_503`, `invalid_grant`).
    pub fn as_str(&self) -> Cow<'_, str> {
        match self {
            ErrorCode::Ours(c) => Cow::Borrowed(c.as_str()),
            ErrorCode::Http(status) => Cow::Owned(format!("http_{status}")),
            ErrorCode::Provider(c) => Cow::Borrowed(c.as_str()),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Http(status) => write!(f, "http_{status}"),
            other => f.write_str(&other.as_str()),
        }
    }
}

impl From<OurCode> for ErrorCode {
    fn from(c: OurCode) -> Self {
        ErrorCode::Ours(c)
    }
}

impl From<OAuthCode> for ErrorCode {
    fn from(c: OAuthCode) -> Self {
        ErrorCode::Provider(c)
    }
}

/// Our own failure codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OurCode {
    /// The request or the answer took longer than `--upstream-timeout`.
    Timeout,
    /// No connection to the token endpoint.
    ConnectFailed,
    /// The connection broke while the answer was read.
    ConnectionLost,
    /// Any other transport failure.
    NetworkError,
    /// The answer was larger than any token response.
    ResponseTooLarge,
    /// The token endpoint answered with a redirect (never followed).
    Redirect,
    /// A 2xx answer that is not a usable token response.
    InvalidResponse,
    /// A refresh_token grant without a refresh token to spend.
    NoRefreshToken,
    /// A service-account assertion could not be signed.
    SigningFailed,
    /// The fetch task ended without an answer (it panicked or was cancelled).
    FetchTaskFailed,
    /// Refused because shutdown began; never sent.
    ShuttingDown,
    /// A refresh_token account with no refresh token anywhere (config or state store):
    /// it waits for a person to consent. Nothing is sent.
    ConsentRequired,
    /// Not sent: the state store's lease or record of the account could not be had.
    StateUnavailable,
    /// Not sent: the account's stored record is refused (tampered with, moved).
    StateRecordRefused,
}

impl OurCode {
    /// Every code, for tests and documentation.
    pub const ALL: [OurCode; 14] = [
        OurCode::Timeout,
        OurCode::ConnectFailed,
        OurCode::ConnectionLost,
        OurCode::NetworkError,
        OurCode::ResponseTooLarge,
        OurCode::Redirect,
        OurCode::InvalidResponse,
        OurCode::NoRefreshToken,
        OurCode::SigningFailed,
        OurCode::FetchTaskFailed,
        OurCode::ShuttingDown,
        OurCode::ConsentRequired,
        OurCode::StateUnavailable,
        OurCode::StateRecordRefused,
    ];

    /// The code as logged and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            OurCode::Timeout => "timeout",
            OurCode::ConnectFailed => "connect_failed",
            OurCode::ConnectionLost => "connection_lost",
            OurCode::NetworkError => "network_error",
            OurCode::ResponseTooLarge => "response_too_large",
            OurCode::Redirect => "redirect",
            OurCode::InvalidResponse => "invalid_response",
            OurCode::NoRefreshToken => "no_refresh_token",
            OurCode::SigningFailed => "signing_failed",
            OurCode::FetchTaskFailed => "fetch_task_failed",
            OurCode::ShuttingDown => "shutting_down",
            // The OpenID Connect code of the same meaning, so that one code means one
            // thing to whoever reads the 403.
            OurCode::ConsentRequired => "consent_required",
            OurCode::StateUnavailable => "state_unavailable",
            OurCode::StateRecordRefused => "state_record_refused",
        }
    }
}

/// An OAuth2 `error` code (RFC 6749 §5.2 and the OpenID Connect ones providers use); the
/// ones we act on are variants, any other is kept as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OAuthCode {
    /// `invalid_grant`: the refresh token or assertion is rejected.
    InvalidGrant,
    /// `invalid_client`.
    InvalidClient,
    /// `unauthorized_client`.
    UnauthorizedClient,
    /// `unsupported_grant_type`.
    UnsupportedGrantType,
    /// `invalid_scope`.
    InvalidScope,
    /// `invalid_request`.
    InvalidRequest,
    /// `access_denied`.
    AccessDenied,
    /// `interaction_required`.
    InteractionRequired,
    /// `consent_required`.
    ConsentRequired,
    /// `login_required`.
    LoginRequired,
    /// `temporarily_unavailable`.
    TemporarilyUnavailable,
    /// `slow_down`.
    SlowDown,
    /// Any other code, as the provider sent it.
    Other(Box<str>),
}

impl OAuthCode {
    /// The code for a provider's `error` string.
    pub fn parse(code: &str) -> OAuthCode {
        match code {
            "invalid_grant" => OAuthCode::InvalidGrant,
            "invalid_client" => OAuthCode::InvalidClient,
            "unauthorized_client" => OAuthCode::UnauthorizedClient,
            "unsupported_grant_type" => OAuthCode::UnsupportedGrantType,
            "invalid_scope" => OAuthCode::InvalidScope,
            "invalid_request" => OAuthCode::InvalidRequest,
            "access_denied" => OAuthCode::AccessDenied,
            "interaction_required" => OAuthCode::InteractionRequired,
            "consent_required" => OAuthCode::ConsentRequired,
            "login_required" => OAuthCode::LoginRequired,
            "temporarily_unavailable" => OAuthCode::TemporarilyUnavailable,
            "slow_down" => OAuthCode::SlowDown,
            other => OAuthCode::Other(other.into()),
        }
    }

    /// The code as the provider sent it.
    pub fn as_str(&self) -> &str {
        match self {
            OAuthCode::InvalidGrant => "invalid_grant",
            OAuthCode::InvalidClient => "invalid_client",
            OAuthCode::UnauthorizedClient => "unauthorized_client",
            OAuthCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthCode::InvalidScope => "invalid_scope",
            OAuthCode::InvalidRequest => "invalid_request",
            OAuthCode::AccessDenied => "access_denied",
            OAuthCode::InteractionRequired => "interaction_required",
            OAuthCode::ConsentRequired => "consent_required",
            OAuthCode::LoginRequired => "login_required",
            OAuthCode::TemporarilyUnavailable => "temporarily_unavailable",
            OAuthCode::SlowDown => "slow_down",
            OAuthCode::Other(code) => code,
        }
    }

    /// Whether retrying can help, when the code alone says: `Some(true)` for the codes
    /// only a person (re-consent, config fix) can clear, `Some(false)` for the ones that
    /// ask to come back later, `None` for any other.
    pub fn needs_a_person(&self) -> Option<bool> {
        match self {
            OAuthCode::InvalidGrant
            | OAuthCode::InvalidClient
            | OAuthCode::UnauthorizedClient
            | OAuthCode::UnsupportedGrantType
            | OAuthCode::InvalidScope
            | OAuthCode::InvalidRequest
            | OAuthCode::AccessDenied
            | OAuthCode::InteractionRequired
            | OAuthCode::ConsentRequired
            | OAuthCode::LoginRequired => Some(true),
            OAuthCode::TemporarilyUnavailable | OAuthCode::SlowDown => Some(false),
            OAuthCode::Other(_) => None,
        }
    }
}

impl fmt::Display for OAuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_codes_read_as_before() {
        let strings: Vec<String> = OurCode::ALL
            .into_iter()
            .map(|c| ErrorCode::from(c).to_string())
            .collect();
        assert_eq!(
            strings,
            [
                "timeout",
                "connect_failed",
                "connection_lost",
                "network_error",
                "response_too_large",
                "redirect",
                "invalid_response",
                "no_refresh_token",
                "signing_failed",
                "fetch_task_failed",
                "shutting_down",
                "consent_required",
                "state_unavailable",
                "state_record_refused",
            ]
        );
        for c in OurCode::ALL {
            if c == OurCode::ConsentRequired {
                // Deliberately the provider code of the same meaning (a person must act).
                assert_eq!(OAuthCode::parse(c.as_str()), OAuthCode::ConsentRequired);
                continue;
            }
            assert_eq!(ErrorCode::Ours(c).as_str(), c.as_str());
            // None is mistaken for a provider code we act on.
            assert!(
                OAuthCode::parse(c.as_str()).needs_a_person().is_none(),
                "{c:?}"
            );
        }
        assert_eq!(ErrorCode::Http(503).to_string(), "http_503");
        assert_eq!(ErrorCode::Http(400).as_str(), "http_400");
    }

    #[test]
    fn provider_codes_round_trip() {
        for code in [
            "invalid_grant",
            "invalid_client",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "invalid_request",
            "access_denied",
            "interaction_required",
            "consent_required",
            "login_required",
            "temporarily_unavailable",
            "slow_down",
            "server_error",
            "AADSTS_unknown",
        ] {
            let parsed = OAuthCode::parse(code);
            assert_eq!(parsed.as_str(), code);
            assert_eq!(ErrorCode::Provider(parsed.clone()).to_string(), code);
            assert_eq!(ErrorCode::from(parsed).as_str(), code);
        }
        assert_eq!(OAuthCode::parse("invalid_grant"), OAuthCode::InvalidGrant);
        assert_eq!(
            OAuthCode::parse("server_error"),
            OAuthCode::Other("server_error".into())
        );
        assert_eq!(OAuthCode::InvalidGrant.needs_a_person(), Some(true));
        assert_eq!(OAuthCode::SlowDown.needs_a_person(), Some(false));
        assert_eq!(OAuthCode::parse("server_error").needs_a_person(), None);
    }
}
