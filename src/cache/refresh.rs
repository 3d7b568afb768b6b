//! A provider's refresh queue: when each of its keys' next background refresh (or retry)
//! is due, in one ordered map watched by one task, and the slots that bound how many run
//! at once. A sleeping task per key would cost ~400 bytes each, and so would every
//! refresh started beyond the provider's call cap (it would only wait for a slot).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use super::entry::{DueId, KeyEntry};

pub(super) struct RefreshQueue {
    due: Mutex<BTreeMap<DueId, Arc<KeyEntry>>>,
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

    fn lock(&self) -> MutexGuard<'_, BTreeMap<DueId, Arc<KeyEntry>>> {
        // Inserts and removals are single operations: a poisoned queue is still whole.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, at: Instant, entry: Arc<KeyEntry>) -> DueId {
        let id = (at, self.next_seq.fetch_add(1, Ordering::Relaxed));
        let mut due = self.lock();
        due.insert(id, entry);
        if due.first_key_value().is_some_and(|(first, _)| *first == id) {
            self.changed.notify_one();
        }
        id
    }

    pub fn remove(&self, id: DueId) {
        self.lock().remove(&id);
    }

    /// Takes the earliest entry if it is due by `now`; otherwise says when the next one is.
    pub fn take_due(&self, now: Instant) -> Result<(DueId, Arc<KeyEntry>), Option<Instant>> {
        let mut due = self.lock();
        match due.first_entry() {
            Some(entry) if entry.key().0 <= now => Ok(entry.remove_entry()),
            Some(entry) => Err(Some(entry.key().0)),
            None => Err(None),
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

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}
