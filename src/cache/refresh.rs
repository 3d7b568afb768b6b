//! A provider's refresh queue: when each of its keys' next background refresh (or retry)
//! is due, in one heap watched by one task, and the slots that bound how many run at
//! once. A sleeping task per key would cost ~400 bytes each, and so would every refresh
//! started beyond the provider's call cap (it would only wait for a slot).
//!
//! A binary heap in one vector rather than an ordered map: every key passes through the
//! queue once per token lifetime, and a tree would allocate a new node for every dozen
//! keys, each living a lifetime among the refreshes' short-lived buffers, which
//! fragments the heap by tens of MB with 100k keys (BENCHMARKS.md, P5). Removed entries
//! stay in the heap until they come up or outnumber the live ones; the heap holds its
//! entries weakly, so a retired entry's credentials are freed at once all the same.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::entry::{DueId, KeyEntry};

/// An entry of the heap, ordered by its due id alone.
struct Due(DueId, Weak<KeyEntry>);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

#[derive(Default)]
struct Heap {
    due: BinaryHeap<Reverse<Due>>,
    /// Sequence numbers of entries removed but still in `due`.
    removed: HashSet<u64>,
}

impl Heap {
    /// Drops removed entries from the top, so that the top is a live one.
    fn settle_top(&mut self) {
        while let Some(Reverse(top)) = self.due.peek() {
            if !self.removed.remove(&top.0 .1) {
                return;
            }
            self.due.pop();
        }
    }
}

pub(super) struct RefreshQueue {
    due: Mutex<Heap>,
    next_seq: AtomicU64,
    /// Background refreshes of this provider under way at most.
    pub slots: Arc<Semaphore>,
    /// Wakes the queue's task when an entry earlier than all others arrives, or on close.
    pub changed: Notify,
    closed: AtomicBool,
}

impl RefreshQueue {
    pub fn new(slots: usize) -> Self {
        RefreshQueue {
            due: Mutex::default(),
            next_seq: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            changed: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Heap> {
        // Inserts and removals leave the heap whole before anything can panic: a
        // poisoned queue is still whole.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, at: Instant, entry: Arc<KeyEntry>) -> DueId {
        let id = (at, self.next_seq.fetch_add(1, Ordering::Relaxed));
        let mut heap = self.lock();
        heap.due.push(Reverse(Due(id, Arc::downgrade(&entry))));
        heap.settle_top();
        if heap.due.peek().is_some_and(|Reverse(top)| top.0 == id) {
            self.changed.notify_one();
        }
        id
    }

    /// Forgets a queued entry. (An id already taken is remembered until the next
    /// compaction; the key's own `due` check makes its refresh a no-op anyway.)
    pub fn remove(&self, id: DueId) {
        let mut heap = self.lock();
        heap.removed.insert(id.1);
        heap.settle_top();
        if heap.removed.len() > 64 && heap.removed.len() > heap.due.len() / 2 {
            let Heap { due, removed } = &mut *heap;
            due.retain(|Reverse(d)| !removed.contains(&d.0 .1));
            *removed = HashSet::new();
        }
    }

    /// Takes the earliest entry if it is due by `now`; otherwise says when the next one is.
    pub fn take_due(&self, now: Instant) -> Result<(DueId, Arc<KeyEntry>), Option<Instant>> {
        let mut heap = self.lock();
        loop {
            heap.settle_top();
            match heap.due.peek() {
                Some(Reverse(top)) if top.0 .0 <= now => {
                    if let Some(Reverse(Due(id, entry))) = heap.due.pop() {
                        // An entry nobody holds any more was retired: nothing to refresh.
                        if let Some(entry) = entry.upgrade() {
                            return Ok((id, entry));
                        }
                    }
                }
                Some(Reverse(top)) => return Err(Some(top.0 .0)),
                None => return Err(None),
            }
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The queue's task: takes a free slot, sleeps until the earliest due refresh (or
    /// until an earlier one is queued) and hands it to `start` with that slot. `start`
    /// returns false once its cache is gone, which ends the task.
    pub async fn run(
        self: Arc<Self>,
        start: impl Fn(DueId, Arc<KeyEntry>, tokio::sync::OwnedSemaphorePermit) -> bool,
    ) {
        while !self.is_closed() {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            // `notify_one` keeps a permit when nobody waits: an entry queued between
            // `take_due` and the wait below still wakes us.
            let (id, entry) = loop {
                if self.is_closed() {
                    return;
                }
                match self.take_due(Instant::now()) {
                    Ok(due) => break due,
                    Err(Some(at)) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = self.changed.notified() => {}
                        }
                    }
                    Err(None) => self.changed.notified().await,
                }
            };
            if !start(id, entry, slot) {
                return;
            }
        }
    }

    /// Entries queued and not removed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let heap = self.lock();
        heap.due
            .iter()
            .filter(|Reverse(d)| !heap.removed.contains(&d.0 .1))
            .count()
    }
}
