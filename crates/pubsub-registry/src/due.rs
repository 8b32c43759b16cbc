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

/// A min-heap of `(due time, item)`.
pub(crate) struct DueHeap<T>(BinaryHeap<Reverse<(Instant, T)>>);

impl<T: Ord> Default for DueHeap<T> {
    fn default() -> Self {
        DueHeap(BinaryHeap::new())
    }
}

impl<T: Ord> DueHeap<T> {
    /// Adds an entry; true when it is now the earliest, so the timer must
    /// be told.
    pub(crate) fn push(&mut self, at: Instant, item: T) -> bool {
        let earliest = self.next().is_none_or(|next| at < next);
        self.0.push(Reverse((at, item)));
        earliest
    }

    /// Takes out the earliest entry if it is due by `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, T)> {
        match self.0.peek() {
            Some(Reverse((at, _))) if *at <= now => self.0.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// When the earliest entry is due.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((at, _))| *at)
    }

    /// Once entries outnumber twice the `live` ones (plus some slack, so
    /// small heaps are left alone), keeps only those `keep` accepts.
    pub(crate) fn compact(&mut self, live: usize, mut keep: impl FnMut(Instant, &T) -> bool) {
        if self.0.len() > 2 * live + 1024 {
            self.0.retain(|Reverse((at, item))| keep(*at, item));
        }
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub(crate) fn items(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|Reverse((_, item))| item)
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
