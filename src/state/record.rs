//! One account's record as both stores keep it: JSON, plain (version 1) or sealed with
//! `--state-key-file` (version 2), with the store-wide generation a compare-and-set
//! checks.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::seal::{Keyring, OpenError, Sealed};
use crate::secret::Secret;

/// The record kind in the associated data of a sealed refresh token.
pub(crate) const KIND_REFRESH: &str = "refresh-token";
/// The record kind in the associated data of a sealed access token.
pub(crate) const KIND_ACCESS: &str = "access-token";

/// A record on disk or in Redis.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileRecord {
    version: u32,
    account: String,
    /// Hex SHA-256 of the config refresh token this chain of rotations started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    /// Version 2: the key's name and the sealed [`Payload`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    /// Rotations of this account across every process; a write names the one it follows.
    #[serde(default)]
    generation: u64,
    updated_at_unix: u64,
}

/// What a sealed record holds.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    config_token_sha256: String,
    refresh_token: String,
}

/// A decoded record.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub origin: [u8; 32],
    pub token: Secret,
    pub generation: u64,
}

/// Why a stored record is not used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] crate::files::ReadError),
    /// Not JSON of a record.
    #[error("not a refresh-token record")]
    NotARecord,
    /// A version this build does not know.
    #[error("unknown record version {0}")]
    Version(u32),
    /// The origin digest is malformed.
    #[error("bad configTokenSha256")]
    Origin,
    /// No token in it.
    #[error("empty refreshToken")]
    EmptyToken,
    /// Sealed, and no key was given.
    #[error("the record is sealed and no --state-key-file was given")]
    NoKey,
    /// Plain where keys are given: anyone who can write to the store could have put it
    /// there, and nothing ties it to the account.
    #[error("the record is not sealed, and with --state-key-file every record must be (planted, or written before the key was set: seal the store with `state migrate --from … --to … --state-key-file …`, which copies plain records too and lists them)")]
    Unsealed,
    /// The seal does not open.
    #[error("{0}")]
    Seal(#[from] OpenError),
    /// The record names another account than the one it is stored under.
    #[error("holds the record of another account ({0}): copied from it")]
    OtherAccount(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The JSON of `account`'s record, sealed when there are keys.
pub(crate) fn encode(
    account: &str,
    stored: &Stored,
    keys: Option<&Keyring>,
) -> Result<Vec<u8>, serde_json::Error> {
    let origin = hex(&stored.origin);
    let mut rec = FileRecord {
        version: 1,
        account: account.to_owned(),
        config_token_sha256: None,
        refresh_token: None,
        key: None,
        sealed: None,
        generation: stored.generation,
        updated_at_unix: now_unix(),
    };
    match keys {
        Some(keys) => {
            let payload = serde_json::to_vec(&Payload {
                config_token_sha256: origin,
                refresh_token: stored.token.expose().to_owned(),
            })?;
            let Some(sealed) = keys.seal(account, KIND_REFRESH, &payload) else {
                return Err(serde::ser::Error::custom("sealing failed"));
            };
            rec.version = 2;
            rec.key = Some(sealed.key);
            rec.sealed = Some(sealed.value);
        }
        None => {
            rec.config_token_sha256 = Some(origin);
            rec.refresh_token = Some(stored.token.expose().to_owned());
        }
    }
    serde_json::to_vec(&rec)
}

/// The generation of a record without opening it (a compare-and-set needs no key), and
/// whether it is sealed.
pub(crate) fn generation_of(bytes: &[u8]) -> Option<(u64, bool)> {
    #[derive(Deserialize)]
    struct Gen {
        #[serde(default)]
        generation: u64,
        #[serde(default)]
        sealed: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Gen>(bytes)
        .ok()
        .map(|g| (g.generation, g.sealed.is_some()))
}

/// Decodes a record. With `expected`, a record naming another account is refused; the
/// error carries the account the record claims, when it can be read.
pub(crate) fn decode(
    bytes: &[u8],
    keys: Option<&Keyring>,
    expected: Option<&str>,
) -> Result<(String, Stored), (Option<String>, RecordError)> {
    let rec: FileRecord =
        serde_json::from_slice(bytes).map_err(|_| (None, RecordError::NotARecord))?;
    let account = rec.account.clone();
    let fail = |e| (Some(account.clone()), e);
    if let Some(want) = expected.filter(|w| *w != rec.account) {
        return Err((
            Some(want.to_owned()),
            RecordError::OtherAccount(rec.account),
        ));
    }
    let (origin, token) = match rec.version {
        1 if keys.is_some() => return Err(fail(RecordError::Unsealed)),
        1 => (
            rec.config_token_sha256.unwrap_or_default(),
            rec.refresh_token.unwrap_or_default(),
        ),
        2 => {
            let keys = keys.ok_or_else(|| fail(RecordError::NoKey))?;
            let sealed = Sealed {
                key: rec.key.unwrap_or_default(),
                value: rec.sealed.unwrap_or_default(),
            };
            let plain = keys
                .open(&account, KIND_REFRESH, &sealed)
                .map_err(|e| fail(e.into()))?;
            let p: Payload =
                serde_json::from_slice(&plain).map_err(|_| fail(RecordError::NotARecord))?;
            (p.config_token_sha256, p.refresh_token)
        }
        v => return Err(fail(RecordError::Version(v))),
    };
    let origin = unhex32(&origin).ok_or_else(|| fail(RecordError::Origin))?;
    if token.is_empty() {
        return Err(fail(RecordError::EmptyToken));
    }
    Ok((
        account,
        Stored {
            origin,
            token: Secret::new(token),
            generation: rec.generation,
        },
    ))
}

/// An access token kept for warm restarts: sealed (when there are keys) with its expiry.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    expires_at_unix_ms: u64,
}

/// Encodes an access token for the credential set named `name`.
pub(crate) fn encode_access(
    name: &str,
    token: &Secret,
    expires_at_unix_ms: u64,
    keys: Option<&Keyring>,
) -> Option<Vec<u8>> {
    let mut rec = AccessRecord {
        key: None,
        sealed: None,
        access_token: None,
        expires_at_unix_ms,
    };
    match keys {
        Some(keys) => {
            // The expiry is bound in too: a record cannot be made to live longer.
            let aad_kind = format!("{KIND_ACCESS}:{expires_at_unix_ms}");
            let sealed = keys.seal(name, &aad_kind, token.expose().as_bytes())?;
            rec.key = Some(sealed.key);
            rec.sealed = Some(sealed.value);
        }
        None => rec.access_token = Some(token.expose().to_owned()),
    }
    serde_json::to_vec(&rec).ok()
}

/// Decodes an access token record; `None` when it does not open or is malformed.
pub(crate) fn decode_access(
    name: &str,
    bytes: &[u8],
    keys: Option<&Keyring>,
) -> Option<(Secret, u64)> {
    let rec: AccessRecord = serde_json::from_slice(bytes).ok()?;
    let token = match (keys, rec.sealed) {
        (Some(keys), Some(value)) => {
            let aad_kind = format!("{KIND_ACCESS}:{}", rec.expires_at_unix_ms);
            let sealed = Sealed {
                key: rec.key.unwrap_or_default(),
                value,
            };
            String::from_utf8(keys.open(name, &aad_kind, &sealed).ok()?).ok()?
        }
        (None, None) => rec.access_token?,
        _ => return None,
    };
    (!token.is_empty()).then(|| (Secret::new(token), rec.expires_at_unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(token: &str) -> Stored {
        Stored {
            origin: [7; 32],
            token: Secret::new(token),
            generation: 3,
        }
    }

    #[test]
    fn plain_and_sealed_records_round_trip_and_a_moved_one_is_refused() {
        let keys = Keyring::from_keys(&[[9; 32]]);
        for k in [None, Some(&keys)] {
            let bytes = encode("a", &stored("rt-x"), k).unwrap();
            assert_eq!(
                k.is_some(),
                !String::from_utf8_lossy(&bytes).contains("rt-x")
            );
            let (account, s) = decode(&bytes, k, Some("a")).unwrap();
            assert_eq!((account.as_str(), s.token.expose()), ("a", "rt-x"));
            assert_eq!((s.origin, s.generation), ([7; 32], 3));
            assert_eq!(generation_of(&bytes), Some((3, k.is_some())));
            let (who, e) = decode(&bytes, k, Some("b")).unwrap_err();
            assert_eq!(who.as_deref(), Some("b"));
            assert!(
                matches!(e, RecordError::OtherAccount(ref a) if a == "a"),
                "{e}"
            );
        }
        // A sealed record whose account field was edited to the target's does not open.
        let bytes = encode("a", &stored("rt-x"), Some(&keys)).unwrap();
        let edited = String::from_utf8(bytes)
            .unwrap()
            .replace("\"account\":\"a\"", "\"account\":\"b\"");
        let (who, e) = decode(edited.as_bytes(), Some(&keys), Some("b")).unwrap_err();
        assert_eq!(who.as_deref(), Some("b"));
        assert!(matches!(e, RecordError::Seal(OpenError::Tampered)), "{e}");
        let (_, e) = decode(edited.as_bytes(), None, None).unwrap_err();
        assert!(matches!(e, RecordError::NoKey));
        // With keys, a plain record is refused: nothing ties it to the account.
        let plain = encode("a", &stored("rt-x"), None).unwrap();
        let (who, e) = decode(&plain, Some(&keys), Some("a")).unwrap_err();
        assert_eq!(who.as_deref(), Some("a"));
        assert!(matches!(e, RecordError::Unsealed), "{e}");
    }

    #[test]
    fn access_records_bind_their_expiry() {
        let keys = Keyring::from_keys(&[[9; 32]]);
        let bytes = encode_access("fp", &Secret::new("at-1"), 1000, Some(&keys)).unwrap();
        let (t, exp) = decode_access("fp", &bytes, Some(&keys)).unwrap();
        assert_eq!((t.expose(), exp), ("at-1", 1000));
        let longer = String::from_utf8(bytes).unwrap().replace("1000", "9999999");
        assert!(decode_access("fp", longer.as_bytes(), Some(&keys)).is_none());
        assert!(decode_access("other", longer.as_bytes(), Some(&keys)).is_none());
    }
}
