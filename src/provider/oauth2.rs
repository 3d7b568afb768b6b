//! Any OAuth2 token endpoint (RFC 6749): refresh_token and client_credentials grants.

use serde::Deserialize;
use serde_json::Value;

use super::{
    check_url, classify, post_form, ClientAuth, ClientAuthMethod, ConsentClient, ConsentFlow,
    Grant, OurCode, ProviderError, TokenGrant, TokenRequest,
};
use crate::credentials::{from_value, ConfigError};
use crate::secret::{ScopedResolver, Secret, SecretSource};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    token_url: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<SecretSource>,
    #[serde(default)]
    client_auth: ClientAuthMethod,
    #[serde(default)]
    device_authorization_url: Option<String>,
    #[serde(default)]
    authorize_url: Option<String>,
}

/// A generic OAuth2 provider.
#[derive(Debug)]
pub struct OAuth2 {
    token_url: String,
    client_id: String,
    client_secret: Option<Secret>,
    client_auth: ClientAuthMethod,
    device_authorization_url: Option<String>,
    authorize_url: Option<String>,
}

impl OAuth2 {
    /// Parses `{"tokenUrl", "clientId", "clientSecret", "clientAuth", "deviceAuthorizationUrl"?,
    /// "authorizeUrl"?}`.
    pub fn from_config(
        value: &Value,
        path: &str,
        secrets: &mut ScopedResolver<'_>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = from_value(value, path)?;
        check_url(&raw.token_url, &format!("{path}.tokenUrl"))?;
        let client_secret = raw
            .client_secret
            .map(|s| secrets.secret(&s, &format!("{path}.clientSecret")))
            .transpose()?;
        if raw.client_auth == ClientAuthMethod::Basic && client_secret.is_none() {
            return Err(ConfigError::new(
                format!("{path}.clientSecret"),
                "required with \"clientAuth\": \"basic\"",
            ));
        }
        for (url, field) in [
            (&raw.device_authorization_url, "deviceAuthorizationUrl"),
            (&raw.authorize_url, "authorizeUrl"),
        ] {
            if let Some(url) = url {
                check_url(url, &format!("{path}.{field}"))?;
            }
        }
        Ok(OAuth2 {
            device_authorization_url: raw.device_authorization_url,
            authorize_url: raw.authorize_url,
            token_url: raw.token_url,
            client_id: raw.client_id,
            client_secret,
            client_auth: raw.client_auth,
        })
    }

    /// How a person signs in to consent: whichever endpoint is configured (the device
    /// flow when both are).
    pub fn consent_client(&self) -> ConsentClient {
        ConsentClient {
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            basic_auth: self.client_auth == ClientAuthMethod::Basic,
            token_url: self.token_url.clone(),
            device_authorization_url: self.device_authorization_url.clone(),
            authorize_url: self.authorize_url.clone(),
            default_flow: if self.device_authorization_url.is_none() && self.authorize_url.is_some()
            {
                ConsentFlow::Browser
            } else {
                ConsentFlow::Device
            },
            extra_scopes: &[],
        }
    }

    /// Fetches a token.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        req: &TokenRequest<'_>,
    ) -> Result<TokenGrant, ProviderError> {
        let scope = req.scopes.join(" ");
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(6);
        match req.grant {
            Grant::RefreshToken => {
                form.push(("grant_type", "refresh_token"));
                let rt = req
                    .refresh_token
                    .ok_or_else(|| ProviderError::transient(OurCode::NoRefreshToken))?;
                form.push(("refresh_token", rt.expose()));
            }
            _ => form.push(("grant_type", "client_credentials")),
        }
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let auth = match (self.client_auth, &self.client_secret) {
            (ClientAuthMethod::Basic, Some(secret)) => ClientAuth::Basic(&self.client_id, secret),
            (_, secret) => {
                form.push(("client_id", &self.client_id));
                if let Some(s) = secret {
                    form.push(("client_secret", s.expose()));
                }
                ClientAuth::Post
            }
        };
        post_form(http, &self.token_url, &form, auth)
            .await
            .map_err(classify)
    }
}
