//! Giving back the memory a burst of messages leaves behind.
//!
//! When messages arrive faster than the cache takes them in, they queue in
//! the client's channel. glibc serves each thread from an arena of its own:
//! the queued messages come from the arena of the thread that read them off
//! the socket, the cache's instances from that of whichever worker runs the
//! listener, and both threads do both in turn. Once the queue drains, the
//! freed messages lie between live instances and glibc keeps the pages: an
//! observer that took in 100,000 announcements at once held 73 MiB for a
//! live set of 45 (BENCHMARKS.md §5). jemalloc and mimalloc return such
//! pages on their own; glibc does only in `malloc_trim`.
//!
//! So once a listener has worked through a backlog (long batches: the
//! messages were waiting) and a second has then passed without another,
//! the registry calls `malloc_trim(0)` once, on tokio's blocking pool.
//! A long backlog also gets one after every 16,384 messages taken from it,
//! one at a time, so that what it leaves behind does not pile up on top of
//! the cache before the quiet second: the peak of an observer taking in
//! 100,000 at once went from 66 to 54 MiB (BENCHMARKS.md §5).
//! Heartbeats and paced traffic are taken in as they arrive, in short
//! batches, and never cause one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Messages taken from a queue since the last release that make one worth
/// it: at the few hundred bytes a queued message holds, about 4 MB.
const WORTH_IT: u64 = 8192;

/// How long the backlog must have been gone before the release.
const QUIET: Duration = Duration::from_secs(1);

/// Messages taken from a queue that make a release worth it while the
/// backlog still lasts: at a few hundred bytes each, about 8 MB. (32,768
/// left a peak of 56 to 60 MiB for 100,000 instances, 16,384 one of 54.)
const DURING: u64 = 16_384;

/// One registry's account of the backlogs its listeners worked through,
/// and of the releases they led to.
pub(crate) struct Release {
    enabled: bool,
    /// Messages taken from a queue since the last release; while it moves
    /// (a release during the backlog setting it back to 0 included), a
    /// backlog is being worked through.
    backlog: AtomicU64,
    /// A task is waiting for the quiet second.
    armed: AtomicBool,
    /// A release during the backlog is under way.
    trimming: AtomicBool,
    /// Releases done.
    pub(crate) done: AtomicU64,
}

impl Release {
    /// `wanted` is the user's choice; it only has an effect with glibc.
    pub(crate) fn new(wanted: bool) -> Self {
        Release {
            enabled: wanted && cfg!(all(target_os = "linux", target_env = "gnu")),
            backlog: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            trimming: AtomicBool::new(false),
            done: AtomicU64::new(0),
        }
    }

    /// Notes a batch of `taken` messages that were waiting in a queue.
    pub(crate) fn queued(self: &Arc<Self>, taken: usize) {
        if !self.enabled {
            return;
        }
        let total = self.backlog.fetch_add(taken as u64, Ordering::Relaxed) + taken as u64;
        if total >= WORTH_IT && !self.armed.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().when_quiet());
        }
        if total >= DURING && !self.trimming.swap(true, Ordering::AcqRel) {
            self.backlog.store(0, Ordering::Relaxed);
            let this = self.clone();
            tokio::spawn(async move {
                this.release().await;
                this.trimming.store(false, Ordering::Release);
            });
        }
    }

    async fn when_quiet(self: Arc<Self>) {
        loop {
            let seen = self.backlog.load(Ordering::Relaxed);
            tokio::time::sleep(QUIET).await;
            if self.backlog.load(Ordering::Relaxed) == seen {
                break;
            }
        }
        self.backlog.store(0, Ordering::Relaxed);
        self.release().await;
        self.armed.store(false, Ordering::Release);
    }

    async fn release(&self) {
        // It walks every arena, taking each one's lock in turn: not on a
        // worker thread.
        let started = std::time::Instant::now();
        if tokio::task::spawn_blocking(trim).await.is_ok() {
            self.done.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(took = ?started.elapsed(), "gave back the memory a burst left");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
