//! The account map: schema, validation and secret resolution.
//!
//! The file is JSON (see the README's config reference). It is parsed and validated as a
//! whole into an immutable [`Config`]; a config that has any error is never used, and the
//! error list names the file, the JSON path (`accounts.alice.provider`) and what is wrong,
//! never a secret. The running sidecar holds one `Arc<Config>` behind an `ArcSwap`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::credentials::{
    from_owned_value, from_value, ConfigError, ConfigErrors, CredentialKey, Grant,
};
use crate::files;
use crate::protocol::{self, BasicCredentials, Proto};
use crate::provider::Provider;
use crate::secret::{sha256, Resolved, Resolver, Secret, SecretSource, SECRET_FILE};

const CONFIG_FILE: &str = "a config file";

/// The config file's bytes (a regular file of at most [`files::MAX_CONFIG_BYTES`]).
fn read_config_file(path: &Path) -> Result<Vec<u8>, files::ReadError> {
    files::read_limited(path, files::MAX_CONFIG_BYTES, CONFIG_FILE)
}

/// Everything needed to fetch one token: self-contained, so the cache never looks back
/// into a config that may have been swapped since.
#[derive(Debug)]
pub struct CredentialSet {
    /// The cache key.
    pub key: CredentialKey,
    /// The provider's name in the config (a metric label and a log field).
    pub provider_name: Arc<str>,
    /// The provider.
    pub provider: Arc<Provider>,
    /// The grant.
    pub grant: Grant,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// Whether `scopes` were configured by the operator (rather than provider defaults).
    pub scopes_explicit: bool,
    /// The mailbox user: the answer's `user`, and `sub` for a service account.
    pub user: Arc<str>,
    /// The account's refresh token as the config gives it (rotation may supersede it).
    pub refresh_token: Option<Secret>,
    /// Digest of everything above including secrets (SHA-256's first 128 bits): a change
    /// means "drop the token".
    pub fingerprint: [u8; 16],
}

/// An account whose answer comes from an identity provider.
#[derive(Debug)]
pub struct OAuthAccount {
    /// The set used when EmailEngine sends no `proto`.
    pub default: Arc<CredentialSet>,
    /// The set per protocol, in [`Proto::ALL`] order.
    pub per_proto: [Arc<CredentialSet>; 3],
    /// Whether each protocol, in [`Proto::ALL`] order, is configured explicitly under
    /// `protocols` (those are pre-warmed with the default).
    pub explicit: [bool; 3],
}

impl OAuthAccount {
    /// The credential set that serves `proto`.
    pub fn set_for(&self, proto: Option<Proto>) -> &Arc<CredentialSet> {
        match proto {
            None => &self.default,
            Some(p) => &self.per_proto[p as usize],
        }
    }

    /// The distinct sets of this account (several protocols may share one).
    pub fn sets(&self) -> Vec<&Arc<CredentialSet>> {
        let mut out: Vec<&Arc<CredentialSet>> = vec![&self.default];
        for s in &self.per_proto {
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s);
            }
        }
        out
    }

    /// The sets worth fetching before anyone asks: the default one and explicit overrides.
    pub fn warm_sets(&self) -> Vec<&Arc<CredentialSet>> {
        let mut out: Vec<&Arc<CredentialSet>> = vec![&self.default];
        for p in Proto::ALL
            .into_iter()
            .filter(|p| self.explicit[*p as usize])
        {
            let s = self.set_for(Some(p));
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s);
            }
        }
        out
    }
}

/// What an account answers with.
#[derive(Debug)]
pub enum AccountKind {
    /// A password or static-token account: the answer never changes, serialized once.
    Fixed(Bytes),
    /// An OAuth2 account, served from the token cache.
    OAuth(OAuthAccount),
}

/// One account of the map.
#[derive(Debug)]
pub struct Account {
    /// The EmailEngine account id.
    pub id: Arc<str>,
    /// What it answers with.
    pub kind: AccountKind,
    /// Digest of the account's whole definition (SHA-256's first 128 bits: a reload
    /// compares it for every account, and it is stored for every one).
    pub fingerprint: [u8; 16],
}

/// The accounts, sorted by id: one pointer each (kept for every account of maps of
/// 100k), looked up by binary search (requests read the routes, not this).
#[derive(Debug, Default)]
pub struct Accounts(Box<[Arc<Account>]>);

/// An account id and its account, as [`Accounts`] iterates them.
pub type AccountItem<'a> = (&'a Arc<str>, &'a Arc<Account>);

impl Accounts {
    /// Accounts in any order; of two with one id, the later is kept.
    pub fn new(mut accounts: Vec<Arc<Account>>) -> Self {
        accounts.reverse();
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts.dedup_by(|later, earlier| later.id == earlier.id);
        Accounts(accounts.into_boxed_slice())
    }

    /// The account with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Account>> {
        let i = self.0.binary_search_by(|a| (*a.id).cmp(id)).ok()?;
        self.0.get(i)
    }

    /// Whether an account has this id.
    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// How many accounts.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ids and accounts, by id.
    pub fn iter(&self) -> impl Iterator<Item = AccountItem<'_>> {
        self.0.iter().map(|a| (&a.id, a))
    }

    /// The ids, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|a| &a.id)
    }

    /// The accounts, by id.
    pub fn values(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.0.iter()
    }

    /// Each account, with the account of the same id in `other` if it has one: one walk
    /// of both sorted lists (a reload diffs 100k accounts this way).
    pub fn with_counterparts<'a>(
        &'a self,
        other: &'a Accounts,
    ) -> impl Iterator<Item = (&'a Arc<Account>, Option<&'a Arc<Account>>)> {
        let mut j = 0;
        self.0.iter().map(move |a| {
            while other.0.get(j).is_some_and(|o| o.id < a.id) {
                j += 1;
            }
            (a, other.0.get(j).filter(|o| o.id == a.id))
        })
    }
}

impl<'a> IntoIterator for &'a Accounts {
    type Item = AccountItem<'a>;
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, Arc<Account>>, fn(&'a Arc<Account>) -> AccountItem<'a>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|a| (&a.id, a))
    }
}

/// A validated, immutable account map.
#[derive(Debug)]
pub struct Config {
    /// Basic credentials required on the token endpoint.
    pub auth: Option<BasicCredentials>,
    /// Basic credentials for the admin endpoints; `auth` when not set.
    pub admin_auth: Option<BasicCredentials>,
    /// Accounts by id.
    pub accounts: Accounts,
    /// Provider names with their type, for summaries.
    pub providers: BTreeMap<String, &'static str>,
    /// Secret files the config reads: a change to any of them is a config change.
    pub secret_files: Vec<PathBuf>,
    /// Digest of the config text and every secret it resolved.
    pub fingerprint: [u8; 32],
    /// SHA-256 of the config file's bytes, and of each secret file's, as they were read:
    /// [`Config::files_unchanged`] compares them without parsing anything.
    text_digest: [u8; 32],
    secret_file_digests: Vec<(PathBuf, [u8; 32])>,
}

impl Config {
    /// Whether the config file and every secret file still hold exactly the bytes this
    /// config was built from. Reading and hashing is much cheaper than parsing, which
    /// matters for the periodic re-read of a map of 100k accounts.
    pub fn files_unchanged(&self, config_path: &Path) -> bool {
        // Bounded reads, as when loading: a file swapped for a FIFO or `/dev/zero` reads as
        // changed, and the load that follows reports it.
        let same = |path: &Path, limit: u64, what: &'static str, digest: &[u8; 32]| {
            files::sha256_limited(path, limit, what).is_ok_and(|d| d == *digest)
        };
        same(
            config_path,
            files::MAX_CONFIG_BYTES,
            CONFIG_FILE,
            &self.text_digest,
        ) && self
            .secret_file_digests
            .iter()
            .all(|(path, digest)| same(path, files::MAX_SECRET_FILE_BYTES, SECRET_FILE, digest))
    }

    /// An account by id.
    pub fn account(&self, id: &str) -> Option<&Arc<Account>> {
        self.accounts.get(id)
    }

    /// Every credential set of every OAuth2 account.
    pub fn credential_sets(&self) -> impl Iterator<Item = &Arc<CredentialSet>> {
        self.accounts.values().flat_map(|a| match &a.kind {
            AccountKind::OAuth(o) => o.sets(),
            AccountKind::Fixed(_) => Vec::new(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTop {
    // Kept as raw values and checked by `build_auth`, so a malformed `auth` is one error
    // among the others instead of hiding every account's errors.
    #[serde(default)]
    auth: Option<Value>,
    #[serde(default, rename = "adminAuth")]
    admin_auth: Option<Value>,
    #[serde(default)]
    providers: BTreeMap<String, Value>,
    #[serde(default)]
    accounts: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    username: String,
    password: SecretSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPasswordAccount {
    user: String,
    pass: SecretSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStaticAccount {
    user: String,
    access_token: SecretSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOAuthAccount {
    user: String,
    provider: String,
    #[serde(default)]
    grant: Option<Grant>,
    #[serde(default)]
    refresh_token: Option<SecretSource>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    protocols: RawProtocols,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProtocols {
    imap: Option<RawOverride>,
    smtp: Option<RawOverride>,
    api: Option<RawOverride>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    grant: Option<Grant>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// Reads, parses and validates a config file and every secret it references.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read_config_file(path).map_err(|e| ConfigErrors {
        file: path.to_owned(),
        errors: vec![ConfigError::new(
            "(file)",
            // Named here too: the admin API's `lastError` lists the messages alone.
            format!("cannot read config file {}: {e}", path.display()),
        )],
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &base).map_err(|errors| ConfigErrors {
        file: path.to_owned(),
        errors,
    })
}

/// The secret files a config file names (`{"file": ...}` anywhere in it, resolved as
/// [`load`] resolves them), even when the config is invalid: the reloader watches their
/// directories, so creating the missing secret file of a broken config reloads at once.
pub fn referenced_files(path: &Path) -> Vec<PathBuf> {
    let Some(value) = read_config_file(path)
        .ok()
        .and_then(|text| serde_json::from_slice::<Value>(&text).ok())
    else {
        return Vec::new();
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut files = Vec::new();
    let mut stack = vec![&value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => match map.get("file") {
                Some(Value::String(file)) if map.len() == 1 => files.push(base.join(file)),
                _ => stack.extend(map.values()),
            },
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    files.sort();
    files.dedup();
    files
}

/// Parses and validates config text; relative secret file paths resolve against `base_dir`.
pub fn parse(text: &[u8], base_dir: &Path) -> Result<Config, Vec<ConfigError>> {
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        vec![ConfigError::new(
            "(file)",
            format!(
                "not valid JSON at line {} column {}: {}",
                e.line(),
                e.column(),
                json_error_kind(&e)
            ),
        )]
    })?;
    // serde reads a JSON array as the struct's fields in order (`[]` would be an empty
    // config): only an object is a config.
    if !value.is_object() {
        return Err(vec![ConfigError::new(
            "(top level)",
            "must be a JSON object",
        )]);
    }
    // serde_json keeps the last of two equal keys without a word: an account (or a
    // secret) written twice would silently replace the first.
    if let Some(path) = duplicate_key(text) {
        return Err(vec![ConfigError::new(
            path,
            "appears twice in the same object; keep one",
        )]);
    }
    let raw: RawTop = from_owned_value(value, "(top level)").map_err(|e| vec![e])?;
    let mut resolver = Resolver::new(base_dir.to_owned(), text);
    let mut errors = Vec::new();

    let auth = build_auth(raw.auth.as_ref(), "auth", &mut resolver, &mut errors);
    let admin_auth = build_auth(
        raw.admin_auth.as_ref(),
        "adminAuth",
        &mut resolver,
        &mut errors,
    )
    .or_else(|| auth.clone());

    let mut providers: HashMap<String, (Arc<Provider>, [u8; 32])> = HashMap::new();
    let mut provider_types = BTreeMap::new();
    for (name, v) in &raw.providers {
        let path = key_path("providers", name);
        if name.is_empty() || name.contains('|') {
            errors.push(ConfigError::new(
                &path,
                "provider names must be non-empty and not contain `|`",
            ));
            continue;
        }
        match build_provider(v, &path, &mut resolver) {
            Ok(p) => {
                provider_types.insert(name.clone(), p.0.kind());
                providers.insert(name.clone(), p);
            }
            Err(e) => errors.push(e),
        }
    }
    let undefined_providers: Vec<&String> = raw
        .providers
        .keys()
        .filter(|n| !providers.contains_key(*n))
        .collect();

    let mut accounts = Vec::with_capacity(raw.accounts.len());
    let shared_names = Interner::default();
    for (id, v) in &raw.accounts {
        let path = key_path("accounts", id);
        if id.is_empty() {
            errors.push(ConfigError::new(&path, "account id must not be empty"));
            continue;
        }
        let ctx = AccountCtx {
            id,
            path: &path,
            providers: &providers,
            broken_providers: &undefined_providers,
            shared_names: &shared_names,
        };
        match build_account(v, &ctx, &mut resolver) {
            Ok(a) => accounts.push(Arc::new(a)),
            Err(mut e) => errors.append(&mut e),
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let Resolved {
        fingerprint,
        files: secret_files,
        file_digests,
    } = resolver.finish();
    Ok(Config {
        auth,
        admin_auth,
        accounts: Accounts::new(accounts),
        providers: provider_types,
        secret_files,
        fingerprint,
        text_digest: sha256(text),
        secret_file_digests: file_digests,
    })
}

/// `parent.key`, or `parent["key"]` when the key would not read back as one segment
/// (empty, or holding a dot, bracket, quote, space or control character): an error must
/// name a place a reader can find, even for a key like `""`.
fn key_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && !key.chars().any(|c| {
            matches!(c, '.' | '[' | ']' | '"' | '\\') || c.is_whitespace() || c.is_control()
        });
    match (plain, parent.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{parent}.{key}"),
        // serde_json quotes and escapes the key exactly as JSON would.
        (false, _) => format!(
            "{parent}[{}]",
            serde_json::to_string(key).unwrap_or_else(|_| String::from("\"?\""))
        ),
    }
}

/// The dotted path of the first key that appears twice in one JSON object, if any.
fn duplicate_key(text: &[u8]) -> Option<String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

    /// Where the walk is, as borrowed segments: rendered into a path only for the
    /// duplicate it reports (a path string per key cost 0.1 s for a map of 100k accounts).
    #[derive(Clone, Copy)]
    enum Trail<'t> {
        Root,
        Key(&'t Trail<'t>, &'t str),
        Index(&'t Trail<'t>, usize),
    }

    impl Trail<'_> {
        fn render(&self) -> String {
            match self {
                Trail::Root => String::new(),
                Trail::Key(parent, key) => key_path(&parent.render(), key),
                Trail::Index(parent, i) => format!("{}[{i}]", parent.render()),
            }
        }
    }

    /// Walks a JSON document, recording the first duplicate key; `.1` is where it is.
    struct Walk<'a, 't>(&'a mut Option<String>, Trail<'t>);

    impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let here = Trail::Key(&self.1, &key);
                if self.0.is_none() && seen.contains(&key) {
                    *self.0 = Some(here.render());
                }
                map.next_value_seed(Walk(&mut *self.0, here))?;
                seen.insert(key);
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while seq
                .next_element_seed(Walk(&mut *self.0, Trail::Index(&self.1, i)))?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }

    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(text);
    // The text already parsed as JSON; an error here can only be one we do not care about.
    let _ = Walk(&mut found, Trail::Root).deserialize(&mut de);
    found
}

fn json_error_kind(e: &serde_json::Error) -> String {
    // serde_json's message repeats "at line N column M"; keep just the reason.
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

fn build_auth(
    raw: Option<&Value>,
    path: &str,
    resolver: &mut Resolver,
    errors: &mut Vec<ConfigError>,
) -> Option<BasicCredentials> {
    let raw = raw?;
    if let Value::Array(items) = raw {
        // A list: every pair is accepted (rotating the credentials EmailEngine sends).
        if items.is_empty() {
            errors.push(ConfigError::new(
                path,
                "an empty list accepts nobody; remove it or add a pair",
            ));
            return None;
        }
        let before = errors.len();
        let pairs: Vec<BasicCredentials> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                build_auth(Some(item), &format!("{path}[{i}]"), resolver, errors)
            })
            .collect();
        return (errors.len() == before).then(|| BasicCredentials::any_of(pairs));
    }
    let raw: RawAuth = match from_value(raw, path) {
        Ok(r) => r,
        Err(e) => {
            errors.push(e);
            return None;
        }
    };
    if raw.username.contains(':') || raw.username.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.username"),
            "must be non-empty and must not contain `:`",
        ));
        return None;
    }
    match resolver.secret(&raw.password, &format!("{path}.password")) {
        Ok(p) if p.is_empty() => {
            errors.push(ConfigError::new(
                format!("{path}.password"),
                "must not be empty",
            ));
            None
        }
        Ok(p) => Some(BasicCredentials::new(&raw.username, &p)),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

fn build_provider(
    v: &Value,
    path: &str,
    resolver: &mut Resolver,
) -> Result<(Arc<Provider>, [u8; 32]), ConfigError> {
    let Some(obj) = v.as_object() else {
        return Err(ConfigError::new(path, "must be an object"));
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return Err(ConfigError::new(
            format!("{path}.type"),
            "missing; one of oauth2, microsoft, google, google-service-account",
        ));
    };
    let mut rest = obj.clone();
    rest.remove("type");
    let rest = Value::Object(rest);
    // The provider digest covers its definition and its resolved secrets; starting a
    // fresh resolver scope keeps the config-wide digest intact.
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(v.to_string().as_bytes());
    let provider = Provider::from_config(kind, &rest, path, &mut resolver.scoped(&mut digest))?;
    let mut fp = [0u8; 32];
    fp.copy_from_slice(digest.finish().as_ref());
    Ok((Arc::new(provider), fp))
}

struct AccountCtx<'a> {
    id: &'a str,
    path: &'a str,
    providers: &'a HashMap<String, (Arc<Provider>, [u8; 32])>,
    broken_providers: &'a [&'a String],
    shared_names: &'a Interner,
}

/// One allocation per distinct string for names that thousands of accounts repeat
/// (provider names, credential-set ids): with 100k accounts a copy each is ~7 MB.
#[derive(Default)]
struct Interner(std::cell::RefCell<std::collections::HashSet<Arc<str>>>);

impl Interner {
    fn get(&self, s: &str) -> Arc<str> {
        let mut names = self.0.borrow_mut();
        if let Some(name) = names.get(s) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(s);
        names.insert(name.clone());
        name
    }
}

fn build_account(
    v: &Value,
    ctx: &AccountCtx<'_>,
    resolver: &mut Resolver,
) -> Result<Account, Vec<ConfigError>> {
    let path = ctx.path;
    let Some(obj) = v.as_object() else {
        return Err(vec![ConfigError::new(path, "must be an object")]);
    };
    let id: Arc<str> = Arc::from(ctx.id);
    // The account's digest is built from what it resolves to (answer body, credential
    // sets' digests), not by re-serializing its JSON: cheaper with 100k accounts.
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let fixed = |body: Result<Bytes, protocol::AnswerError>, field: &str| {
        body.map_err(|e| vec![ConfigError::new(format!("{path}.{field}"), e.to_string())])
    };
    let finish = |digest: ring::digest::Context| {
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&digest.finish().as_ref()[..16]);
        fp
    };

    if obj.contains_key("pass") {
        let raw: RawPasswordAccount = from_value(v, path).map_err(|e| vec![e])?;
        let pass = resolver
            .secret(&raw.pass, &format!("{path}.pass"))
            .map_err(|e| vec![e])?;
        digest.update(&pass.digest());
        // The user first, so a bad `user` is reported at `user`, not at `pass`.
        check_user(&raw.user, path)?;
        let body = fixed(protocol::password_answer(&raw.user, &pass), "pass")?;
        digest.update(&body);
        return Ok(Account {
            id,
            kind: AccountKind::Fixed(body),
            fingerprint: finish(digest),
        });
    }
    if obj.contains_key("accessToken") {
        let raw: RawStaticAccount = from_value(v, path).map_err(|e| vec![e])?;
        let token = resolver
            .secret(&raw.access_token, &format!("{path}.accessToken"))
            .map_err(|e| vec![e])?;
        digest.update(&token.digest());
        check_user(&raw.user, path)?;
        let body = fixed(protocol::token_answer(&raw.user, &token), "accessToken")?;
        digest.update(&body);
        return Ok(Account {
            id,
            kind: AccountKind::Fixed(body),
            fingerprint: finish(digest),
        });
    }

    let raw: RawOAuthAccount = from_value(v, path).map_err(|e| vec![e])?;
    check_user(&raw.user, path)?;
    let mut errors = Vec::new();
    let refresh_token = match &raw.refresh_token {
        Some(src) => match resolver.secret(src, &format!("{path}.refreshToken")) {
            Ok(s) if s.is_empty() => {
                errors.push(ConfigError::new(
                    format!("{path}.refreshToken"),
                    "must not be empty",
                ));
                None
            }
            Ok(s) => Some(s),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    if let Some(rt) = &refresh_token {
        digest.update(&rt.digest());
    }
    let user: Arc<str> = Arc::from(raw.user.as_str());
    let base = RawOverride {
        provider: Some(raw.provider.clone()),
        grant: raw.grant,
        scopes: raw.scopes.clone(),
    };
    let build = |proto: Option<Proto>, ov: Option<&RawOverride>, field_path: String| {
        let provider_name = ov
            .and_then(|o| o.provider.clone())
            .unwrap_or_else(|| raw.provider.clone());
        let provider_field = if ov.and_then(|o| o.provider.as_ref()).is_some() {
            format!("{field_path}.provider")
        } else {
            format!("{path}.provider")
        };
        let Some((provider, provider_fp)) = ctx.providers.get(&provider_name) else {
            let why = if ctx.broken_providers.contains(&&provider_name) {
                format!("provider `{provider_name}` has errors of its own")
            } else {
                format!("no provider named `{provider_name}` in `providers`")
            };
            return Err(ConfigError::new(provider_field, why));
        };
        let grant = ov
            .and_then(|o| o.grant)
            .or(if ov.and_then(|o| o.provider.as_ref()).is_some() {
                None
            } else {
                base.grant
            })
            .unwrap_or_else(|| provider.default_grant());
        provider
            .check_grant(grant)
            .map_err(|m| ConfigError::new(format!("{path}.grant"), m.to_string()))?;
        // A refresh_token account without `refreshToken` waits for consent: its token
        // comes from the state store (the `consent` command) and it answers 403
        // `consent_required` until then.
        match (grant, &raw.refresh_token) {
            (Grant::RefreshToken, _) => {}
            (other, Some(_)) if proto.is_none() => {
                return Err(ConfigError::new(
                    format!("{path}.refreshToken"),
                    format!("not used by the {} grant; remove it", other.as_str()),
                ))
            }
            _ => {}
        }
        let (scopes, explicit) = match ov.and_then(|o| o.scopes.clone()).or(base.scopes.clone()) {
            Some(s) => (s, true),
            None => (provider.default_scopes(grant, proto), false),
        };
        let scopes_path = format!("{field_path}.scopes");
        for s in &scopes {
            if s.is_empty() || s.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    &scopes_path,
                    "each scope must be non-empty and contain no spaces",
                ));
            }
        }
        provider
            .check_scopes(grant, &scopes, explicit)
            .map_err(|m| ConfigError::new(&scopes_path, m.to_string()))?;
        let set_id = format!("{provider_name}|{}|{}", grant.as_str(), scopes.join(" "));
        let mut d = ring::digest::Context::new(&ring::digest::SHA256);
        d.update(provider_fp);
        d.update(set_id.as_bytes());
        d.update(user.as_bytes());
        if let Some(rt) = &refresh_token {
            d.update(&rt.digest());
        }
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&d.finish().as_ref()[..16]);
        Ok(Arc::new(CredentialSet {
            key: CredentialKey::new(id.clone(), ctx.shared_names.get(&set_id)),
            provider_name: ctx.shared_names.get(&provider_name),
            provider: provider.clone(),
            grant,
            scopes,
            scopes_explicit: explicit,
            user: user.clone(),
            refresh_token: if grant == Grant::RefreshToken {
                refresh_token.clone()
            } else {
                None
            },
            fingerprint,
        }))
    };

    let default = build(None, None, path.to_owned());
    let overrides = [
        raw.protocols.imap.as_ref(),
        raw.protocols.smtp.as_ref(),
        raw.protocols.api.as_ref(),
    ];
    let mut per_proto = Vec::with_capacity(3);
    let mut explicit = [false; 3];
    for (proto, ov) in Proto::ALL.into_iter().zip(overrides) {
        explicit[proto as usize] = ov.is_some();
        // A protocol without an override whose default scopes are the account's default
        // ones *is* the default set: share it instead of building a copy (load time and
        // memory with 100k accounts; see BENCHMARKS.md, P5).
        let same_as_default = match (&default, ov) {
            (Ok(d), None) => {
                d.scopes_explicit || d.provider.default_scopes(d.grant, Some(proto)) == d.scopes
            }
            _ => false,
        };
        per_proto.push(match &default {
            Ok(d) if same_as_default => Ok(d.clone()),
            _ => build(
                Some(proto),
                ov,
                match ov {
                    Some(_) => format!("{path}.protocols.{}", proto.as_str()),
                    None => path.to_owned(),
                },
            ),
        });
    }
    let default = default.map_err(|e| errors.push(e)).ok();
    let per_proto: Vec<_> = per_proto
        .into_iter()
        .filter_map(|r| r.map_err(|e| errors.push(e)).ok())
        .collect();
    errors.dedup();
    if !errors.is_empty() {
        return Err(errors);
    }
    // Protocols that resolve to the default set share its allocation: with 100k accounts
    // the config's own memory matters (see BENCHMARKS.md, P5).
    let per_proto: Vec<Arc<CredentialSet>> = per_proto
        .into_iter()
        .map(|s| match &default {
            Some(d) if d.key == s.key && d.fingerprint == s.fingerprint => d.clone(),
            _ => s,
        })
        .collect();
    let (Some(default), Ok(per_proto)) = (default, <[_; 3]>::try_from(per_proto)) else {
        return Err(vec![ConfigError::new(path, "invalid account")]);
    };
    for set in std::iter::once(&default).chain(per_proto.iter()) {
        digest.update(&set.fingerprint);
    }
    for p in Proto::ALL.into_iter().filter(|p| explicit[*p as usize]) {
        digest.update(p.as_str().as_bytes());
    }
    Ok(Account {
        id,
        kind: AccountKind::OAuth(OAuthAccount {
            default,
            per_proto,
            explicit,
        }),
        fingerprint: finish(digest),
    })
}

fn check_user(user: &str, path: &str) -> Result<(), Vec<ConfigError>> {
    let len = user.encode_utf16().count();
    if len == 0 || len > protocol::MAX_USER_LEN {
        return Err(vec![ConfigError::new(
            format!("{path}.user"),
            format!("must be 1 to {} characters", protocol::MAX_USER_LEN),
        )]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, Vec<ConfigError>> {
        parse(s.as_bytes(), Path::new("."))
    }

    fn paths(r: Result<Config, Vec<ConfigError>>) -> Vec<String> {
        match r {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.into_iter().map(|e| e.path).collect(),
        }
    }

    const PROVIDER: &str = r#""providers": {"idp": {"type": "oauth2", "tokenUrl": "http://127.0.0.1:1/token", "clientId": "c", "clientSecret": "s"}}"#;

    #[test]
    fn password_and_static_accounts_serialize_once() {
        let c = parse_str(
            r#"{"accounts": {"a": {"user": "u", "pass": "p"}, "b": {"user": "v", "accessToken": "t"}}}"#,
        )
        .unwrap();
        match &c.account("a").unwrap().kind {
            AccountKind::Fixed(b) => assert_eq!(&b[..], br#"{"user":"u","pass":"p"}"#),
            _ => panic!(),
        }
        match &c.account("b").unwrap().kind {
            AccountKind::Fixed(b) => assert_eq!(&b[..], br#"{"user":"v","accessToken":"t"}"#),
            _ => panic!(),
        }
    }

    #[test]
    fn accounts_are_found_by_id_in_any_order() {
        let ids = ["m", "a", "zz", "b", "z", "aa"];
        let json: Vec<String> = ids
            .iter()
            .map(|id| format!(r#""{id}": {{"user": "u", "pass": "p"}}"#))
            .collect();
        let c = parse_str(&format!(r#"{{"accounts": {{{}}}}}"#, json.join(","))).unwrap();
        assert_eq!(c.accounts.len(), ids.len());
        for id in ids {
            assert_eq!(&*c.accounts.get(id).unwrap().id, id);
        }
        for absent in ["", "c", "zzz", "A"] {
            assert!(!c.accounts.contains_key(absent), "{absent}");
        }
        let listed: Vec<&str> = c.accounts.keys().map(|k| &**k).collect();
        assert_eq!(listed, ["a", "aa", "b", "m", "z", "zz"]);
        let other = parse_str(
            r#"{"accounts": {"aa": {"user": "u", "pass": "p"}, "c": {"user": "u", "pass": "p"}, "zz": {"user": "u", "pass": "p"}}}"#,
        )
        .unwrap();
        let paired: Vec<(&str, Option<&str>)> = c
            .accounts
            .with_counterparts(&other.accounts)
            .map(|(a, o)| (&*a.id, o.map(|o| &*o.id)))
            .collect();
        assert_eq!(
            paired,
            [
                ("a", None),
                ("aa", Some("aa")),
                ("b", None),
                ("m", None),
                ("z", None),
                ("zz", Some("zz"))
            ]
        );
    }

    #[test]
    fn unknown_fields_and_dangling_providers_are_named() {
        let p = paths(parse_str(&format!(
            r#"{{{PROVIDER}, "accounts": {{
                "x": {{"user": "u", "provider": "nope", "refreshToken": "r"}},
                "y": {{"user": "u", "provider": "idp", "refreshToken": "r", "colour": 1}},
                "z": {{"user": "u", "pass": "p", "extra": true}}
            }}}}"#
        )));
        assert_eq!(
            p,
            vec![
                "accounts.x.provider",
                "accounts.y.colour",
                "accounts.z.extra"
            ]
        );
    }

    #[test]
    fn unknown_field_message_names_the_field() {
        let e = parse_str(&format!(
            r#"{{{PROVIDER}, "accounts": {{"y": {{"user": "u", "provider": "idp", "refreshToken": "r", "colour": 1}}}}}}"#
        ))
        .err()
        .unwrap();
        assert!(e[0].message.contains("colour"), "{}", e[0].message);
    }

    #[test]
    fn a_refresh_grant_without_a_refresh_token_waits_for_consent() {
        let c = parse_str(&format!(
            r#"{{{PROVIDER}, "accounts": {{"x": {{"user": "u", "provider": "idp"}}}}}}"#
        ))
        .unwrap();
        let AccountKind::OAuth(o) = &c.account("x").unwrap().kind else {
            panic!()
        };
        assert_eq!(o.default.grant, Grant::RefreshToken);
        assert!(o.default.refresh_token.is_none());
        // An empty one is still a mistake, not a wish to consent.
        let p = paths(parse_str(&format!(
            r#"{{{PROVIDER}, "accounts": {{"x": {{"user": "u", "provider": "idp", "refreshToken": ""}}}}}}"#
        )));
        assert_eq!(p, vec!["accounts.x.refreshToken"]);
    }

    #[test]
    fn secrets_from_missing_files_and_env_are_errors_without_values() {
        let e = parse_str(
            r#"{"accounts": {"a": {"user": "u", "pass": {"file": "/nonexistent/p"}},
                "b": {"user": "u", "pass": {"env": "EE_AUTH_TEST_SURELY_UNSET"}},
                "c": {"user": "u", "pass": {"vault": "x"}}}}"#,
        )
        .err()
        .unwrap();
        let p: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            p,
            vec!["accounts.a.pass", "accounts.b.pass", "accounts.c.pass"]
        );
    }

    #[test]
    fn protocols_share_sets_unless_overridden() {
        let c = parse_str(&format!(
            r#"{{{PROVIDER}, "accounts": {{"x": {{"user": "u", "provider": "idp", "refreshToken": "r",
                "scopes": ["a"], "protocols": {{"api": {{"scopes": ["b"]}}}}}}}}}}"#
        ))
        .unwrap();
        let AccountKind::OAuth(o) = &c.account("x").unwrap().kind else {
            panic!()
        };
        assert_eq!(
            o.set_for(Some(Proto::Imap)).key,
            o.set_for(Some(Proto::Smtp)).key
        );
        assert_eq!(o.set_for(None).key, o.set_for(Some(Proto::Imap)).key);
        assert_ne!(
            o.set_for(Some(Proto::Api)).key,
            o.set_for(Some(Proto::Imap)).key
        );
        assert_eq!(o.sets().len(), 2);
        assert_eq!(o.warm_sets().len(), 2);
    }

    #[test]
    fn auth_may_list_several_pairs_for_rotation() {
        let c = parse_str(
            r#"{"auth": [{"username": "ee", "password": "old"}, {"username": "ee", "password": "new"}],
                "accounts": {"a": {"user": "u", "pass": "p"}}}"#,
        )
        .unwrap();
        assert!(c.auth.is_some());
        let e = parse_str(r#"{"auth": [{"username": "ee"}], "accounts": {}}"#)
            .err()
            .unwrap();
        assert_eq!(e[0].path, "auth[0]");
        let e = parse_str(r#"{"auth": [], "accounts": {}}"#).err().unwrap();
        assert_eq!(e[0].path, "auth");
    }

    #[test]
    fn misshapen_secrets_are_not_echoed_and_do_not_hide_other_errors() {
        let e = parse_str(
            r#"{"auth": "emailengine:hunter2", "adminAuth": {"username": "a", "password": "p", "x": "y"},
                "accounts": {"a": {"user": "u", "provider": "p", "refreshToken": "r", "scopes": "s\\\"ecret"}}}"#,
        )
        .err()
        .unwrap();
        let p: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(p, vec!["auth", "adminAuth.x", "accounts.a.scopes"]);
        assert!(
            e[0].message.contains("invalid type: a string, expected"),
            "{}",
            e[0].message
        );
        for err in &e {
            assert!(!err.message.contains("hunter2"), "{err}");
        }
        assert!(!e[2].message.contains("ecret"), "{}", e[2]);
    }

    #[test]
    fn bad_json_says_where() {
        let e = parse_str("{\"accounts\": {").err().unwrap();
        assert_eq!(e[0].path, "(file)");
        assert!(e[0].message.contains("line 1"), "{}", e[0].message);
    }

    #[test]
    fn a_key_given_twice_is_named_by_its_whole_path_through_lists_and_odd_keys() {
        let cases = [
            (
                r#"{"auth": [{"username": "a", "password": "p"}, {"username": "b", "username": "c", "password": "q"}]}"#,
                "auth[1].username",
            ),
            (
                r#"{"accounts": {"a b": {"user": "u", "pass": "p"}, "x": {"user": "u", "pass": "p", "pass": "q"}}}"#,
                "accounts.x.pass",
            ),
            (
                r#"{"accounts": {"a b": {"user": "u", "user": "v", "pass": "p"}}}"#,
                r#"accounts["a b"].user"#,
            ),
        ];
        for (text, path) in cases {
            let e = parse_str(text).err().unwrap();
            assert_eq!(e[0].path, path, "{text}");
            assert!(e[0].message.contains("appears twice"), "{}", e[0].message);
        }
        // The first duplicate in document order is the one named.
        assert_eq!(
            duplicate_key(br#"{"a": {"k": 1, "k": 2}, "a": 3}"#).as_deref(),
            Some("a.k")
        );
        // Keys seen in one object do not count in another.
        assert!(
            duplicate_key(br#"{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}"#)
                .is_none()
        );
    }
}
