//! Giving back the memory a burst leaves behind (glibc's `malloc_trim`):
//! once after a backlog, also during a long one, never for paced traffic,
//! never when turned off.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use pubsub_registry::protocol::encode_announcement;
use pubsub_registry::transport::Transport;
use pubsub_registry::{MemoryBus, Registry, Service, Status};

const NAME: &str = "burst";

/// More than the 8,192 queued messages that make a release worth it, less
/// than the 16,384 that make one worth it while the backlog lasts.
const BURST: usize = 12_000;

/// More than twice 16,384.
const LONG_BURST: usize = 40_000;

async fn announce(bus: &MemoryBus, i: usize) {
    let service = Service::new(NAME, format!("10.2.{}.{}:80", i / 256, i % 256));
    let payload = encode_announcement(
        &service,
        Status::Passing,
        SystemTime::now(),
        Duration::from_secs(20),
    );
    bus.publish(
        format!("registry.register.{NAME}").into(),
        None,
        payload.into(),
    )
    .await
    .unwrap();
}

async fn observer(bus: &MemoryBus, release: bool) -> Registry {
    let observer = Registry::builder()
        .memory(bus)
        .release_memory(release)
        .build()
        .await
        .unwrap();
    observer.observe(NAME).await.unwrap();
    observer
}

/// Publishes the whole burst before the observer's listener runs (one
/// thread, and publishing to the bus never waits), so it all queues.
async fn burst(bus: &MemoryBus, observer: &Registry, n: usize) {
    for i in 0..n {
        announce(bus, i).await;
    }
    wait_for(|| observer.stats().instances == n, "the burst to arrive").await;
}

/// Waits up to 20 s of real time; the paused clock moves on meanwhile,
/// except while a blocking task (the release) is running.
async fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 20 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The releases counted once a burst of `n` has arrived, at least
/// `at_least` have been made, and a quiet while has passed.
async fn releases_after_burst(n: usize, release: bool, at_least: u64) -> u64 {
    let bus = MemoryBus::new();
    let observer = observer(&bus, release).await;
    burst(&bus, &observer, n).await;
    wait_for(
        || observer.stats().memory_releases >= at_least,
        "the releases",
    )
    .await;
    // Well past the quiet second (the paused clock does not move while a
    // blocking task, a release, is running).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(bus.dropped(), 0);
    observer.stats().memory_releases
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_burst_is_given_back_once_it_has_drained() {
    // One burst, one release, even though it filled many batches.
    assert_eq!(releases_after_burst(BURST, true, 1).await, 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_long_burst_is_also_given_back_while_it_lasts() {
    // At least one while the backlog lasted, then the one after it; at
    // most one for each 16,384 messages, then that one.
    let releases = releases_after_burst(LONG_BURST, true, 2).await;
    assert!(
        releases <= 3,
        "{releases} releases for {LONG_BURST} messages"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_release_when_turned_off() {
    assert_eq!(releases_after_burst(LONG_BURST, false, 0).await, 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn paced_announcements_never_cause_a_release() {
    let bus = MemoryBus::new();
    let observer = observer(&bus, true).await;
    let mut events = observer.events_for(NAME);
    for i in 0..LONG_BURST {
        announce(&bus, i).await;
        events.next().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = observer.stats();
    assert_eq!(stats.instances, LONG_BURST);
    assert_eq!(stats.memory_releases, 0);
}
