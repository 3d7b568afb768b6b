//! A wrapper for every credential the sidecar handles, so none can be printed by accident.

use std::fmt;
use std::sync::Arc;

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
        let d = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
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
