//! Microsoft identity platform (Entra ID): Outlook IMAP/SMTP and Microsoft Graph.

use serde::Deserialize;
use serde_json::Value;

use super::{
    check_url, classify, post_form, ClientAuth, ConsentClient, ConsentFlow, ErrorClass, ErrorCode,
    Failure, Grant, GrantError, OAuthCode, OurCode, ProviderError, ScopeError, TokenGrant,
    TokenRequest,
};
use crate::credentials::{from_value, ConfigError};
use crate::protocol::Proto;
use crate::secret::{ScopedResolver, Secret, SecretSource};

/// A national cloud: picks the authority host and the resource hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
pub enum Cloud {
    /// Worldwide.
    #[default]
    #[serde(rename = "global")]
    Global,
    /// US Government GCC High.
    #[serde(rename = "gcc-high")]
    GccHigh,
    /// US Government DoD.
    #[serde(rename = "dod")]
    Dod,
    /// China (21Vianet).
    #[serde(rename = "china")]
    China,
}

impl Cloud {
    fn authority(self) -> &'static str {
        match self {
            Cloud::Global => "login.microsoftonline.com",
            Cloud::GccHigh | Cloud::Dod => "login.microsoftonline.us",
            Cloud::China => "login.chinacloudapi.cn",
        }
    }

    /// The Exchange Online resource for delegated IMAP/SMTP scopes.
    fn outlook_delegated(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office.com",
            Cloud::GccHigh => "https://outlook.office365.us",
            Cloud::Dod => "https://outlook-dod.office365.us",
            Cloud::China => "https://partner.outlook.cn",
        }
    }

    /// The Exchange Online resource for app-only (client credentials) IMAP/SMTP.
    fn outlook_app(self) -> &'static str {
        match self {
            Cloud::Global => "https://outlook.office365.com",
            other => other.outlook_delegated(),
        }
    }

    fn graph(self) -> &'static str {
        match self {
            Cloud::Global => "https://graph.microsoft.com",
            Cloud::GccHigh => "https://graph.microsoft.us",
            Cloud::Dod => "https://dod-graph.microsoft.us",
            Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    client_id: String,
    #[serde(default)]
    client_secret: Option<SecretSource>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    cloud: Cloud,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default)]
    device_authorization_url: Option<String>,
    #[serde(default)]
    authorize_url: Option<String>,
}

/// Tenants that name no directory: fine for users signing in, meaningless for an app.
const PUBLIC_TENANTS: [&str; 3] = ["common", "organizations", "consumers"];

/// AADSTS codes that need a person (re-consent, password reset, re-enable).
const PERMANENT_AADSTS: &[u64] = &[
    50173, 700082, 70008, 70000, 65001, 50076, 50079, 53003, 50057, 50126, 7000215, 7000222, 700016,
];

/// A Microsoft identity platform app registration.
#[derive(Debug)]
pub struct Microsoft {
    token_url: String,
    device_authorization_url: String,
    authorize_url: String,
    tenant: String,
    cloud: Cloud,
    client_id: String,
    client_secret: Option<Secret>,
}

impl Microsoft {
    /// Parses `{"clientId", "clientSecret", "tenant", "cloud", "tokenUrl"?,
    /// "deviceAuthorizationUrl"?, "authorizeUrl"?}`.
    pub fn from_config(
        value: &Value,
        path: &str,
        secrets: &mut ScopedResolver<'_>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = from_value(value, path)?;
        let tenant = raw.tenant.unwrap_or_else(|| "common".to_owned());
        if tenant.is_empty()
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(ConfigError::new(
                format!("{path}.tenant"),
                "must be common, organizations, consumers, a tenant id or a domain",
            ));
        }
        let token_url = match raw.token_url {
            Some(u) => u,
            None => format!(
                "https://{}/{tenant}/oauth2/v2.0/token",
                raw.cloud.authority()
            ),
        };
        check_url(&token_url, &format!("{path}.tokenUrl"))?;
        // The sign-in endpoints of the same authority (national clouds included).
        let endpoint = |given: Option<String>, name: &str, field: &str| {
            let url = given.unwrap_or_else(|| {
                format!(
                    "https://{}/{tenant}/oauth2/v2.0/{name}",
                    raw.cloud.authority()
                )
            });
            check_url(&url, &format!("{path}.{field}")).map(|()| url)
        };
        let device_authorization_url = endpoint(
            raw.device_authorization_url,
            "devicecode",
            "deviceAuthorizationUrl",
        )?;
        let authorize_url = endpoint(raw.authorize_url, "authorize", "authorizeUrl")?;
        let client_secret = raw
            .client_secret
            .map(|s| secrets.secret(&s, &format!("{path}.clientSecret")))
            .transpose()?;
        Ok(Microsoft {
            token_url,
            device_authorization_url,
            authorize_url,
            tenant,
            cloud: raw.cloud,
            client_id: raw.client_id,
            client_secret,
        })
    }

    /// How a person signs in to consent (device code by default).
    pub fn consent_client(&self) -> ConsentClient {
        ConsentClient {
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            basic_auth: false,
            token_url: self.token_url.clone(),
            device_authorization_url: Some(self.device_authorization_url.clone()),
            authorize_url: Some(self.authorize_url.clone()),
            default_flow: ConsentFlow::Device,
            extra_scopes: &["offline_access"],
        }
    }

    /// refresh_token always; client_credentials only for a specific tenant with a secret.
    pub fn check_grant(&self, grant: Grant) -> Result<(), GrantError> {
        match grant {
            Grant::RefreshToken => Ok(()),
            Grant::ClientCredentials if PUBLIC_TENANTS.contains(&self.tenant.as_str()) => {
                Err(GrantError::PublicTenant {
                    tenant: self.tenant.clone(),
                })
            }
            Grant::ClientCredentials if self.client_secret.is_none() => {
                Err(GrantError::NoClientSecret)
            }
            Grant::ClientCredentials => Ok(()),
            Grant::JwtBearer => Err(GrantError::Unsupported {
                kind: "microsoft",
                grant,
                supported: &[Grant::RefreshToken, Grant::ClientCredentials],
            }),
        }
    }

    /// App-only tokens can only ask for `<resource>/.default`.
    pub fn check_scopes(&self, grant: Grant, scopes: &[String]) -> Result<(), ScopeError> {
        if grant == Grant::ClientCredentials
            && (scopes.len() != 1 || !scopes[0].ends_with("/.default"))
        {
            return Err(ScopeError::NotDefault);
        }
        // One token has one audience: Outlook (IMAP/SMTP) and Graph scopes cannot be mixed
        // (Microsoft answers AADSTS28000); catch it at load time, not at the first refresh.
        let mut resources: Vec<&str> = scopes
            .iter()
            .filter_map(|s| scope_resource(s, self.cloud.graph()))
            .collect();
        resources.sort_unstable();
        resources.dedup();
        if resources.len() > 1 {
            return Err(ScopeError::MixedResources(
                resources.into_iter().map(str::to_owned).collect(),
            ));
        }
        Ok(())
    }

    /// Outlook IMAP/SMTP scopes for imap/smtp (and no proto), Graph for api; the cloud's
    /// own hosts.
    pub fn default_scopes(&self, grant: Grant, proto: Option<Proto>) -> Vec<String> {
        let c = self.cloud;
        match (grant, proto) {
            (Grant::ClientCredentials, Some(Proto::Api)) => vec![format!("{}/.default", c.graph())],
            (Grant::ClientCredentials, _) => vec![format!("{}/.default", c.outlook_app())],
            (_, Some(Proto::Api)) => vec![
                format!("{}/.default", c.graph()),
                "offline_access".to_owned(),
            ],
            _ => vec![
                format!("{}/IMAP.AccessAsUser.All", c.outlook_delegated()),
                format!("{}/SMTP.Send", c.outlook_delegated()),
                "offline_access".to_owned(),
            ],
        }
    }

    /// Fetches a token. Every refresh answer carries a new refresh token.
    pub async fn fetch(
        &self,
        http: &reqwest::Client,
        req: &TokenRequest<'_>,
    ) -> Result<TokenGrant, ProviderError> {
        let scope = req.scopes.join(" ");
        let mut form: Vec<(&str, &str)> = vec![("client_id", &self.client_id)];
        if let Some(s) = &self.client_secret {
            form.push(("client_secret", s.expose()));
        }
        match req.grant {
            Grant::RefreshToken => {
                let rt = req
                    .refresh_token
                    .ok_or_else(|| ProviderError::transient(OurCode::NoRefreshToken))?;
                form.push(("grant_type", "refresh_token"));
                form.push(("refresh_token", rt.expose()));
            }
            _ => form.push(("grant_type", "client_credentials")),
        }
        form.push(("scope", &scope));
        post_form(http, &self.token_url, &form, ClientAuth::Post)
            .await
            .map_err(classify_microsoft)
    }
}

/// Standard classification plus AADSTS codes, which decide permanence more precisely.
fn classify_microsoft(f: Failure) -> ProviderError {
    let aadsts = match &f {
        Failure::Status { body: Some(b), .. } => b
            .error_codes
            .as_ref()
            .and_then(|c| c.first().copied())
            .or_else(|| b.error_description.as_deref().and_then(aadsts_in_text)),
        _ => None,
    };
    // Throttling is transient whatever its body says: the code below only looks at the
    // body's `error`, which a 429 may fill with a grant error.
    let throttled = matches!(&f, Failure::Status { status: 429, .. });
    let mut e = classify(f);
    if let Some(code) = aadsts {
        e.provider_code = Some(format!("AADSTS{code}"));
        // A 4xx is already permanent; an AADSTS code that needs a person makes the
        // rare non-standard answer (a 5xx carrying one) permanent too.
        if PERMANENT_AADSTS.contains(&code)
            && !throttled
            && e.code != ErrorCode::Provider(OAuthCode::TemporarilyUnavailable)
        {
            e.class = ErrorClass::Permanent;
        }
        e.hint = match code {
            50173 | 70008 | 700082 | 70000 => {
                Some("the refresh token was revoked or expired; the user must consent again")
            }
            65001 => Some("the user or an administrator has not consented to the app's scopes"),
            7000215 | 7000222 => {
                Some("the client secret is invalid or expired; rotate it in the provider config")
            }
            700016 => Some("the client id is not found in the tenant"),
            _ => None,
        };
    }
    if e.hint.is_none()
        && matches!(
            e.code,
            ErrorCode::Provider(OAuthCode::InteractionRequired | OAuthCode::ConsentRequired)
        )
    {
        e.hint = Some("the user must sign in interactively and consent again");
    }
    e
}

/// The resource (audience) a scope belongs to; `None` for the OpenID Connect scopes that
/// go with any resource. A scope without a resource prefix is a Graph scope of the cloud.
fn scope_resource<'a>(scope: &'a str, graph: &'a str) -> Option<&'a str> {
    if matches!(scope, "offline_access" | "openid" | "profile" | "email") {
        return None;
    }
    match scope.rfind('/') {
        Some(i) if scope.contains("://") => Some(&scope[..i]),
        _ => Some(graph),
    }
}

/// Finds `AADSTS<digits>` in an error description.
fn aadsts_in_text(text: &str) -> Option<u64> {
    let start = text.find("AADSTS")? + 6;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::OAuthErrorBody;

    #[test]
    fn aadsts_codes_are_surfaced_and_permanent() {
        let e = classify_microsoft(Failure::Status {
            status: 400,
            retry_after: None,
            body: Some(OAuthErrorBody {
                error: Some("invalid_grant".into()),
                error_description: Some(
                    "AADSTS70008: The provided authorization code or refresh token has expired"
                        .into(),
                ),
                error_codes: None,
            }),
        });
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.provider_code.as_deref(), Some("AADSTS70008"));
        assert_eq!(e.code, ErrorCode::Provider(OAuthCode::InvalidGrant));
        assert!(!e.to_string().contains("authorization code"));
    }

    #[test]
    fn throttling_stays_transient() {
        let e = classify_microsoft(Failure::Status {
            status: 429,
            retry_after: Some(std::time::Duration::from_secs(3)),
            body: None,
        });
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(3)));
        // Even when the throttling answer's body names a grant error and an AADSTS code.
        let e = classify_microsoft(Failure::Status {
            status: 429,
            retry_after: Some(std::time::Duration::from_secs(5)),
            body: Some(OAuthErrorBody {
                error: Some("invalid_grant".into()),
                error_description: None,
                error_codes: Some(vec![70000]),
            }),
        });
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.provider_code.as_deref(), Some("AADSTS70000"));
    }

    /// The provider as the config loader builds it.
    fn provider(fields: &str) -> std::sync::Arc<crate::provider::Provider> {
        let text = format!(
            r#"{{"providers": {{"ms": {{"type": "microsoft", "clientId": "c"{fields}}}}},
                "accounts": {{"x": {{"user": "u", "provider": "ms", "refreshToken": "r"}}}}}}"#
        );
        let config = crate::config::parse(text.as_bytes(), std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{fields}: {e:?}"));
        match &config.account("x").map(|a| &a.kind) {
            Some(crate::config::AccountKind::OAuth(o)) => o.default.provider.clone(),
            _ => panic!("not an OAuth account"),
        }
    }

    #[test]
    fn default_token_url_follows_tenant_and_cloud() {
        let url = |fields: &str| match &*provider(fields) {
            crate::provider::Provider::Microsoft(m) => m.token_url.clone(),
            other => panic!("{other:?}"),
        };
        let cases = [
            (
                "",
                "https://login.microsoftonline.com/common/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "organizations""#,
                "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "consumers", "cloud": "global""#,
                "https://login.microsoftonline.com/consumers/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "72f988bf-86f1-41af-91ab-2d7cd011db47""#,
                "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "contoso.onmicrosoft.us", "cloud": "gcc-high""#,
                "https://login.microsoftonline.us/contoso.onmicrosoft.us/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "army.onmicrosoft.us", "cloud": "dod""#,
                "https://login.microsoftonline.us/army.onmicrosoft.us/oauth2/v2.0/token",
            ),
            (
                r#", "tenant": "contoso.partner.onmschina.cn", "cloud": "china""#,
                "https://login.chinacloudapi.cn/contoso.partner.onmschina.cn/oauth2/v2.0/token",
            ),
            // An explicit tokenUrl is used as given (tests, proxies).
            (
                r#", "tenant": "contoso.com", "cloud": "china", "tokenUrl": "http://127.0.0.1:9/t""#,
                "http://127.0.0.1:9/t",
            ),
        ];
        for (fields, want) in cases {
            assert_eq!(url(fields), want, "{fields}");
        }
    }

    #[test]
    fn sign_in_endpoints_follow_the_cloud_and_tenant_unless_given() {
        let ends = |fields: &str| {
            let c = provider(fields).consent_client().unwrap();
            (
                c.device_authorization_url.unwrap_or_default(),
                c.authorize_url.unwrap_or_default(),
            )
        };
        let pair = |host: &str, tenant: &str| {
            (
                format!("https://{host}/{tenant}/oauth2/v2.0/devicecode"),
                format!("https://{host}/{tenant}/oauth2/v2.0/authorize"),
            )
        };
        assert_eq!(ends(""), pair("login.microsoftonline.com", "common"));
        assert_eq!(
            ends(r#", "tenant": "c.us", "cloud": "gcc-high""#),
            pair("login.microsoftonline.us", "c.us")
        );
        assert_eq!(
            ends(r#", "tenant": "a.us", "cloud": "dod""#),
            pair("login.microsoftonline.us", "a.us")
        );
        assert_eq!(
            ends(r#", "tenant": "c.cn", "cloud": "china""#),
            pair("login.chinacloudapi.cn", "c.cn")
        );
        assert_eq!(
            ends(
                r#", "deviceAuthorizationUrl": "http://127.0.0.1:9/d", "authorizeUrl": "http://127.0.0.1:9/a""#
            ),
            (
                "http://127.0.0.1:9/d".to_owned(),
                "http://127.0.0.1:9/a".to_owned()
            )
        );
        let c = provider("").consent_client().unwrap();
        assert_eq!(c.default_flow, ConsentFlow::Device);
        assert_eq!(c.extra_scopes, ["offline_access"]);
    }

    #[test]
    fn default_scopes_follow_the_cloud() {
        let scopes = |fields: &str, grant, proto| provider(fields).default_scopes(grant, proto);
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            scopes("", Grant::RefreshToken, None),
            s(&[
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "https://outlook.office.com/SMTP.Send",
                "offline_access"
            ])
        );
        assert_eq!(
            scopes(
                r#", "cloud": "gcc-high""#,
                Grant::RefreshToken,
                Some(Proto::Smtp)
            ),
            s(&[
                "https://outlook.office365.us/IMAP.AccessAsUser.All",
                "https://outlook.office365.us/SMTP.Send",
                "offline_access"
            ])
        );
        assert_eq!(
            scopes(
                r#", "cloud": "china""#,
                Grant::RefreshToken,
                Some(Proto::Api)
            ),
            s(&[
                "https://microsoftgraph.chinacloudapi.cn/.default",
                "offline_access"
            ])
        );
        assert_eq!(
            scopes(
                r#", "cloud": "dod", "tenant": "t.us""#,
                Grant::ClientCredentials,
                Some(Proto::Imap)
            ),
            s(&["https://outlook-dod.office365.us/.default"])
        );
    }

    #[test]
    fn outlook_and_graph_scopes_cannot_share_a_token() {
        let m = Microsoft {
            token_url: "https://login.microsoftonline.com/common/oauth2/v2.0/token".into(),
            device_authorization_url: String::new(),
            authorize_url: String::new(),
            tenant: "common".into(),
            cloud: Cloud::Global,
            client_id: "c".into(),
            client_secret: None,
        };
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(m
            .check_scopes(
                Grant::RefreshToken,
                &s(&[
                    "https://outlook.office.com/IMAP.AccessAsUser.All",
                    "https://outlook.office.com/SMTP.Send",
                    "offline_access"
                ])
            )
            .is_ok());
        assert!(m
            .check_scopes(
                Grant::RefreshToken,
                &s(&[
                    "Mail.Read",
                    "https://graph.microsoft.com/Mail.Send",
                    "offline_access"
                ])
            )
            .is_ok());
        let e = m
            .check_scopes(
                Grant::RefreshToken,
                &s(&[
                    "https://outlook.office.com/IMAP.AccessAsUser.All",
                    "Mail.Send",
                ]),
            )
            .unwrap_err();
        assert_eq!(
            e,
            ScopeError::MixedResources(vec![
                "https://graph.microsoft.com".into(),
                "https://outlook.office.com".into()
            ])
        );
        assert!(e.to_string().contains("protocols.api"), "{e}");
    }
}
