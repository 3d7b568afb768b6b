//! The directory store: one small JSON file per account under `<dir>/refresh-tokens`,
//! written temp file, fsync, rename, fsync of the directory, mode 0600.
//!
//! Several processes may share a directory (a sidecar and `token`, an overlapping pod on
//! a shared volume): each holds a shared `flock` on `<dir>/lock` while it uses the
//! directory (so `state migrate` can tell it is in use), and a spender of a refresh token
//! holds an exclusive `flock` on `<dir>/locks/<account digest>.lock`, which the kernel
//! releases when the process dies.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::StateError;

/// A directory store.
pub(crate) struct DirStore {
    pub root: PathBuf,
    pub tokens: PathBuf,
    locks: PathBuf,
    /// The shared lock on `<dir>/lock` while this process uses the directory.
    holder: Mutex<Option<fs::File>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A record file's path and its bytes, or why it could not be read.
pub(crate) type RecordFile = (PathBuf, Result<Vec<u8>, String>);

/// A held per-account lock: the open file whose `flock` it is.
pub(crate) struct FileLease(#[allow(dead_code)] fs::File);

/// `flock` kinds.
#[derive(Clone, Copy)]
pub(crate) enum Flock {
    Shared,
    Exclusive,
}

/// Opens a lock file (never following a symlink, never blocking on a FIFO).
fn open_lock_file(path: &Path) -> Result<fs::File, StateError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(StateError::Io {
            path: path.to_owned(),
            source: std::io::Error::other("not a regular file; remove it"),
        });
    }
    Ok(file)
}

/// `flock(kind | LOCK_NB)`: Ok(false) when another holder has it.
#[allow(unsafe_code)]
pub(crate) fn try_flock(file: &fs::File, kind: Flock) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = match kind {
        Flock::Shared => libc::LOCK_SH,
        Flock::Exclusive => libc::LOCK_EX,
    };
    // SAFETY: flock takes a file descriptor and flags, no pointers; the descriptor is
    // open for as long as `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The file name for an account: a digest, because account ids can hold any character.
pub(crate) fn file_stem(account: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, account.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl DirStore {
    /// Opens (creating, mode 0700) a state directory, holding it shared; returns it and
    /// warnings (a state directory that cannot be made private).
    pub fn open(root: &Path) -> Result<(DirStore, Vec<String>), StateError> {
        let (store, warnings) = Self::open_unlocked(root)?;
        let path = root.join("lock");
        let holder = open_lock_file(&path)?;
        if !try_flock(&holder, Flock::Shared).map_err(io_err(&path))? {
            return Err(StateError::InUse {
                store: root.display().to_string(),
                by: "`state migrate`".into(),
            });
        }
        *store.holder.lock().unwrap_or_else(|p| p.into_inner()) = Some(holder);
        Ok((store, warnings))
    }

    /// [`DirStore::open`] without taking the holder lock (`state migrate`, which holds
    /// it exclusively).
    pub fn open_unlocked(root: &Path) -> Result<(DirStore, Vec<String>), StateError> {
        let tokens = root.join("refresh-tokens");
        let locks = root.join("locks");
        let mut warnings = Vec::new();
        let dir_existed = root.exists();
        fs::create_dir_all(&tokens).map_err(io_err(&tokens))?;
        fs::create_dir_all(&locks).map_err(io_err(&locks))?;
        // The tokens' own directory is ours: always private. The state directory itself may
        // be a volume root owned by root (emptyDir, PVC), where chmod is not permitted; it
        // is made private when we created it, and otherwise only tightened if we can.
        for d in [&tokens, &locks] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io_err(d))?;
        }
        if !dir_existed {
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err(root))?;
        } else if fs::metadata(root)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(false)
        {
            if let Err(e) = fs::set_permissions(root, fs::Permissions::from_mode(0o700)) {
                warnings.push(format!(
                    "{}: cannot make it private ({e}); the token files are private in {}",
                    root.display(),
                    tokens.display()
                ));
            }
        }
        Ok((
            DirStore {
                root: root.to_owned(),
                tokens,
                locks,
                holder: Mutex::new(None),
            },
            warnings,
        ))
    }

    /// Takes `root` for a migration: an exclusive lock no sidecar can share meanwhile.
    pub fn take_exclusive(root: &Path) -> Result<fs::File, StateError> {
        if !root.exists() {
            fs::create_dir_all(root).map_err(io_err(root))?;
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err(root))?;
        }
        let path = root.join("lock");
        let f = open_lock_file(&path)?;
        if try_flock(&f, Flock::Exclusive).map_err(io_err(&path))? {
            Ok(f)
        } else {
            Err(StateError::InUse {
                store: root.display().to_string(),
                by: "a running sidecar or `token`".into(),
            })
        }
    }

    /// Gives up the directory (shutdown).
    pub fn release(&self) {
        self.holder.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Every record file's content (stray temp files are removed): (path, bytes or why
    /// unreadable).
    pub fn load_all(&self) -> Result<Vec<RecordFile>, StateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.tokens).map_err(io_err(&self.tokens))? {
            let path = entry.map_err(io_err(&self.tokens))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                // A write that never reached its rename: the previous file is intact.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let read = crate::files::read_limited(
                &path,
                crate::files::MAX_STATE_RECORD_BYTES,
                "a refresh-token record",
            )
            .map_err(|e| e.to_string());
            out.push((path, read));
        }
        Ok(out)
    }

    /// Whether a file's name is the one of the account its record names.
    pub fn named_for(path: &Path, account: &str) -> bool {
        path.file_stem().and_then(|s| s.to_str()) == Some(file_stem(account).as_str())
    }

    /// One account's record bytes, `None` when it has none.
    pub fn read(&self, account: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.tokens.join(format!("{}.json", file_stem(account)));
        match crate::files::read_limited(
            &path,
            crate::files::MAX_STATE_RECORD_BYTES,
            "a refresh-token record",
        ) {
            Ok(b) => Ok(Some(b)),
            Err(crate::files::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(StateError::Io {
                path,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Tries once to take `account`'s spend lock.
    pub fn try_lock(&self, account: &str) -> Result<Option<FileLease>, StateError> {
        let path = self.locks.join(format!("{}.lock", file_stem(account)));
        let f = open_lock_file(&path)?;
        if try_flock(&f, Flock::Exclusive).map_err(io_err(&path))? {
            Ok(Some(FileLease(f)))
        } else {
            Ok(None)
        }
    }

    /// Replaces `account`'s record by `bytes` if its generation on disk is `expected`
    /// (no record counts as 0). The caller holds the account's spend lock.
    pub fn write_if(
        &self,
        account: &str,
        bytes: &[u8],
        expected: u64,
    ) -> Result<Result<(), u64>, StateError> {
        let found = self.read(account)?.map_or(0, |b| {
            super::record::generation_of(&b).map_or(0, |(g, _)| g)
        });
        if found != expected {
            return Ok(Err(found));
        }
        self.write(account, bytes)?;
        Ok(Ok(()))
    }

    /// Atomically replaces one account's record: temp file (0600), fsync, rename, fsync dir.
    pub fn write(&self, account: &str, bytes: &[u8]) -> Result<(), StateError> {
        let stem = file_stem(account);
        let final_path = self.tokens.join(format!("{stem}.json"));
        let tmp_path = self.tokens.join(format!("{stem}.json.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(io_err(&tmp_path))?;
        f.write_all(bytes).map_err(io_err(&tmp_path))?;
        f.sync_all().map_err(io_err(&tmp_path))?;
        drop(f);
        fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
        fs::File::open(&self.tokens)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.tokens))?;
        Ok(())
    }
}

/// How long a spend lock is polled for between tries.
pub(crate) const POLL_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between two tries.
pub(crate) const POLL_MAX: Duration = Duration::from_millis(200);
