//! Encryption at rest of state records: AES-256-GCM (ring) with keys from
//! `--state-key-file`, newest first.
//!
//! Each seal draws a random 96-bit nonce. The associated data binds a sealed record to its
//! account, its kind (refresh token, access token) and the key's name, so a record copied to
//! another account's name, or from one kind to another, fails to open instead of being used.
//! A record sealed under an older key still opens; the store re-seals it with the newest
//! key on its next write.

use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The largest key file read: a few dozen keys, with comments.
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// At most this many keys (newest first; the others only open old records).
pub const MAX_KEYS: usize = 32;

/// Why `--state-key-file` is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("--state-key-file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: crate::files::ReadError,
    },
    /// A line is not a 32-byte key.
    #[error("--state-key-file {path}, line {line}: not a 32-byte key (64 hex digits or 44 base64 characters, one key per line, newest first; make one with `head -c32 /dev/urandom | base64`)")]
    BadKey {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
    },
    /// No key in the file.
    #[error("--state-key-file {path}: no key in it (one 32-byte key per line, hex or base64, newest first)")]
    Empty {
        /// The file.
        path: String,
    },
    /// More keys than [`MAX_KEYS`].
    #[error("--state-key-file {path}: more than {MAX_KEYS} keys; drop the oldest once no record uses them")]
    TooMany {
        /// The file.
        path: String,
    },
}

/// Why a sealed record does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Sealed under a key that is not in the key file.
    #[error("sealed with key {0}, which is not in --state-key-file (put the old key back, after the new one)")]
    UnknownKey(String),
    /// The ciphertext, the account or the kind does not match: tampered with or moved.
    #[error(
        "does not open with its key: the record was tampered with or copied from another account"
    )]
    Tampered,
    /// Not base64, or too short.
    #[error("the sealed value is malformed")]
    Malformed,
}

struct Key {
    /// Hex of the first 8 bytes of the key's SHA-256: names the key in records.
    name: String,
    key: LessSafeKey,
}

/// The keys of `--state-key-file`, newest first.
pub struct Keyring {
    keys: Vec<Key>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.names())
            .finish()
    }
}

/// A sealed value: the key's name and `base64(nonce || ciphertext || tag)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The key's name.
    pub key: String,
    /// Nonce, ciphertext and tag, base64.
    pub value: String,
}

impl Keyring {
    /// Reads a key file: one key per line (64 hex digits or standard base64 of 32 bytes),
    /// newest first; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<Keyring, KeyFileError> {
        let shown = || path.display().to_string();
        let text = crate::files::read_limited(path, MAX_KEY_FILE_BYTES, "a state key file")
            .map_err(|source| KeyFileError::Read {
                path: shown(),
                source,
            })?;
        let text = String::from_utf8_lossy(&text);
        let mut raw = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = parse_key(line).ok_or_else(|| KeyFileError::BadKey {
                path: shown(),
                line: i + 1,
            })?;
            raw.push(key);
            if raw.len() > MAX_KEYS {
                return Err(KeyFileError::TooMany { path: shown() });
            }
        }
        if raw.is_empty() {
            return Err(KeyFileError::Empty { path: shown() });
        }
        Ok(Keyring::from_keys(&raw))
    }

    /// A keyring of these raw keys, newest first (tests and the loader).
    pub fn from_keys(raw: &[[u8; 32]]) -> Keyring {
        let keys = raw
            .iter()
            .filter_map(|k| {
                let digest = ring::digest::digest(&ring::digest::SHA256, k);
                let name = digest.as_ref()[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let key = UnboundKey::new(&AES_256_GCM, k).ok()?;
                Some(Key {
                    name,
                    key: LessSafeKey::new(key),
                })
            })
            .collect();
        Keyring {
            keys,
            rng: SystemRandom::new(),
        }
    }

    /// The keys' names, newest first.
    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// The newest key's name: a record sealed under another one is re-sealed on write.
    pub fn newest(&self) -> &str {
        self.keys.first().map_or("", |k| k.name.as_str())
    }

    /// Seals `plain` for `account`'s record of `kind` with the newest key.
    pub fn seal(&self, account: &str, kind: &str, plain: &[u8]) -> Option<Sealed> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(account, kind, &key.name)),
                &mut buf,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Some(Sealed {
            key: key.name.clone(),
            value: base64::engine::general_purpose::STANDARD.encode(out),
        })
    }

    /// Opens a sealed record of `kind` that claims to be `account`'s.
    pub fn open(&self, account: &str, kind: &str, sealed: &Sealed) -> Result<Vec<u8>, OpenError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.name == sealed.key)
            .ok_or_else(|| OpenError::UnknownKey(sealed.key.clone()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed.value.as_bytes())
            .map_err(|_| OpenError::Malformed)?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(OpenError::Malformed);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Malformed)?;
        let mut buf = rest.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(aad(account, kind, &key.name)), &mut buf)
            .map_err(|_| OpenError::Tampered)?;
        Ok(plain.to_vec())
    }
}

/// Associated data: account, kind and key name, each length-prefixed so no two
/// different triples give the same bytes.
fn aad(account: &str, kind: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(account.len() + kind.len() + key.len() + 12);
    for part in [account, kind, key] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}

fn parse_key(line: &str) -> Option<[u8; 32]> {
    let bytes = if line.len() == 64 && line.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(line.get(i * 2..i * 2 + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(line.as_bytes())
            .ok()?
    };
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_for_its_account_kind_and_content() {
        let ring = Keyring::from_keys(&[[1; 32]]);
        let s = ring.seal("a", "refresh-token", b"secret").unwrap();
        assert!(!s.value.contains("secret"));
        assert_eq!(ring.open("a", "refresh-token", &s).unwrap(), b"secret");
        assert_eq!(
            ring.open("b", "refresh-token", &s),
            Err(OpenError::Tampered)
        );
        assert_eq!(ring.open("a", "access-token", &s), Err(OpenError::Tampered));
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(&s.value)
            .unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let flipped = Sealed {
            value: base64::engine::general_purpose::STANDARD.encode(bytes),
            ..s.clone()
        };
        assert_eq!(
            ring.open("a", "refresh-token", &flipped),
            Err(OpenError::Tampered)
        );
        // Two seals of one value differ (random nonce).
        assert_ne!(ring.seal("a", "refresh-token", b"secret").unwrap(), s);
    }

    #[test]
    fn older_keys_open_and_the_newest_seals() {
        let old = Keyring::from_keys(&[[1; 32]]);
        let s = old.seal("a", "k", b"x").unwrap();
        let rotated = Keyring::from_keys(&[[2; 32], [1; 32]]);
        assert_eq!(rotated.open("a", "k", &s).unwrap(), b"x");
        assert_ne!(rotated.newest(), s.key);
        assert_eq!(rotated.seal("a", "k", b"x").unwrap().key, rotated.newest());
        let new_only = Keyring::from_keys(&[[2; 32]]);
        assert!(matches!(
            new_only.open("a", "k", &s),
            Err(OpenError::UnknownKey(_))
        ));
    }

    #[test]
    fn key_files_take_hex_or_base64_and_say_which_line_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let hex = "ab".repeat(32);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        std::fs::write(&path, format!("# newest first\n{hex}\n\n{b64}\n")).unwrap();
        let ring = Keyring::load(&path).unwrap();
        assert_eq!(ring.names().len(), 2);
        std::fs::write(&path, format!("{hex}\nnot-a-key\n")).unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("32-byte key"), "{e}");
        assert!(!e.contains(&hex), "no key material in errors: {e}");
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyFileError::Empty { .. })
        ));
        std::fs::write(&path, "ab".repeat(31)).unwrap();
        assert!(matches!(
            Keyring::load(&path),
            Err(KeyFileError::BadKey { line: 1, .. })
        ));
    }
}
