//! Google Workspace domain-wide delegation: one service-account key, a signed JWT
//! assertion (RFC 7523) per mailbox, no refresh tokens at all.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::Deserialize;
use serde_json::Value;

use super::{
    check_url, classify, post_form, ClientAuth, ErrorCode, OAuthCode, OurCode, ProviderError,
    TokenGrant, TokenRequest,
};
use crate::credentials::{from_value, ConfigError};
use crate::secret::{ScopedResolver, SecretSource};

/// How long an assertion (and so the token it buys) is asked to live; Google's maximum.
const ASSERTION_LIFETIME_SECS: u64 = 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    service_account_key: SecretSource,
    #[serde(default)]
    token_url: Option<String>,
}

/// The fields we use from Google's JSON key file (it has more; they are ignored).
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A service account with its private key, parsed once per config load.
pub struct ServiceAccount {
    client_email: String,
    /// Where the assertion is posted (`tokenUrl`, else the key's `token_uri`).
    token_url: String,
    /// The assertion's `aud`: the key's `token_uri`, which Google checks, even when the
    /// request goes through a `tokenUrl` override (an egress proxy, say).
    audience: String,
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_url", &self.token_url)
            .field("audience", &self.audience)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl ServiceAccount {
    /// Parses `{"serviceAccountKey": <secret with the JSON key>, "tokenUrl"?}`.
    pub fn from_config(
        value: &Value,
        path: &str,
        secrets: &mut ScopedResolver<'_>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = from_value(value, path)?;
        let key_path = format!("{path}.serviceAccountKey");
        let key_json = secrets.secret(&raw.service_account_key, &key_path)?;
        // serde_json's messages quote no input for these shapes, but stay generic anyway:
        // this text is a private key.
        let key: KeyFile = serde_json::from_str(key_json.expose()).map_err(|_| {
            ConfigError::new(
                &key_path,
                "not a service-account JSON key (needs client_email and private_key)",
            )
        })?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(key.private_key.as_bytes()).map_err(|_| {
            ConfigError::new(
                &key_path,
                "private_key is not a PEM \"PRIVATE KEY\" (PKCS#8)",
            )
        })?;
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| {
            ConfigError::new(
                &key_path,
                format!("private_key is not a usable RSA key: {e}"),
            )
        })?;
        let audience = key
            .token_uri
            .unwrap_or_else(|| super::google::TOKEN_URL.to_owned());
        check_url(&audience, &format!("{key_path}.token_uri"))?;
        let token_url = raw.token_url.unwrap_or_else(|| audience.clone());
        check_url(&token_url, &format!("{path}.tokenUrl"))?;
        if key.client_email.is_empty() {
            return Err(ConfigError::new(&key_path, "client_email is empty"));
        }
        Ok(ServiceAccount {
            client_email: key.client_email,
            token_url,
            audience,
            key: pair,
            rng: SystemRandom::new(),
        })
    }

    /// Builds the signed assertion for `subject`.
    fn assertion(&self, subject: &str, scope: &str, now: u64) -> Result<String, ProviderError> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| ProviderError::transient(OurCode::SigningFailed))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// Exchanges a fresh assertion for an access token to `subject`'s mailbox.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        req: &TokenRequest<'_>,
    ) -> Result<TokenGrant, ProviderError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let assertion = self.assertion(req.subject, &req.scopes.join(" "), now)?;
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ];
        post_form(http, &self.token_url, &form, ClientAuth::Post)
            .await
            .map_err(|f| {
                let mut e = classify(f);
                e.hint = match &e.code {
                    ErrorCode::Provider(OAuthCode::UnauthorizedClient) => Some("domain-wide delegation is not configured for this service account: authorize its client ID for these scopes in the Google Workspace admin console"),
                    ErrorCode::Provider(OAuthCode::InvalidGrant) => Some("the mailbox user does not exist in the Workspace domain, or the key was deleted"),
                    _ => None,
                };
                e
            })
    }
}
