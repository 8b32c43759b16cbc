//! Change notifications: what the cache saw happen to an instance.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::Stream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio::task::coop;

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
    rx: Rx,
    name: Option<String>,
}

/// A receiver's wait for the next event owns the receiver (the future of
/// `recv` borrows it): the receiver is moved into a boxed wait when there is
/// nothing to take and back out when the wait ends. Events already sent are
/// taken straight from the receiver, with no future: in a burst that is
/// nearly all of them, and boxing a wait for each one, as tokio-stream's
/// `BroadcastStream` does, cost more than taking the event.
enum Rx {
    Ready(Receiver<Event>),
    Waiting(Pin<Box<dyn Future<Output = Waited> + Send + Sync>>),
    Closed,
}

type Waited = (Result<Event, RecvError>, Receiver<Event>);

impl EventStream {
    pub(crate) fn new(rx: Receiver<Event>, name: Option<String>) -> Self {
        EventStream {
            rx: Rx::Ready(rx),
            name,
        }
    }

    /// Moves the receiver into a wait for the next event.
    fn wait(&mut self) {
        if let Rx::Ready(mut rx) = std::mem::replace(&mut self.rx, Rx::Closed) {
            self.rx = Rx::Waiting(Box::pin(async move { (rx.recv().await, rx) }));
        }
    }

    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, Lagged>>> {
        let got = match &mut self.rx {
            Rx::Ready(rx) => {
                // Yields when the task's budget is spent, as `recv` would:
                // a stream that always has an event must not hog its worker.
                let budget = ready!(coop::poll_proceed(cx));
                let got = match rx.try_recv() {
                    Ok(ev) => Ok(ev),
                    Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                    Err(TryRecvError::Closed) => Err(RecvError::Closed),
                    Err(TryRecvError::Empty) => {
                        // Nothing taken: the budget is given back.
                        drop(budget);
                        self.wait();
                        return self.poll_any(cx);
                    }
                };
                budget.made_progress();
                got
            }
            Rx::Waiting(wait) => {
                let (got, rx) = ready!(wait.as_mut().poll(cx));
                self.rx = Rx::Ready(rx);
                got
            }
            Rx::Closed => return Poll::Ready(None),
        };
        Poll::Ready(match got {
            Ok(ev) => Some(Ok(ev)),
            Err(RecvError::Lagged(n)) => Some(Err(Lagged(n))),
            Err(RecvError::Closed) => {
                self.rx = Rx::Closed;
                None
            }
        })
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(self.poll_any(cx)) {
                // Another name's event, for a stream of one name.
                Some(Ok(ev))
                    if self
                        .name
                        .as_deref()
                        .is_some_and(|n| n != ev.instance.name()) => {}
                other => return Poll::Ready(other),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use futures_util::{FutureExt, StreamExt};
    use tokio::sync::broadcast;

    use super::*;
    use crate::service::Service;

    fn event(address: &str) -> Event {
        let service = Service::new("svc", address);
        let instance = Instance::new(service, Status::Passing, Duration::from_secs(1), 0, 0);
        Event {
            kind: EventKind::Registered,
            instance: Arc::new(instance),
        }
    }

    fn address(got: Option<Result<Event, Lagged>>) -> String {
        got.expect("an event")
            .expect("not lagged")
            .instance
            .address()
            .to_string()
    }

    #[test]
    fn a_stream_can_move_between_threads_and_be_shared() {
        fn check<T: Send + Sync + Unpin>() {}
        check::<EventStream>();
    }

    #[tokio::test]
    async fn takes_what_was_sent_then_waits_then_ends() {
        let (tx, rx) = broadcast::channel(8);
        let mut events = EventStream::new(rx, None);
        tx.send(event("a:1")).unwrap();
        tx.send(event("b:1")).unwrap();
        assert_eq!(address(events.next().await), "a:1");
        assert_eq!(address(events.next().await), "b:1");
        // Nothing sent: the stream waits, and the wait gets the next one.
        assert!(events.next().now_or_never().is_none());
        tx.send(event("c:1")).unwrap();
        assert_eq!(address(events.next().await), "c:1");
        assert!(events.next().now_or_never().is_none());
        drop(tx);
        assert!(events.next().await.is_none());
        assert!(events.next().await.is_none());
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_is_told_then_reads_on() {
        let (tx, rx) = broadcast::channel(2);
        let mut events = EventStream::new(rx, None);
        for a in ["a:1", "b:1", "c:1", "d:1", "e:1"] {
            tx.send(event(a)).unwrap();
        }
        assert_eq!(events.next().await.unwrap().unwrap_err(), Lagged(3));
        assert_eq!(address(events.next().await), "d:1");
        assert_eq!(address(events.next().await), "e:1");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_that_always_has_events_lets_other_tasks_run() {
        let n = 1000;
        let (tx, rx) = broadcast::channel(n);
        let mut events = EventStream::new(rx, None);
        for i in 0..n {
            tx.send(event(&format!("10.0.0.{i}:80"))).unwrap();
        }
        let ran = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let ran = ran.clone();
            async move { ran.store(true, Ordering::Relaxed) }
        });
        let mut ran_while_reading = false;
        for _ in 0..n {
            events.next().await.unwrap().unwrap();
            ran_while_reading |= ran.load(Ordering::Relaxed);
        }
        assert!(ran_while_reading, "1000 events read without yielding once");
        other.await.unwrap();
    }
}
