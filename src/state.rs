//! Durable store of rotated refresh tokens.
//!
//! Microsoft (and strict-rotation providers) hand out a new refresh token on every
//! refresh; the old one dies sooner or later. Forgetting a rotated token therefore loses
//! the account weeks later, so each rotation is written to disk — temp file, fsync,
//! rename, fsync of the directory, mode 0600 — *before* the new token is used or the
//! access token that came with it is served. One small file per account keeps every
//! write small and independent, and a crash can leave at worst a stray temp file.
//!
//! A persisted token wins over the config's, unless the config's token is not the one the
//! persisted chain started from: then an operator re-consented, and the config wins.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating, reading or writing under the state directory failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileRecord {
    version: u32,
    account: String,
    /// Hex SHA-256 of the config refresh token this chain of rotations started from.
    config_token_sha256: String,
    refresh_token: String,
    updated_at_unix: u64,
}

#[derive(Clone)]
struct Record {
    origin: [u8; 32],
    token: Secret,
}

/// The newest refresh token of every account whose token has rotated, in memory and (with
/// a directory) on disk; other accounts spend their config's token.
pub struct TokenStore {
    dir: Option<PathBuf>,
    records: Mutex<HashMap<Arc<str>, Record>>,
}

impl TokenStore {
    /// A store that keeps rotated tokens in memory only (lost on restart).
    pub fn in_memory() -> Self {
        TokenStore {
            dir: None,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// Opens (creating, mode 0700) a state directory and loads every persisted token.
    /// Unreadable records are reported and skipped; stray temp files are removed.
    pub fn open(dir: &Path) -> Result<(Self, Vec<String>), StateError> {
        let tokens = dir.join("refresh-tokens");
        let mut warnings = Vec::new();
        let dir_existed = dir.exists();
        fs::create_dir_all(&tokens).map_err(io_err(&tokens))?;
        // The tokens' own directory is ours: always private. The state directory itself may
        // be a volume root owned by root (emptyDir, PVC), where chmod is not permitted; it
        // is made private when we created it, and otherwise only tightened if we can.
        fs::set_permissions(&tokens, fs::Permissions::from_mode(0o700)).map_err(io_err(&tokens))?;
        if !dir_existed {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        } else if fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(false)
        {
            if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                warnings.push(format!(
                    "{}: cannot make it private ({e}); the token files are private in {}",
                    dir.display(),
                    tokens.display()
                ));
            }
        }
        let mut records = HashMap::new();
        for entry in fs::read_dir(&tokens).map_err(io_err(&tokens))? {
            let path = entry.map_err(io_err(&tokens))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                // A write that never reached its rename: the previous file is intact.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match read_record(&path) {
                Ok((account, rec)) => {
                    records.insert(Arc::from(account.as_str()), rec);
                }
                Err(why) => warnings.push(format!("{}: {why}; ignored", path.display())),
            }
        }
        Ok((
            TokenStore {
                dir: Some(tokens),
                records: Mutex::new(records),
            },
            warnings,
        ))
    }

    /// Whether rotations survive a restart.
    pub fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    /// How many accounts have a rotated token (persisted or in memory).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no account has a stored token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Record>> {
        // A panic while holding this lock cannot leave a record half-written in memory
        // (inserts are single operations), so a poisoned lock is still consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The refresh token to spend for `account`, given the config's token. Returns the
    /// token and the digest of the config token it descends from (pass it to `rotate`).
    pub fn current(&self, account: &Arc<str>, config_token: &Secret) -> (Secret, [u8; 32]) {
        let origin = config_token.digest();
        let mut records = self.lock();
        match records.get(account) {
            Some(r) if r.origin == origin => (r.token.clone(), origin),
            Some(_) => {
                // The operator put a new token in the config: it wins over the rotated
                // descendant of the old one.
                records.remove(account);
                (config_token.clone(), origin)
            }
            // No rotation yet: the config's token, with no record (a record per account
            // would cost memory on maps where nothing rotates).
            None => (config_token.clone(), origin),
        }
    }

    /// Records a rotated refresh token: durably first (when there is a directory), then
    /// in memory. The memory copy is updated even if the write fails, because the old
    /// token may already be dead at the provider; the error is returned for the log.
    pub async fn rotate(
        &self,
        account: &Arc<str>,
        origin: [u8; 32],
        token: Secret,
    ) -> Result<(), StateError> {
        let result = match &self.dir {
            Some(dir) => {
                let dir = dir.clone();
                let account_s = account.to_string();
                let token_c = token.clone();
                tokio::task::spawn_blocking(move || {
                    write_record(&dir, &account_s, origin, &token_c)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(StateError::Io {
                        path: PathBuf::from("(state writer)"),
                        source: std::io::Error::other(e.to_string()),
                    })
                })
            }
            None => Ok(()),
        };
        self.lock()
            .insert(account.clone(), Record { origin, token });
        result
    }
}

/// The file name for an account: a digest, because account ids can hold any character.
fn file_name(account: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, account.as_bytes());
    format!("{}.json", hex(d.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_record(path: &Path) -> Result<(String, Record), String> {
    // A record is a few KB; a FIFO or a device planted here must not block start-up.
    let text = crate::files::read_limited(
        path,
        crate::files::MAX_STATE_RECORD_BYTES,
        "a refresh-token record",
    )
    .map_err(|e| e.to_string())?;
    let rec: FileRecord =
        serde_json::from_slice(&text).map_err(|_| "not a refresh-token record".to_owned())?;
    if rec.version != 1 {
        return Err(format!("unknown record version {}", rec.version));
    }
    let mut origin = [0u8; 32];
    if rec.config_token_sha256.len() != 64 {
        return Err("bad configTokenSha256".into());
    }
    for (i, chunk) in rec.config_token_sha256.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| "bad configTokenSha256".to_owned())?;
        origin[i] = u8::from_str_radix(s, 16).map_err(|_| "bad configTokenSha256".to_owned())?;
    }
    if rec.refresh_token.is_empty() {
        return Err("empty refreshToken".into());
    }
    Ok((
        rec.account,
        Record {
            origin,
            token: Secret::new(rec.refresh_token),
        },
    ))
}

/// Atomically replaces one account's record: temp file (0600), fsync, rename, fsync dir.
fn write_record(
    dir: &Path,
    account: &str,
    origin: [u8; 32],
    token: &Secret,
) -> Result<(), StateError> {
    let name = file_name(account);
    let final_path = dir.join(&name);
    let tmp_path = dir.join(format!("{name}.tmp"));
    let record = FileRecord {
        version: 1,
        account: account.to_owned(),
        config_token_sha256: hex(&origin),
        refresh_token: token.expose().to_owned(),
        updated_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| StateError::Io {
        path: tmp_path.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp_path)
        .map_err(io_err(&tmp_path))?;
    f.write_all(&bytes).map_err(io_err(&tmp_path))?;
    f.sync_all().map_err(io_err(&tmp_path))?;
    drop(f);
    fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotation_survives_reopen_and_config_wins_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let acct: Arc<str> = Arc::from("a");
        let cfg = Secret::new("config-rt");
        {
            let (store, warnings) = TokenStore::open(dir.path()).unwrap();
            assert!(warnings.is_empty());
            let (t, origin) = store.current(&acct, &cfg);
            assert_eq!(t.expose(), "config-rt");
            store
                .rotate(&acct, origin, Secret::new("rt-2"))
                .await
                .unwrap();
            assert_eq!(store.current(&acct, &cfg).0.expose(), "rt-2");
        }
        let (store, _) = TokenStore::open(dir.path()).unwrap();
        assert_eq!(store.current(&acct, &cfg).0.expose(), "rt-2");
        // Operator re-consented: the config's new token wins over the persisted one.
        let (t, _) = store.current(&acct, &Secret::new("reconsented"));
        assert_eq!(t.expose(), "reconsented");

        let meta = fs::metadata(dir.path().join("refresh-tokens").join(file_name("a"))).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn torn_or_foreign_files_are_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("refresh-tokens");
        fs::create_dir_all(&tokens).unwrap();
        fs::write(tokens.join("x.json"), b"{\"version\":1,").unwrap();
        fs::write(tokens.join("y.json.tmp"), b"partial").unwrap();
        let (store, warnings) = TokenStore::open(dir.path()).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(store.is_empty());
        assert!(!tokens.join("y.json.tmp").exists());
    }
}
