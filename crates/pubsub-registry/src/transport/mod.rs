//! The pub/sub a registry runs over: publish, subscribe, flush.
//!
//! A transport moves opaque messages; it knows nothing of the protocol. The
//! registry decodes what arrives ([`protocol`](crate::protocol)) and feeds the
//! catalog (the local cache).

use std::fmt;
#[cfg(not(feature = "nats"))]
use std::sync::Arc;

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
    pub subject: Subject,
    /// Where the sender asked for replies, if it did.
    pub reply: Option<Subject>,
    /// The payload, unread.
    pub payload: Bytes,
}

/// A subject or channel name: text, cheap to clone. A received one is kept
/// as the NATS client parsed it rather than copied, and one made here is
/// handed to the NATS client as it is: a registration's subject is made
/// once, not once per announcement (a copy per message is a noticeable
/// part of sending or taking one in).
///
/// ```
/// use pubsub_registry::transport::Subject;
/// let s = Subject::from("registry.register.a");
/// assert_eq!(s, "registry.register.a");
/// assert!(s.ends_with(".a"));
/// ```
#[derive(Clone)]
pub struct Subject(Text);

// With NATS compiled in, text is kept in the client's own form, which it
// takes without a copy; either form clones by a reference count.
#[cfg(feature = "nats")]
type Text = async_nats::Subject;
#[cfg(not(feature = "nats"))]
type Text = Arc<str>;

impl Subject {
    /// The subject as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Subject {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Subject {
    fn from(s: String) -> Self {
        Subject(s.into())
    }
}

impl From<&str> for Subject {
    fn from(s: &str) -> Self {
        Subject(s.into())
    }
}

#[cfg(feature = "nats")]
impl From<async_nats::Subject> for Subject {
    fn from(s: async_nats::Subject) -> Self {
        Subject(s)
    }
}

#[cfg(feature = "nats")]
impl From<Subject> for async_nats::Subject {
    fn from(s: Subject) -> Self {
        s.0
    }
}

impl PartialEq for Subject {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Subject {}

impl PartialEq<str> for Subject {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Subject {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Subject {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl std::hash::Hash for Subject {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Build subjects with `.into()` from text; the registry keeps the ones
    /// it sends repeatedly and passes clones.
    fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
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
