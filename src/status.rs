//! What the admin API, the operator page and the metrics show of one credential key:
//! plain data, filled in by the cache (`cache::KeyEntry::status`).

use std::time::SystemTime;

/// State of one credential set, for the admin API and the metrics.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// The account id.
    pub account: String,
    /// Provider name.
    pub provider: String,
    /// Grant.
    pub grant: &'static str,
    /// Scopes.
    pub scopes: Vec<String>,
    /// ok, refreshing, failing_transient, failed_permanent or needs_consent.
    pub state: &'static str,
    /// When the current token expires (RFC 3339), if there is one.
    pub token_expires_at: Option<String>,
    /// Seconds of life left on the current token.
    pub token_remaining_seconds: Option<u64>,
    /// When the last refresh succeeded (RFC 3339).
    pub last_refresh_at: Option<String>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<ErrorStatus>,
}

/// The last error of a key (codes only, never a description or a secret).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorStatus {
    /// transient or permanent.
    pub class: &'static str,
    /// OAuth2 or our error code.
    pub code: String,
    /// Provider code (AADSTS…).
    pub provider_code: Option<String>,
    /// What to do.
    pub hint: Option<&'static str>,
    /// Where the token endpoint redirected to (host and port only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_host: Option<Box<str>>,
    /// When it happened (RFC 3339).
    pub at: String,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Seconds until the next attempt.
    pub retry_in_seconds: u64,
}

/// `t` as RFC 3339 to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
