//! Reading the files the operator points at: the config, secret files, TLS material and
//! the state directory's records.
//!
//! Each of them may turn out to be anything: a FIFO (whose `open` blocks until a writer
//! appears, forever), a symlink to `/dev/zero` (endless), a huge file written by mistake.
//! So every such read opens without blocking (`O_NONBLOCK`), checks on the opened handle
//! (`fstat`, so no swap between check and read) that it is a regular file, and reads at
//! most a size limit; anything else is a one-line error that says what the file is.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest config file read: 256 MiB. A map of 100,000 accounts with inline
/// Microsoft-sized refresh tokens (~1.5 KB each) is ~180 MB of JSON.
pub const MAX_CONFIG_BYTES: u64 = 256 * 1024 * 1024;

/// The largest secret file read (a service-account key is ~2.5 KB), and the largest TLS
/// certificate chain or key file.
pub const MAX_SECRET_FILE_BYTES: u64 = 1024 * 1024;

/// The largest state record read: one account's rotated refresh token (a few KB), as
/// JSON. Room for the largest token a provider answer may carry (256 KiB) even with every
/// character escaped, so that a record that could be written can always be read back.
pub const MAX_STATE_RECORD_BYTES: u64 = 2 * 1024 * 1024;

/// Why a file the operator named could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed (missing, no permission, I/O error).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The path leads to something other than a regular file.
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    /// The file is larger than what may be read.
    #[error("is larger than {}, the limit for {what}", human(*.limit))]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
        /// What kind of file it was read as ("a secret file").
        what: &'static str,
    },
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

/// What a non-regular file is, for the error message.
fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (following symlinks) without blocking and returns it with its size, or
/// an error if it is not a regular file.
fn open_regular(path: &Path) -> Result<(File, u64), ReadError> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; on a
    // regular file the flag changes nothing. O_NOCTTY: a terminal never becomes ours.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `limit` bytes; `what` names the kind of file in
/// the error ("a secret file").
pub fn read_limited(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, ReadError> {
    let (file, len) = open_regular(path)?;
    let too_large = || ReadError::TooLarge { limit, what };
    if len > limit {
        return Err(too_large());
    }
    // The size is a hint: the file may grow while it is read, so the read is capped too.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The SHA-256 of a regular file of at most `limit` bytes, read in small pieces (the
/// periodic re-read of a big config holds no copy of it).
pub fn sha256_limited(path: &Path, limit: u64, what: &'static str) -> Result<[u8; 32], ReadError> {
    let (file, len) = open_regular(path)?;
    let too_large = || ReadError::TooLarge { limit, what };
    if len > limit {
        return Err(too_large());
    }
    let mut reader = file.take(limit.saturating_add(1));
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = [0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        total = total.saturating_add(n as u64);
        digest.update(&buf[..n]);
    }
    if total > limit {
        return Err(too_large());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.finish().as_ref());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let ok = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs")
            .success();
        assert!(ok, "mkfifo failed");
    }

    #[test]
    fn a_fifo_a_device_and_a_directory_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        // Run off the test thread: a regression would block in open() for good.
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo, zero, dir.path().to_owned()];
        std::thread::spawn(move || {
            for p in &paths {
                let read = read_limited(p, 1024, "a test file").map(|_| ());
                let hashed = sha256_limited(p, 1024, "a test file").map(|_| ());
                let _ = tx.send((
                    read.map_err(|e| e.to_string()),
                    hashed.map_err(|e| e.to_string()),
                ));
            }
        });
        for expected in ["a FIFO (named pipe)", "a character device", "a directory"] {
            let (read, hashed) = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("refused without blocking");
            for r in [read, hashed] {
                let e = r.expect_err("not a regular file");
                assert_eq!(e, format!("is {expected}, not a regular file"));
            }
        }
    }

    #[test]
    fn a_file_over_the_limit_is_refused_and_one_at_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'x'; 2048]).unwrap();
        assert_eq!(
            read_limited(&path, 2048, "a test file").unwrap().len(),
            2048
        );
        assert_eq!(
            sha256_limited(&path, 2048, "a test file").unwrap(),
            <[u8; 32]>::try_from(
                ring::digest::digest(&ring::digest::SHA256, &[b'x'; 2048]).as_ref()
            )
            .unwrap()
        );
        let e = read_limited(&path, 2047, "a test file").unwrap_err();
        assert_eq!(
            e.to_string(),
            "is larger than 2047 bytes, the limit for a test file"
        );
        let e = sha256_limited(&path, 1024, "a secret file").unwrap_err();
        assert_eq!(
            e.to_string(),
            "is larger than 1 KiB, the limit for a secret file"
        );
        assert_eq!(human(MAX_SECRET_FILE_BYTES), "1 MiB");
    }
}
