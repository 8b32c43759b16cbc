//! Expiry on a paused clock: exact, whatever the sender's clock says, and
//! proportional to what comes due.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use pubsub_registry::transport::Transport;
use pubsub_registry::{EventKind, MemoryBus, Registry};
use tokio::time::Instant;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn announce(
    bus: &MemoryBus,
    name: &str,
    address: &str,
    registered_ms: i64,
    duration_ms: u64,
) {
    let payload = format!(
        r#"{{"name":"{name}","add":"{address}","t":{{"Registered":{registered_ms},"Duration":{duration_ms}}}}}"#
    );
    bus.publish(
        format!("registry.register.{name}").into(),
        None,
        payload.into(),
    )
    .await
    .unwrap();
}

/// Waits (on the paused clock) for the next event; returns its kind and when.
async fn next(events: &mut pubsub_registry::EventStream) -> (EventKind, String, Instant) {
    let ev = events.next().await.unwrap().unwrap();
    (ev.kind, ev.instance.address().to_string(), Instant::now())
}

#[tokio::test(start_paused = true)]
async fn skewed_clocks_neither_shorten_nor_lengthen_a_life() {
    let bus = MemoryBus::new();
    let observer = Registry::builder().memory(&bus).build().await.unwrap();
    observer.observe("skewed").await.unwrap();
    let mut events = observer.events();
    let hour = 3_600_000;

    for (address, registered) in [
        ("past:1", now_ms() - hour),
        ("future:1", now_ms() + hour),
        ("epoch:1", 1),
    ] {
        let received = Instant::now();
        announce(&bus, "skewed", address, registered, 1000).await;
        let (kind, _, _) = next(&mut events).await;
        assert_eq!(
            kind,
            EventKind::Registered,
            "{address} was not dropped on arrival"
        );
        let (kind, addr, at) = next(&mut events).await;
        assert_eq!((kind, addr.as_str()), (EventKind::Expired, address));
        assert_eq!(
            at - received,
            Duration::from_millis(1500),
            "{address}: 1 s x 1.5 after reception"
        );
    }

    // Every announcement received pushes the due time back, whatever it says.
    let received = Instant::now();
    announce(&bus, "skewed", "past:2", now_ms() - hour, 1000).await;
    next(&mut events).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    announce(&bus, "skewed", "past:2", now_ms() - hour, 1000).await;
    let (kind, _, at) = next(&mut events).await;
    assert_eq!(kind, EventKind::Expired);
    assert_eq!(
        at - received,
        Duration::from_millis(2500),
        "1.5 s after the last one"
    );
}

#[tokio::test(start_paused = true)]
async fn expiry_work_follows_what_comes_due_not_what_is_tracked() {
    let bus = MemoryBus::new();
    let observer = Registry::builder()
        .memory(&bus)
        .event_capacity(1 << 15)
        .build()
        .await
        .unwrap();
    observer.observe_all().await.unwrap();
    let mut events = observer.events();
    for i in 0..10_000 {
        announce(
            &bus,
            &format!("long-{}", i % 100),
            &format!("10.1.{}.{}:1", i / 256, i % 256),
            0,
            600_000,
        )
        .await;
    }
    let started = Instant::now();
    for i in 0..100 {
        announce(&bus, "short", &format!("10.2.0.{i}:1"), 0, 300).await;
    }
    let mut expired = 0;
    while expired < 100 {
        let (kind, address, at) = next(&mut events).await;
        if kind == EventKind::Expired {
            assert!(address.starts_with("10.2.0."));
            assert_eq!(
                at - started,
                Duration::from_millis(450),
                "neither early nor late"
            );
            expired += 1;
        }
    }
    let stats = observer.stats();
    assert_eq!(stats.instances, 10_000);
    // One check per expiry, plus at most one per removal for the instance
    // of the same name that moved into the hole (heap entries name
    // positions): the 10,000 long-lived ones were never looked at.
    assert!(
        (100..200).contains(&stats.expiry_checks),
        "{} checks for 100 expiries",
        stats.expiry_checks
    );
}
