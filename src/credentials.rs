//! Vocabulary the config and the providers share: the credential key, the grant names
//! and the config errors (with the field-path-aware deserializer that makes them).
//!
//! A leaf: it imports nothing of the crate, so `config` and `provider` can both use it
//! without importing each other both ways.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// One problem in a config, located by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: a dotted JSON path such as `accounts.alice.refreshToken`, or `(file)`.
    pub path: String,
    /// What is wrong, without any secret value.
    pub message: String,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one config file. A config with any error is not used.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    /// The config file.
    pub file: PathBuf,
    /// The problems, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid config {} ({} error{})",
            self.file.display(),
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Deserializes `value` into `T`, reporting the failing field as a path under `path`.
pub fn from_value<T: DeserializeOwned>(value: &Value, path: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| path_error(e, path))
}

/// [`from_value`] for a value we own: moves its contents instead of copying them (the
/// whole account map, at the top level).
pub fn from_owned_value<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| path_error(e, path))
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>, path: &str) -> ConfigError {
    let inner = e.path().to_string();
    let full = if inner == "." || inner.is_empty() {
        path.to_owned()
    } else {
        format!("{path}.{inner}")
    };
    ConfigError::new(full, redact_strings(&e.into_inner().to_string()))
}

/// Removes the quoted string values serde puts into its messages (`invalid type: string
/// "emailengine:hunter2", expected …`): a secret written in the wrong shape must not end
/// up in a log line, the admin API or `check` output.
fn redact_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(MARK) {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        // serde quotes the value Debug-style: skip to the closing, unescaped quote.
        let mut escaped = false;
        let mut end = rest.len();
        for (j, c) in rest[i + MARK.len()..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = i + MARK.len() + j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// An OAuth2 grant the sidecar can perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum Grant {
    /// Delegated access from a stored refresh token.
    #[serde(rename = "refresh_token")]
    RefreshToken,
    /// App-only access with the client's own credentials.
    #[serde(rename = "client_credentials")]
    ClientCredentials,
    /// RFC 7523 JWT bearer assertion (Google service accounts).
    #[serde(rename = "jwt_bearer")]
    JwtBearer,
}

impl Grant {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::JwtBearer => "jwt_bearer",
        }
    }
}

/// Identifies one cached token: an account and one of its credential sets.
///
/// The hash is computed once, and equality checks pointers before bytes: a cache lookup
/// then touches neither string (with thousands of accounts, each is a cache miss).
#[derive(Clone, Debug)]
pub struct CredentialKey {
    /// The EmailEngine account id.
    pub account: Arc<str>,
    /// `provider|grant|scopes`: protocols that resolve to the same set share one token.
    pub set: Arc<str>,
    hash: u64,
}

impl CredentialKey {
    /// A key for an account's credential set.
    pub fn new(account: Arc<str>, set: Arc<str>) -> Self {
        use std::hash::{Hash, Hasher};
        // Fixed keys are fine: keys come from the operator's config, not from requests.
        let mut h = std::hash::DefaultHasher::new();
        account.hash(&mut h);
        set.hash(&mut h);
        CredentialKey {
            account,
            set,
            hash: h.finish(),
        }
    }
}

impl PartialEq for CredentialKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.account, &other.account) || self.account == other.account)
            && (Arc::ptr_eq(&self.set, &other.set) || self.set == other.set)
    }
}

impl Eq for CredentialKey {}

impl std::hash::Hash for CredentialKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl fmt::Display for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.account, self.set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_strings_are_redacted_from_serde_messages() {
        assert_eq!(
            redact_strings(r#"invalid value: string "a\"b\\", expected x; string "c""#),
            "invalid value: a string, expected x; a string"
        );
    }
}
