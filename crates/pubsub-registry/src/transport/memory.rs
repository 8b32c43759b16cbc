//! An in-process bus: registries built on clones of one [`MemoryBus`] see
//! each other, with no broker. For single-process use, tests and the quick
//! start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Message, Messages, Subject, Topic, Transport};
use crate::error::Result;

/// Messages a subscriber may fall behind by before new ones are dropped for
/// it, as a NATS server drops them for a slow consumer.
const BUFFER: usize = 1 << 16;

/// An in-process pub/sub bus. Cloning it gives another handle to the same bus.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use pubsub_registry::{MemoryBus, Registry, Service};
///
/// let bus = MemoryBus::new();
/// let server = Registry::builder().memory(&bus).build().await?;
/// server.register(Service::new("echo", "127.0.0.1:7000")).await?;
///
/// let client = Registry::builder().memory(&bus).build().await?;
/// assert_eq!(client.get_service("echo").await?.address(), "127.0.0.1:7000");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Bus>,
}

#[derive(Default)]
struct Bus {
    subs: RwLock<Subs>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Subs {
    exact: HashMap<String, Vec<Sub>>,
    patterns: Vec<(Topic, Sub)>,
}

struct Sub {
    id: u64,
    tx: mpsc::Sender<Message>,
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages dropped because a subscriber was 65,536 messages behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Live subscriptions on the bus.
    #[cfg(test)]
    pub(crate) fn subscriptions(&self) -> usize {
        let subs = self.inner.subs.read().unwrap_or_else(|e| e.into_inner());
        subs.exact.values().map(Vec::len).sum::<usize>() + subs.patterns.len()
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus").finish_non_exhaustive()
    }
}

impl Bus {
    fn publish(&self, msg: Message) {
        let subs = self.subs.read().unwrap_or_else(|e| e.into_inner());
        let exact = subs.exact.get(msg.subject.as_str()).into_iter().flatten();
        let patterns = subs
            .patterns
            .iter()
            .filter(|(t, _)| t.matches(&msg.subject))
            .map(|(_, s)| s);
        for sub in exact.chain(patterns) {
            if sub.tx.try_send(msg.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
        subs.exact.retain(|_, v| {
            v.retain(|s| s.id != id);
            !v.is_empty()
        });
        subs.patterns.retain(|(_, s)| s.id != id);
    }
}

/// Unsubscribes when the subscription's stream is dropped.
struct Unsubscribe {
    bus: Weak<Bus>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.unsubscribe(self.id);
        }
    }
}

impl Transport for MemoryBus {
    fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<()>> {
        self.inner.publish(Message {
            subject,
            reply,
            payload,
        });
        Box::pin(async { Ok(()) })
    }

    fn subscribe(&self, topic: Topic) -> BoxFuture<'_, Result<Messages>> {
        let (tx, rx) = mpsc::channel(BUFFER);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut subs = self.inner.subs.write().unwrap_or_else(|e| e.into_inner());
            let sub = Sub { id, tx };
            match topic {
                Topic::Subject(s) => subs.exact.entry(s).or_default().push(sub),
                t @ Topic::Pattern(_) => subs.patterns.push((t, sub)),
            }
        }
        let guard = Unsubscribe {
            bus: Arc::downgrade(&self.inner),
            id,
        };
        let stream = ReceiverStream::new(rx).map(move |m| {
            let _ = &guard;
            m
        });
        Box::pin(async move { Ok(stream.boxed()) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
