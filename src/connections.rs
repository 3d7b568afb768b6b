//! Open client connections: the cap, which of them are idle, and closing them.
//!
//! A connection is idle while no request is in progress on it: from accept to its first
//! request head, and between a response and the next request. At the cap, the connection
//! idle the longest is closed to admit a new one, so idle connections held by any local
//! process cannot lock EmailEngine out; one with a request in progress never is. The hot
//! path pays two atomic stores per request; the registry's lock is taken on accept, on
//! close and when the cap is reached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a new connection waits for the slot of the connection closed for it.
const EVICT_WAIT: Duration = Duration::from_millis(100);

/// The open connections of one server.
pub struct Registry {
    epoch: Instant,
    cap: usize,
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
}

/// One open connection's state, shared by its task and the registry.
pub struct Conn {
    epoch: Instant,
    /// Requests in progress (HTTP/1.1: 0 or 1).
    in_request: AtomicU32,
    /// When it last became idle, in milliseconds since the registry's epoch.
    idle_since_ms: AtomicU64,
    /// Set once it was asked to close (at most one close per connection).
    closing: AtomicBool,
    /// Set once a request on it was answered with anything but 401: a client that knows
    /// the credentials (EmailEngine). Evicted only when no other idle connection is left.
    trusted: AtomicBool,
    close: Notify,
}

/// A connection's place under the cap; dropping it frees the slot.
pub struct Admitted {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
}

/// A request in progress; dropping it makes the connection idle again.
pub struct InRequest(Arc<Conn>);

impl Registry {
    /// A registry admitting at most `cap` connections (at least one).
    pub fn new(cap: usize) -> Arc<Self> {
        let cap = cap.max(1);
        Arc::new(Registry {
            epoch: Instant::now(),
            cap,
            slots: Arc::new(Semaphore::new(cap)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // Inserts and removals are single operations: a poisoned map is still whole.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.cap - self.slots.available_permits()
    }

    /// Admits a new connection: into a free slot, or into the slot of the connection idle
    /// the longest, which is closed for it. `None` when every open connection has a
    /// request in progress (the new one is then closed at once).
    pub async fn admit(self: &Arc<Self>) -> Option<Admitted> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(self.register(slot));
        }
        if !self.close_longest_idle() {
            return None;
        }
        // The closed connection's task frees its slot as soon as it runs.
        match tokio::time::timeout(EVICT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Some(self.register(slot)),
            _ => None,
        }
    }

    fn register(self: &Arc<Self>, slot: OwnedSemaphorePermit) -> Admitted {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            epoch: self.epoch,
            in_request: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            trusted: AtomicBool::new(false),
            close: Notify::new(),
        });
        conn.mark_idle();
        self.live().insert(id, conn.clone());
        Admitted {
            registry: self.clone(),
            id,
            conn,
            _slot: slot,
        }
    }

    /// Asks the connection idle the longest to close; false if none is idle. Connections
    /// that never had an authenticated answer go first, so a local process without the
    /// credentials can only evict its own connections while it has any.
    pub fn close_longest_idle(&self) -> bool {
        let live = self.live();
        let victim = live
            .values()
            .filter(|c| !c.is_busy())
            .filter(|c| !c.closing.load(Ordering::Acquire))
            .min_by_key(|c| {
                (
                    c.trusted.load(Ordering::Relaxed),
                    c.idle_since_ms.load(Ordering::Relaxed),
                )
            });
        match victim {
            Some(c) => {
                c.ask_to_close();
                true
            }
            None => false,
        }
    }

    /// Asks every open connection to close once its request in progress, if any, is
    /// answered (shutdown).
    pub fn close_all(&self) {
        for c in self.live().values() {
            c.ask_to_close();
        }
    }
}

impl Admitted {
    /// The connection's shared state.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.registry.live().remove(&self.id);
    }
}

impl Conn {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_idle(&self) {
        self.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn ask_to_close(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            // `notify_one` keeps the wake-up if the task is not waiting right now.
            self.close.notify_one();
        }
    }

    /// Whether a request is in progress on it.
    pub fn is_busy(&self) -> bool {
        self.in_request.load(Ordering::Acquire) > 0
    }

    /// Marks it as a client that knows the credentials (see [`Conn::trusted`]).
    pub fn trust(&self) {
        self.trusted.store(true, Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn request(self: &Arc<Self>) -> InRequest {
        self.in_request.fetch_add(1, Ordering::AcqRel);
        InRequest(self.clone())
    }

    /// Resolves when the connection was asked to close (cap reached, shutdown).
    pub async fn close_requested(&self) {
        self.close.notified().await;
    }

    /// Resolves once the connection has been idle for `timeout` without a break.
    pub async fn idle_for(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let idle = self.in_request.load(Ordering::Acquire) == 0;
            let since = self.idle_since_ms.load(Ordering::Relaxed);
            let now = self.now_ms();
            let wait_ms = if idle {
                let left = since.saturating_add(timeout_ms).saturating_sub(now);
                if left == 0 {
                    return;
                }
                left
            } else {
                // Busy: the earliest it can time out is a full timeout after it ends.
                timeout_ms
            };
            tokio::time::sleep(Duration::from_millis(wait_ms.max(1))).await;
        }
    }
}

impl InRequest {
    /// Marks the connection as a client that knows the credentials.
    pub fn trust(&self) {
        self.0.trust();
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.mark_idle();
        self.0.in_request.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room_and_a_busy_one_never_does() {
        let reg = Registry::new(2);
        let a = reg.admit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b = reg.admit().await.unwrap();
        assert_eq!(reg.open(), 2);
        // `a` is idle the longest: it is asked to close, and its slot goes to `c` once
        // its task ends (here: dropping it).
        let admitting = tokio::spawn({
            let reg = reg.clone();
            async move { reg.admit().await.map(|c| c.id) }
        });
        tokio::time::timeout(Duration::from_secs(1), a.conn().close_requested())
            .await
            .expect("the longest-idle connection is asked to close");
        drop(a);
        assert!(admitting.await.unwrap().is_some());
        assert!(!b.conn().closing.load(Ordering::Acquire));

        // With every connection in a request, nobody is closed and the newcomer is refused.
        let reg = Registry::new(1);
        let busy = reg.admit().await.unwrap();
        let _req = busy.conn().request();
        assert!(reg.admit().await.is_none());
        assert!(!busy.conn().closing.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn the_idle_timer_waits_for_the_request_in_progress_and_restarts_after_it() {
        let reg = Registry::new(1);
        let a = reg.admit().await.unwrap();
        let conn = a.conn().clone();
        let timeout = Duration::from_millis(300);
        let req = conn.request();
        let watch = tokio::spawn({
            let conn = conn.clone();
            async move { conn.idle_for(timeout).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!watch.is_finished(), "a request in progress is never idle");
        let ended = Instant::now();
        drop(req);
        watch.await.unwrap();
        let idle = ended.elapsed();
        assert!(
            idle >= timeout - Duration::from_millis(5) && idle < timeout * 3,
            "timed out {idle:?} after the request ended"
        );
    }
}
