//! The open-file limit and the connection cap it allows.
//!
//! Client connections, identity-provider calls and state writes all draw on one budget
//! of file descriptors. Once idle clients had taken it all, the write of a rotated
//! refresh token failed with EMFILE (and the account was lost on restart). So the soft
//! limit is raised to the hard one at start, and the connection cap is kept below what
//! is left after a reserve for everything else.

/// Descriptors kept for everything but client connections: stdio, the listener, the
/// runtime's epoll and wakers, the file watcher, the state directory, the blocking
/// pool's writes.
const BASE_RESERVE: u64 = 64;
/// Descriptors kept per possible concurrent identity-provider call: its connection,
/// and the temporary file and directory of the state write that may follow it.
const PER_UPSTREAM_CALL: u64 = 2;
/// The cap is never computed below this: with fewer, the sidecar cannot serve.
pub const MIN_CONNECTIONS: usize = 16;

/// The process's open-file limit after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The soft limit before it was raised, if it was.
    pub raised_from: Option<u64>,
}

/// Raises the soft open-file limit to the hard limit (best effort: on failure the limit
/// stays as it was). `None` where the limit cannot be read.
#[cfg(unix)]
#[allow(unsafe_code)]
// `rlim_t` is u64 on Linux but not on every unix.
#[allow(clippy::useless_conversion)]
pub fn raise_open_file_limit() -> Option<OpenFileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let soft = u64::try_from(lim.rlim_cur).unwrap_or(u64::MAX);
    Some(OpenFileLimit {
        soft,
        raised_from: (lim.rlim_cur != before).then(|| u64::try_from(before).unwrap_or(u64::MAX)),
    })
}

/// Without `getrlimit`, nothing is known.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> Option<OpenFileLimit> {
    None
}

/// Descriptors kept out of the connection budget for `upstream_calls` concurrent
/// identity-provider calls.
pub fn reserve(upstream_calls: usize) -> u64 {
    let calls = u64::try_from(upstream_calls).unwrap_or(u64::MAX);
    BASE_RESERVE.saturating_add(calls.saturating_mul(PER_UPSTREAM_CALL))
}

/// The connection cap: `--max-connections`, or less if the open-file limit minus the
/// reserve leaves less room (that room counted as at least [`MIN_CONNECTIONS`]).
pub fn connection_cap(max_connections: usize, soft_limit: Option<u64>, reserve: u64) -> usize {
    let room = soft_limit.map_or(usize::MAX, |soft| {
        usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX)
    });
    max_connections.min(room.max(MIN_CONNECTIONS)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_free() {
        let r = reserve(16);
        assert_eq!(r, 64 + 32);
        assert_eq!(connection_cap(4096, Some(256), r), 256 - 96);
        assert_eq!(connection_cap(4096, Some(1 << 20), r), 4096);
        assert_eq!(connection_cap(4096, None, r), 4096);
        assert_eq!(connection_cap(4096, Some(50), r), MIN_CONNECTIONS);
        assert_eq!(
            connection_cap(usize::MAX, Some(u64::MAX), u64::MAX),
            MIN_CONNECTIONS
        );
        assert_eq!(
            connection_cap(4, Some(256), r),
            4,
            "a smaller --max-connections stays"
        );
        assert_eq!(connection_cap(0, None, r), 1);
        assert_eq!(reserve(usize::MAX), u64::MAX);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let Some(lim) = raise_open_file_limit() else {
            return;
        };
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
            return;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        // "Max open files  <soft>  <hard>  files"
        assert_eq!(f[3], f[4], "soft equals hard: {line}");
        assert_eq!(f[3].parse::<u64>().ok(), Some(lim.soft));
    }
}
