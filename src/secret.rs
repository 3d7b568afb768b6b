//! A wrapper for every credential the sidecar handles, so none can be printed by accident,
//! and where the config's secrets come from (literal, file, environment) and how they are
//! resolved while a config is built.
//!
//! A leaf: besides the other leaves (`files`, `credentials`) it imports nothing of the crate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::credentials::ConfigError;
use crate::files;

/// A secret string: refresh token, access token, client secret, password or key.
///
/// `Debug` and `Display` print `[redacted]`, so a secret that ends up in a log line, an
/// error or a metric label by mistake leaks nothing. The only way to the value is
/// [`Secret::expose`], which makes every use of it easy to find in review.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call it only where the value goes on the wire or to disk.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A SHA-256 digest of the value: lets us tell whether a secret changed without
    /// keeping or comparing the secret itself in places that outlive it (the state file).
    pub fn digest(&self) -> [u8; 32] {
        sha256(self.0.as_bytes())
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from: the config itself, a file, or an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The value written in the config.
    Literal(Secret),
    /// `{"file": "/path"}`: the file's content (one trailing newline removed).
    File(PathBuf),
    /// `{"env": "NAME"}`: an environment variable, read at each load.
    Env(String),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = r#"a string, {"file": "/path"} or {"env": "NAME"}"#;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(SecretSource::Literal(Secret::new(s))),
            Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
                Some((k, Value::String(v))) if k == "file" => Ok(SecretSource::File(v.into())),
                Some((k, Value::String(v))) if k == "env" => Ok(SecretSource::Env(v)),
                _ => Err(serde::de::Error::custom(format!("expected {EXPECTED}"))),
            },
            _ => Err(serde::de::Error::custom(format!("expected {EXPECTED}"))),
        }
    }
}

/// Resolves secrets while a config is built, and records what the config depends on:
/// the secret files (to watch them) and a digest of everything (to skip no-op reloads).
pub struct Resolver {
    base_dir: PathBuf,
    digest: ring::digest::Context,
    files: Vec<PathBuf>,
    /// Each secret file read and the SHA-256 of its bytes as read.
    file_digests: Vec<(PathBuf, [u8; 32])>,
}

impl Resolver {
    /// A resolver for one config load; relative secret file paths resolve against
    /// `base_dir`, and the digest starts with the config's own bytes.
    pub fn new(base_dir: PathBuf, config_text: &[u8]) -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(config_text);
        Resolver {
            base_dir,
            digest,
            files: Vec::new(),
            file_digests: Vec::new(),
        }
    }

    /// The secret's value, or an error naming `path` (never the value).
    pub fn secret(&mut self, source: &SecretSource, path: &str) -> Result<Secret, ConfigError> {
        let secret = match source {
            SecretSource::Literal(s) => return Ok(s.clone()),
            SecretSource::File(file) => {
                let full = self.base_dir.join(file);
                self.files.push(full.clone());
                let mut text = read_secret_file(&full).map_err(|e| {
                    ConfigError::new(
                        path,
                        format!("cannot read secret file {}: {e}", full.display()),
                    )
                })?;
                self.file_digests
                    .push((full.clone(), sha256(text.as_bytes())));
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                Secret::new(text)
            }
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) => Secret::new(v),
                Err(_) => {
                    return Err(ConfigError::new(
                        path,
                        format!("environment variable {name} is not set or not UTF-8"),
                    ))
                }
            },
        };
        self.digest.update(path.as_bytes());
        self.digest.update(&secret.digest());
        Ok(secret)
    }

    /// A view of this resolver that also folds each secret into `digest` (one
    /// provider's fingerprint).
    pub fn scoped<'a>(&'a mut self, digest: &'a mut ring::digest::Context) -> ScopedResolver<'a> {
        ScopedResolver {
            inner: self,
            digest,
        }
    }

    /// What the config depends on, once every secret is resolved.
    pub fn finish(self) -> Resolved {
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(self.digest.finish().as_ref());
        let mut files = self.files;
        files.sort();
        files.dedup();
        Resolved {
            fingerprint,
            files,
            file_digests: self.file_digests,
        }
    }
}

/// What a finished [`Resolver`] recorded.
pub struct Resolved {
    /// Digest of the config text and every resolved secret.
    pub fingerprint: [u8; 32],
    /// The secret files read, sorted, each once.
    pub files: Vec<PathBuf>,
    /// Each secret file read and the SHA-256 of its bytes as read.
    pub file_digests: Vec<(PathBuf, [u8; 32])>,
}

/// A [`Resolver`] that also folds each secret into one provider's digest.
pub struct ScopedResolver<'a> {
    inner: &'a mut Resolver,
    digest: &'a mut ring::digest::Context,
}

impl ScopedResolver<'_> {
    /// The secret's value, or an error naming `path`.
    pub fn secret(&mut self, source: &SecretSource, path: &str) -> Result<Secret, ConfigError> {
        let s = self.inner.secret(source, path)?;
        self.digest.update(&s.digest());
        Ok(s)
    }
}

/// What a secret file is called in a read error.
pub const SECRET_FILE: &str = "a secret file";

/// A secret file's text: a regular file of at most 1 MiB (a secret pointed at a FIFO, a
/// device or a huge file by mistake must not hang or exhaust the loader).
fn read_secret_file(path: &Path) -> Result<String, files::ReadError> {
    let bytes = files::read_limited(path, files::MAX_SECRET_FILE_BYTES, SECRET_FILE)?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8").into())
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn digest_changes_with_the_value() {
        assert_ne!(Secret::new("a").digest(), Secret::new("b").digest());
        assert_eq!(Secret::new("a").digest(), Secret::new("a").digest());
    }
}
