#![allow(dead_code)] // each cargo-fuzz target uses one of these

//! What the fuzz targets check, shared by the cargo-fuzz targets (`fuzz_targets/`) and
//! the stable-toolchain mutation run in `tests/fuzz.rs`: each function takes arbitrary
//! bytes, must not panic, and asserts the parser's own promises on what it accepts.

use std::path::Path;

use ee_auth_sidecar::protocol::{decode_basic, parse_query, BasicCredentials};
use ee_auth_sidecar::secret::Secret;

/// `parse_query`: never panics; an accepted query names a non-empty account, and the
/// parser is deterministic.
pub fn query(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let first = parse_query(Some(s));
    if let Ok(q) = &first {
        assert!(!q.account.is_empty());
    }
    assert_eq!(first, parse_query(Some(s)));
}

/// `decode_basic`: never panics; what it accepts holds a colon; and credentials match a
/// header exactly when it decodes to their bytes.
pub fn basic(data: &[u8]) {
    let decoded = decode_basic(data);
    if let Some(d) = &decoded {
        assert!(d.contains(&b':'));
    }
    let creds = BasicCredentials::new("ee", &Secret::new("p:w"));
    assert_eq!(
        creds.matches(Some(data)),
        decoded.as_deref() == Some(&b"ee:p:w"[..])
    );
}

/// `config::parse`: never panics, and every error names a place and a reason. Secret
/// files resolve against a directory that does not exist.
pub fn config(data: &[u8]) {
    if let Err(errors) = ee_auth_sidecar::config::parse(data, Path::new("/nonexistent-fuzz-dir")) {
        assert!(!errors.is_empty());
        for e in errors {
            assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
}

/// `parse_token_response`: never panics; an accepted answer's access token, if any, is not
/// empty, and so is its refresh token; a lifetime, if any, is sane (at least a second: the cache plans refreshes from it, and
/// clamps a long one to its maximum).
pub fn token_response(data: &[u8]) {
    if let Ok(g) = ee_auth_sidecar::provider::parse_token_response(data) {
        if let Some(t) = &g.access_token {
            assert!(!t.expose().is_empty());
        }
        if let ee_auth_sidecar::provider::ExpiresIn::Given(l) = g.expires_in {
            assert!(l.as_secs() >= 1, "{l:?}");
        }
        if let Some(r) = &g.refresh_token {
            assert!(!r.expose().is_empty());
        }
    }
}
