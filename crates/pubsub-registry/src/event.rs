//! Change notifications: what the cache saw happen to an instance.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::Stream;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use crate::service::{Instance, Status};

/// Something that happened to an instance in the local cache.
#[derive(Clone, Debug)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The instance it happened to (for `Unregistered` and `Expired`, as it
    /// was last seen).
    pub instance: Arc<Instance>,
}

/// The kinds of [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// A new instance, or a known one announced with different details.
    Registered,
    /// The instance said it is gone.
    Unregistered,
    /// The instance was not heard from within its interval x due factor.
    Expired,
    /// The instance announced a new status.
    StatusChanged {
        /// The status before.
        previous: Status,
    },
}

impl EventKind {
    /// `registered`, `unregistered`, `expired` or `status-changed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Registered => "registered",
            EventKind::Unregistered => "unregistered",
            EventKind::Expired => "expired",
            EventKind::StatusChanged { .. } => "status-changed",
        }
    }
}

/// The subscriber fell behind and this many events were dropped for it; the
/// stream goes on with the newest ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event subscriber lagged: {0} events missed")]
pub struct Lagged(pub u64);

/// A stream of events, for every service or for one name.
///
/// Each subscriber has a bounded buffer of its own: one that does not read
/// never slows the registry or other subscribers down; it is told what it
/// missed with [`Lagged`].
pub struct EventStream {
    inner: BroadcastStream<Event>,
    name: Option<String>,
}

impl EventStream {
    pub(crate) fn new(rx: tokio::sync::broadcast::Receiver<Event>, name: Option<String>) -> Self {
        EventStream {
            inner: BroadcastStream::new(rx),
            name,
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(BroadcastStreamRecvError::Lagged(n))) => {
                    return Poll::Ready(Some(Err(Lagged(n))))
                }
                Some(Ok(ev)) => {
                    if self.name.as_deref().is_none_or(|n| n == ev.instance.name()) {
                        return Poll::Ready(Some(Ok(ev)));
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("name", &self.name)
            .finish()
    }
}
