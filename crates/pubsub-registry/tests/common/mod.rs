//! What every integration test needs: a broker per test (in memory, or a
//! private nats-server or redis-server), raw connections to it, and waiting
//! on conditions with a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pubsub_registry::transport::{Messages, Topic, Transport};
use pubsub_registry::{Event, EventKind, EventStream, MemoryBus, Registry, RegistryBuilder};
use registry_harness::NatsServer;
#[cfg(feature = "redis")]
use registry_harness::RedisServer;
use tokio::time::Instant;

/// How long a test waits for something that should happen before failing.
/// Generous: the machine may be busy with other tests.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A lookup timeout for tests that expect to find the service: long enough
/// to never fail under load, and a found service returns at once anyway.
pub const FIND: Duration = Duration::from_secs(5);

pub enum Broker {
    Memory(MemoryBus),
    Nats(NatsServer),
    #[cfg(feature = "redis")]
    Redis(RedisServer),
}

/// One private broker and ways to connect to it.
pub struct Env {
    pub broker: Broker,
}

impl Env {
    pub async fn memory() -> Env {
        Env {
            broker: Broker::Memory(MemoryBus::new()),
        }
    }

    pub async fn nats() -> Env {
        let server = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        Env {
            broker: Broker::Nats(server),
        }
    }

    #[cfg(feature = "redis")]
    pub async fn redis() -> Env {
        let server = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        Env {
            broker: Broker::Redis(server),
        }
    }

    /// Whether messages keep their reply subject on this broker (Redis has
    /// none).
    pub fn carries_replies(&self) -> bool {
        match &self.broker {
            Broker::Memory(_) | Broker::Nats(_) => true,
            #[cfg(feature = "redis")]
            Broker::Redis(_) => false,
        }
    }

    /// A builder on a new connection, with a lookup timeout fit for tests.
    pub fn builder(&self) -> RegistryBuilder {
        let b = Registry::builder().timeout(FIND);
        match &self.broker {
            Broker::Memory(bus) => b.memory(bus),
            Broker::Nats(s) => b.nats_url(s.url()),
            #[cfg(feature = "redis")]
            Broker::Redis(s) => b.redis_url(s.url()),
        }
    }

    pub async fn registry(&self) -> Registry {
        self.builder().build().await.expect("build registry")
    }

    /// A raw connection, to publish hand-made messages as a foreign peer
    /// would, or to watch the wire.
    pub async fn raw(&self) -> Arc<dyn Transport> {
        match &self.broker {
            Broker::Memory(bus) => Arc::new(bus.clone()),
            Broker::Nats(s) => Arc::new(
                pubsub_registry::NatsTransport::connect(&s.url())
                    .await
                    .expect("raw connection"),
            ),
            #[cfg(feature = "redis")]
            Broker::Redis(s) => Arc::new(
                pubsub_registry::RedisTransport::connect(&s.url())
                    .await
                    .expect("raw connection"),
            ),
        }
    }

    pub async fn publish(
        &self,
        raw: &Arc<dyn Transport>,
        subject: &str,
        payload: impl AsRef<[u8]>,
    ) {
        raw.publish(subject.into(), None, payload.as_ref().to_vec().into())
            .await
            .expect("publish");
        raw.flush().await.expect("flush");
    }

    pub async fn watch(&self, raw: &Arc<dyn Transport>, topic: Topic) -> Messages {
        let messages = raw.subscribe(topic).await.expect("subscribe");
        raw.flush().await.expect("flush");
        messages
    }
}

/// The next event of `kind` for `address`, skipping others; fails the test
/// after [`DEADLINE`].
pub async fn next_event(events: &mut EventStream, kind: EventKind, address: &str) -> Event {
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(ev) = events.next().await {
            let ev = ev.expect("event stream lagged");
            if ev.kind == kind && ev.instance.address() == address {
                return ev;
            }
        }
        panic!("event stream ended");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {kind:?} event for {address} within {DEADLINE:?}"))
}

/// Waits for every listed event, in any order, skipping others; fails the
/// test after [`DEADLINE`].
pub async fn expect_events(events: &mut EventStream, expected: &[(EventKind, &str)]) {
    let mut missing: Vec<(EventKind, &str)> = expected.to_vec();
    let waited = tokio::time::timeout(DEADLINE, async {
        while !missing.is_empty() {
            let ev = events
                .next()
                .await
                .expect("event stream ended")
                .expect("lagged");
            missing.retain(|(k, a)| !(*k == ev.kind && *a == ev.instance.address()));
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "events not seen within {DEADLINE:?}: {missing:?}"
    );
}

/// Waits until `cond` holds, checking every 5 ms; fails after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An example's binary as `cargo test` builds it, beside the test binaries.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        example.exists(),
        "build the examples first (cargo test builds them): {example:?}"
    );
    example
}
