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

/// One registry's account of the backlogs its listeners worked through,
/// and of the releases they led to.
pub(crate) struct Release {
    enabled: bool,
    /// Messages taken from a queue since the last release.
    backlog: AtomicU64,
    /// A task is waiting for the quiet second.
    armed: AtomicBool,
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
        // It walks every arena, taking each one's lock in turn: not on a
        // worker thread.
        let started = std::time::Instant::now();
        if tokio::task::spawn_blocking(trim).await.is_ok() {
            self.done.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(took = ?started.elapsed(), "gave back the memory a burst left");
        }
        self.armed.store(false, Ordering::Release);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
