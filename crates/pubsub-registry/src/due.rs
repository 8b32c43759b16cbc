//! Entries by due time, for one timer over many things (the cache's expiry,
//! this process's heartbeats): the timer sleeps until the earliest entry,
//! and the work done is proportional to what comes due, not to what is
//! tracked.
//!
//! Entries are never removed early: one that no longer matters is skipped
//! when it comes up, and [`DueHeap::compact`] drops such entries once they
//! outnumber the live ones, so churn cannot grow the heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A min-heap of `(due time, item)`; the time is an `Instant` or anything
/// ordered that stands for one (the cache keeps 8-byte ticks).
pub(crate) struct DueHeap<K, T> {
    entries: BinaryHeap<Reverse<(K, T)>>,
    /// When the timer goes off next, as last [`arm`](Self::arm)ed or told
    /// by [`push`](Self::push); `None` while it waits without a deadline.
    armed: Option<K>,
}

impl<K: Ord, T: Ord> Default for DueHeap<K, T> {
    fn default() -> Self {
        DueHeap {
            entries: BinaryHeap::new(),
            armed: None,
        }
    }
}

impl<K: Ord + Copy, T: Ord> DueHeap<K, T> {
    /// Adds an entry; true when it comes due before the timer goes off, so
    /// the timer must be told (a later one is seen when the timer goes off).
    pub(crate) fn push(&mut self, at: K, item: T) -> bool {
        self.entries.push(Reverse((at, item)));
        let earlier = self.armed.is_none_or(|armed| at < armed);
        if earlier {
            self.armed = Some(at);
        }
        earlier
    }

    /// When the timer is to go off next: at the earliest entry, or with none
    /// at `idle` (`None`: not until a push tells it).
    pub(crate) fn arm(&mut self, idle: Option<K>) -> Option<K> {
        self.armed = self.next().or(idle);
        self.armed
    }

    /// Takes out the earliest entry if it is due by `now`.
    pub(crate) fn pop_due(&mut self, now: K) -> Option<(K, T)> {
        match self.entries.peek() {
            Some(Reverse((at, _))) if *at <= now => self.entries.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// When the earliest entry is due.
    pub(crate) fn next(&self) -> Option<K> {
        self.entries.peek().map(|Reverse((at, _))| *at)
    }

    /// Whether entries outnumber twice the `live` ones (plus some slack,
    /// so small heaps are left alone): time to [`compact`](Self::compact).
    pub(crate) fn needs_compacting(&self, live: usize) -> bool {
        self.entries.len() > 2 * live + 1024
    }

    /// Keeps only the entries `keep` accepts, each once (two pushes of the
    /// same entry are one). Sorting costs O(n log n), paid once per `live`
    /// or more pushes.
    pub(crate) fn compact(&mut self, mut keep: impl FnMut(K, &T) -> bool) {
        let mut entries = std::mem::take(&mut self.entries).into_vec();
        entries.retain(|Reverse((at, item))| keep(*at, item));
        entries.sort_unstable();
        entries.dedup();
        self.entries = entries.into();
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.armed = None;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn items(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|Reverse((_, item))| item)
    }
}

/// Waits until `next`, or until `timer` says an earlier entry came in;
/// with nothing due, until the timer alone.
pub(crate) async fn wait(next: Option<Instant>, timer: &Notify) {
    match next {
        Some(at) => {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = timer.notified() => {}
            }
        }
        None => timer.notified().await,
    }
}
