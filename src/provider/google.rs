//! Google user accounts (Gmail, Google Workspace) with stored refresh tokens.

use serde::Deserialize;
use serde_json::Value;

use super::{
    check_url, classify, post_form, ClientAuth, ConsentClient, ConsentFlow, ErrorCode, OAuthCode,
    OurCode, ProviderError, TokenGrant, TokenRequest,
};
use crate::credentials::{from_value, ConfigError};
use crate::secret::{ScopedResolver, Secret, SecretSource};

/// Google's token endpoint.
pub const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Full Gmail access: what IMAP and SMTP need.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// Google's device authorization endpoint (its device flow does not allow Gmail scopes).
pub const DEVICE_AUTHORIZATION_URL: &str = "https://oauth2.googleapis.com/device/code";
/// Google's authorization endpoint.
pub const AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    client_id: String,
    client_secret: SecretSource,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default)]
    device_authorization_url: Option<String>,
    #[serde(default)]
    authorize_url: Option<String>,
}

/// A Google OAuth2 client.
#[derive(Debug)]
pub struct Google {
    token_url: String,
    device_authorization_url: String,
    authorize_url: String,
    client_id: String,
    client_secret: Secret,
}

impl Google {
    /// Parses `{"clientId", "clientSecret", "tokenUrl"?, "deviceAuthorizationUrl"?,
    /// "authorizeUrl"?}`.
    pub fn from_config(
        value: &Value,
        path: &str,
        secrets: &mut ScopedResolver<'_>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = from_value(value, path)?;
        let token_url = raw.token_url.unwrap_or_else(|| TOKEN_URL.to_owned());
        check_url(&token_url, &format!("{path}.tokenUrl"))?;
        let device_authorization_url = raw
            .device_authorization_url
            .unwrap_or_else(|| DEVICE_AUTHORIZATION_URL.to_owned());
        check_url(
            &device_authorization_url,
            &format!("{path}.deviceAuthorizationUrl"),
        )?;
        let authorize_url = raw
            .authorize_url
            .unwrap_or_else(|| AUTHORIZE_URL.to_owned());
        check_url(&authorize_url, &format!("{path}.authorizeUrl"))?;
        let client_secret = secrets.secret(&raw.client_secret, &format!("{path}.clientSecret"))?;
        Ok(Google {
            token_url,
            device_authorization_url,
            authorize_url,
            client_id: raw.client_id,
            client_secret,
        })
    }

    /// How a person signs in to consent: the browser flow, because Google's device flow
    /// does not allow the Gmail scopes.
    pub fn consent_client(&self) -> ConsentClient {
        ConsentClient {
            client_id: self.client_id.clone(),
            client_secret: Some(self.client_secret.clone()),
            basic_auth: false,
            token_url: self.token_url.clone(),
            device_authorization_url: Some(self.device_authorization_url.clone()),
            authorize_url: Some(self.authorize_url.clone()),
            default_flow: ConsentFlow::Browser,
            extra_scopes: &[],
        }
    }

    /// Refreshes a token. Google keeps refresh tokens stable, so the answer usually has
    /// none; the caller then keeps the one it has.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        req: &TokenRequest<'_>,
    ) -> Result<TokenGrant, ProviderError> {
        let rt = req
            .refresh_token
            .ok_or_else(|| ProviderError::transient(OurCode::NoRefreshToken))?;
        let scope = req.scopes.join(" ");
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.expose()),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
        ];
        // Without `scope` Google returns every scope the user granted; send it only to
        // narrow a token the operator asked to narrow.
        if req.scopes_explicit && !scope.is_empty() {
            form.push(("scope", &scope));
        }
        post_form(http, &self.token_url, &form, ClientAuth::Post)
            .await
            .map_err(|f| {
                let mut e = classify(f);
                if e.code == ErrorCode::Provider(OAuthCode::InvalidGrant) {
                    e.hint = Some("the refresh token was revoked, expired (unused 6 months, password change) or exceeded the per-client limit; the user must consent again");
                }
                e
            })
    }
}
