//! Work that must not compete with the thread serving requests: big reloads and admin
//! lists run on threads of their own at a lower CPU priority, and memory freed by them
//! is handed back to the OS.

/// The work of a reload (reading, parsing and validating the map, then the diff) died
/// before it gave its result: it panicked, or its thread could not be started.
#[derive(Debug, thiserror::Error)]
#[error("the reload's worker thread {0}")]
pub struct WorkerLost(&'static str);

/// Runs `work` on a thread of its own at a lower CPU priority (nice +10) and waits for it.
///
/// A reload of 100k accounts takes most of a second of CPU. On tokio's blocking pool it
/// competed as an equal with the thread serving requests whenever the two shared a core
/// (a pod with a one-CPU limit, a busy node): the hit p99 during such reloads rose from
/// ~3 to 25 ms (BENCHMARKS.md, P5). At nice +10 the serving thread gets the core whenever
/// it has work; the reload only takes longer when the core is busy.
pub async fn at_low_priority<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WorkerLost> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ee-reload".into())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = done.send(work());
        })
        .map_err(|_| WorkerLost("could not be started"))?;
    // The sender is dropped without a value only if `work` panicked.
    result.await.map_err(|_| WorkerLost("panicked"))
}

/// Nice +10 for the calling thread, relative to the process's own value (on Linux nice is
/// a thread's setting, unlike POSIX's per-process one, and `nice` changes the caller's).
/// Best effort: without it a reload only competes as before.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn lower_this_threads_priority() {
    // SAFETY: nice takes no pointers; it only lowers this thread's scheduling weight.
    unsafe {
        libc::nice(10);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_this_threads_priority() {}

/// Hands memory freed after a config load back to the OS. Parsing a big map makes many
/// short-lived allocations, and glibc otherwise keeps the freed pages: the process would
/// sit at its peak size (hundreds of MB with 100k accounts) for good.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointers from us; it only walks glibc's own heap
    // bookkeeping, under glibc's locks, and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn reload_work_runs_at_a_lower_priority_than_the_serving_thread() {
        // SAFETY: getpriority takes no pointers; with 0 it reads the calling thread's nice
        // value (Linux).
        let nice_of_this_thread = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let serving = nice_of_this_thread();
        let reload = at_low_priority(nice_of_this_thread).await.unwrap();
        assert_eq!(reload, (serving + 10).min(19));
        assert_eq!(
            nice_of_this_thread(),
            serving,
            "the caller's thread is left alone"
        );
    }

    #[tokio::test]
    async fn reload_work_that_panics_is_an_error_not_a_hang() {
        let lost = at_low_priority(|| -> u32 { panic!("broken reload") })
            .await
            .unwrap_err();
        assert_eq!(lost.to_string(), "the reload's worker thread panicked");
    }
}
