//! The pub/sub a registry runs over: publish, subscribe, flush.
//!
//! A transport moves opaque messages; it knows nothing of the protocol. The
//! registry decodes what arrives ([`protocol`](crate::protocol)) and feeds the
//! catalog (the local cache).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use tokio::sync::watch;

use crate::error::Result;

pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

/// A message as it arrives.
#[derive(Clone, Debug)]
pub struct Message {
    /// The subject (NATS) or channel (Redis) it was published on.
    pub subject: String,
    /// Where the sender asked for replies, if it did.
    pub reply: Option<String>,
    /// The payload, unread.
    pub payload: Bytes,
}

/// What to subscribe to. One subscription delivers its messages in the
/// order the broker received them; two subscriptions have no order between
/// them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Exactly this subject.
    Subject(String),
    /// A NATS-style pattern: `*` stands for exactly one dot-separated token,
    /// a final `>` for one or more. Transports without such patterns
    /// subscribe wider and keep only what [`Topic::matches`].
    Pattern(String),
}

impl Topic {
    /// Whether `subject` falls under this topic, with NATS semantics.
    ///
    /// ```
    /// use pubsub_registry::transport::Topic;
    /// let one_name = Topic::Pattern("registry.*.a.b".into());
    /// assert!(one_name.matches("registry.register.a.b"));
    /// assert!(!one_name.matches("registry.register.x.a.b"));
    /// assert!(Topic::Pattern("registry.>".into()).matches("registry.ping.x"));
    /// ```
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            Topic::Subject(s) => s == subject,
            Topic::Pattern(p) => {
                let mut want = p.split('.');
                let mut got = subject.split('.');
                loop {
                    match (want.next(), got.next()) {
                        (Some(">"), Some(_)) => return true,
                        (Some("*"), Some(_)) => {}
                        (Some(w), Some(g)) if w == g => {}
                        (None, None) => return true,
                        _ => return false,
                    }
                }
            }
        }
    }
}

/// The messages of one subscription; dropping it unsubscribes.
pub type Messages = BoxStream<'static, Message>;

/// A pub/sub connection the registry can run over.
///
/// Implementations exist for NATS ([`nats::NatsTransport`]), Redis (feature
/// `redis`) and in-process use ([`memory::MemoryBus`]).
pub trait Transport: Send + Sync + 'static {
    /// Publishes `payload` on `subject`, with a reply subject if given.
    fn publish(
        &self,
        subject: String,
        reply: Option<String>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<()>>;

    /// Subscribes. The broker may not have the subscription yet when this
    /// returns; [`flush`](Self::flush) waits until it has. Messages this
    /// connection publishes afterwards are matched against it either way.
    fn subscribe(&self, topic: Topic) -> BoxFuture<'_, Result<Messages>>;

    /// Waits until the broker has processed everything sent so far on this
    /// connection: publishes and subscriptions.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;

    /// A counter that moves each time the connection is re-established after
    /// a loss, so the registry can announce itself again at once. `None` if
    /// the transport never reconnects.
    fn reconnects(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Where it is connected, for logs and errors.
    fn describe(&self) -> String;
}
