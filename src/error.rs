//! Request-level errors and the one place they become HTTP statuses.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::cache::CacheError;
use crate::metrics::Outcome;
use crate::protocol::{error_body, QueryError};
use crate::provider::{ErrorCode, OurCode};

/// Why a request was not answered with a token.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Only GET (or POST on admin actions) is served.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// Missing or wrong Basic credentials.
    #[error("missing or wrong credentials")]
    Unauthorized,
    /// The query is malformed.
    #[error(transparent)]
    BadRequest(#[from] QueryError),
    /// No such account in the current config.
    #[error("unknown account")]
    UnknownAccount,
    /// No such path.
    #[error("not found")]
    NotFound,
    /// The cache could not produce a token.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The admin API was asked for but no credentials are configured for it.
    #[error("the admin API is closed: the config sets neither `adminAuth` nor `auth`; set `adminAuth` (or `auth`) to open it")]
    AdminClosed,
    /// A forced refresh of the same credential set ran too recently.
    #[error("this account was force-refreshed moments ago; try again after Retry-After seconds")]
    RefreshRateLimited(Duration),
    /// The worker rendering the admin list died.
    #[error("the account list could not be rendered; try again")]
    ListFailed,
    /// As many admin lists as may be built at once are being built.
    #[error("account lists are being built already; try again in a moment, or page with ?limit=")]
    ListBusy,
    /// An admin query parameter has a value outside what it accepts.
    #[error("query parameter `{name}` must be {expected}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// What it accepts.
        expected: &'static str,
    },
}

/// Retry-After values are kept within what EmailEngine honours (it caps them at 30 s).
const MAX_RETRY_AFTER_SECS: u64 = crate::cache::schedule::MAX_RETRY_HINT.as_secs();

impl ServeError {
    /// The HTTP status for this error; see the protocol contract for why 429 is special.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::Unauthorized => StatusCode::UNAUTHORIZED,
            ServeError::BadRequest(_) | ServeError::InvalidParameter { .. } => {
                StatusCode::BAD_REQUEST
            }
            ServeError::AdminClosed => StatusCode::FORBIDDEN,
            ServeError::ListFailed | ServeError::ListBusy => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::RefreshRateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ServeError::UnknownAccount | ServeError::NotFound => StatusCode::NOT_FOUND,
            ServeError::Cache(CacheError::Unavailable { .. } | CacheError::Superseded) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ServeError::Cache(CacheError::Failed { .. }) => StatusCode::FORBIDDEN,
        }
    }

    /// The metric outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            ServeError::MethodNotAllowed(_)
            | ServeError::BadRequest(_)
            | ServeError::InvalidParameter { .. } => Outcome::BadRequest,
            ServeError::Unauthorized | ServeError::AdminClosed => Outcome::Unauthorized,
            ServeError::RefreshRateLimited(_) | ServeError::ListFailed | ServeError::ListBusy => {
                Outcome::Unavailable
            }
            ServeError::UnknownAccount | ServeError::NotFound => Outcome::NotFound,
            ServeError::Cache(CacheError::Unavailable { .. } | CacheError::Superseded) => {
                Outcome::Unavailable
            }
            ServeError::Cache(CacheError::Failed { .. }) => Outcome::Failed,
        }
    }

    /// The full response: JSON body naming the problem (never a secret) and the headers
    /// the status calls for.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = match &self {
            // Not a refusal by the provider: nobody has consented yet. The hint names the
            // command that fixes it (EmailEngine shows the body to nobody, operators do).
            ServeError::Cache(CacheError::Failed { provider, error })
                if error.code == ErrorCode::Ours(OurCode::ConsentRequired) =>
            {
                error_body(
                    "this account waits for consent: it has no refresh token yet",
                    Some(&error.code.as_str()),
                    Some(provider),
                    error.hint,
                )
            }
            ServeError::Cache(CacheError::Failed { provider, error }) => error_body(
                &self.to_string(),
                Some(&error.code.as_str()),
                Some(provider),
                None,
            ),
            _ => error_body(&self.to_string(), None, None, None),
        };
        let mut resp = json_response(status, body);
        let headers = resp.headers_mut();
        match &self {
            ServeError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"ee-auth-sidecar\""),
                );
            }
            ServeError::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ServeError::Cache(CacheError::Unavailable { retry_after, .. })
            | ServeError::RefreshRateLimited(retry_after) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            ServeError::Cache(CacheError::Superseded) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        resp
    }
}

/// Whole seconds, rounded up, between 1 and the cap.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.clamp(1, MAX_RETRY_AFTER_SECS)
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_rounded_up_and_capped() {
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(3600)), 30);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
