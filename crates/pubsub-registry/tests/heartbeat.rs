//! Heartbeats on a paused clock: one per interval per registration, none
//! after an unregister, and spread over the interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use pubsub_registry::transport::{Topic, Transport};
use pubsub_registry::{MemoryBus, Registry, Service};
use tokio::time::Instant;

type Heard = Arc<Mutex<Vec<(String, Instant)>>>;

/// Every announcement on the bus, by address, with when it was sent.
async fn listen(bus: &MemoryBus) -> Heard {
    let mut messages = bus
        .subscribe(Topic::Pattern("registry.register.>".into()))
        .await
        .unwrap();
    let heard = Heard::default();
    let into = heard.clone();
    tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            let a = pubsub_registry::protocol::decode(&m.payload, "beat").unwrap();
            into.lock()
                .unwrap()
                .push((a.service.address.to_string(), Instant::now()));
        }
    });
    heard
}

/// A registry with a 1 s interval on a bus of its own, and what it sends.
async fn registry() -> (Registry, Heard) {
    let bus = MemoryBus::new();
    let heard = listen(&bus).await;
    let registry = Registry::builder()
        .memory(&bus)
        .register_interval(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    (registry, heard)
}

fn count(heard: &Heard, address: &str, from: Instant, to: Instant) -> usize {
    heard
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, at)| a == address && *at >= from && *at <= to)
        .count()
}

#[tokio::test(start_paused = true)]
async fn one_heartbeat_per_interval_per_registration() {
    let (registry, heard) = registry().await;
    let second = Duration::from_secs(1);
    let start = Instant::now();
    for address in ["a:1", "b:1", "gone:1", "again:1"] {
        registry
            .register(Service::new("beat", address))
            .await
            .unwrap();
    }
    tokio::time::sleep(second / 2).await;
    registry
        .unregister(&Service::new("beat", "gone:1"))
        .await
        .unwrap();
    // Unregistered and registered again: its old schedule must not also run.
    registry
        .unregister(&Service::new("beat", "again:1"))
        .await
        .unwrap();
    let again = Instant::now();
    registry
        .register(Service::new("beat", "again:1"))
        .await
        .unwrap();

    tokio::time::sleep(second * 10).await;
    // The announcement at registration, then one per second from a phase
    // within the first second: 10 in the next 10 s.
    for address in ["a:1", "b:1"] {
        assert_eq!(
            count(&heard, address, start, start + second * 10),
            11,
            "{address}"
        );
    }
    assert_eq!(count(&heard, "again:1", again, again + second * 10), 11);
    let gone = count(&heard, "gone:1", start, Instant::now());
    assert!(
        gone <= 2,
        "gone:1 heartbeat {gone} times in 10 s after leaving"
    );
    registry.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn heartbeats_spread_over_the_interval() {
    let (registry, heard) = registry().await;
    let second = Duration::from_secs(1);
    let n = 1000;
    for i in 0..n {
        registry
            .register(Service::new(
                "beat",
                format!("10.0.{}.{}:80", i / 256, i % 256),
            ))
            .await
            .unwrap();
    }
    let start = Instant::now();
    tokio::time::sleep(second * 2).await;
    // The second interval: every registration once, in ten 100 ms buckets.
    let mut buckets: HashMap<u128, usize> = HashMap::new();
    for (_, at) in heard.lock().unwrap().iter() {
        if *at >= start + second && *at < start + second * 2 {
            *buckets
                .entry((*at - start - second).as_millis() / 100)
                .or_default() += 1;
        }
    }
    assert_eq!(buckets.values().sum::<usize>(), n);
    let busiest = buckets.values().max().copied().unwrap_or(0);
    assert!(
        busiest <= n / 10 * 3 / 2,
        "busiest 100 ms carried {busiest} of {n}: {buckets:?}"
    );
    registry.close().await.unwrap();
}
