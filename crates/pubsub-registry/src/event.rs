//! Change notifications: what the cache saw happen to an instance.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};

use futures_util::Stream;
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
/// Each subscriber may fall behind by the registry's event capacity: one
/// that does not read never slows the registry or other subscribers down;
/// it is told what it missed with [`Lagged`].
pub struct EventStream {
    shared: Arc<Shared>,
    /// Its place among the ring's readers.
    slot: usize,
    /// Taken from the ring, not yet yielded.
    taken: VecDeque<Event>,
    name: Option<String>,
}

/// The registry's end of its event channel.
///
/// Every stream reads one ring of the newest events. The registry adds a
/// batch's events under one lock, and a stream takes all it has not read
/// under one lock, then yields them one by one from a buffer of its own:
/// a burst costs a lock per batch on each side instead of one per event.
/// With tokio's broadcast channel, which locked for every event on both
/// sides, sending and reading an event took about 400 instructions.
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

struct Shared {
    ring: Mutex<Ring>,
}

struct Ring {
    capacity: usize,
    /// Events some stream has not taken yet, oldest first; the newest is
    /// number `sent - 1`.
    events: VecDeque<Event>,
    /// Events sent so far, whether kept or not.
    sent: u64,
    /// The streams, each at the place it was given (`None` where one
    /// ended, until another takes the place).
    readers: Vec<Option<Reader>>,
    /// The places of streams that ended.
    free: Vec<usize>,
    closed: bool,
}

struct Reader {
    /// Number of the next event this stream has not taken.
    next: u64,
    /// Set while the stream waits for an event.
    waker: Option<Waker>,
}

/// What a stream found in the ring.
enum Took {
    Some,
    Lagged(u64),
    Nothing,
    Closed,
}

impl Ring {
    fn oldest(&self) -> u64 {
        self.sent - self.events.len() as u64
    }

    fn streams(&self) -> usize {
        self.readers.len() - self.free.len()
    }

    /// Drops the events every stream has taken.
    fn trim(&mut self) {
        let min = self
            .readers
            .iter()
            .flatten()
            .map(|r| r.next)
            .min()
            .unwrap_or(self.sent);
        let done = usize::try_from(min.saturating_sub(self.oldest())).unwrap_or(usize::MAX);
        self.events.drain(..done.min(self.events.len()));
    }

    /// Takes the wakers of the streams waiting for an event.
    fn waiting(&mut self) -> Waiting {
        let mut waiting = Waiting::default();
        let mut free = waiting.first.iter_mut();
        for w in self
            .readers
            .iter_mut()
            .flatten()
            .filter_map(|r| r.waker.take())
        {
            match free.next() {
                Some(slot) => *slot = Some(w),
                None => waiting.more.push(w),
            }
        }
        waiting
    }

    /// Moves (or, while other streams still need them, copies) into
    /// `into` the events the stream at `slot` has not taken. Copies are
    /// dropped from the ring by the next send, which looks at every stream
    /// once: a taker doing it would make each batch cost the square of the
    /// number of streams.
    fn take(&mut self, slot: usize, into: &mut VecDeque<Event>, waker: &Waker) -> Took {
        let (oldest, sent, alone, closed) =
            (self.oldest(), self.sent, self.streams() == 1, self.closed);
        let Some(r) = self.readers.get_mut(slot).and_then(Option::as_mut) else {
            return Took::Closed;
        };
        if r.next < oldest {
            let missed = oldest - r.next;
            r.next = oldest;
            return Took::Lagged(missed);
        }
        if r.next == sent {
            if closed {
                return Took::Closed;
            }
            if !r.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                r.waker = Some(waker.clone());
            }
            return Took::Nothing;
        }
        let from = usize::try_from(r.next - oldest).unwrap_or(usize::MAX);
        r.next = sent;
        if alone {
            // Nobody else needs them: moved, not copied (no reference
            // count touched), and as a whole buffer when the stream's is
            // empty, as it is whenever it takes.
            self.events.drain(..from);
            if into.is_empty() {
                std::mem::swap(&mut self.events, into);
            } else {
                into.extend(self.events.drain(..));
            }
        } else {
            into.extend(self.events.range(from..).cloned());
        }
        Took::Some
    }
}

impl Sender {
    /// A channel whose streams may each fall `capacity` events behind.
    pub(crate) fn new(capacity: usize) -> Self {
        Sender {
            shared: Arc::new(Shared {
                ring: Mutex::new(Ring {
                    capacity,
                    events: VecDeque::new(),
                    sent: 0,
                    readers: Vec::new(),
                    free: Vec::new(),
                    closed: false,
                }),
            }),
        }
    }

    /// A stream of the events sent from now on (of `name` only, if given).
    pub(crate) fn subscribe(&self, name: Option<String>) -> EventStream {
        let mut ring = self.shared.lock();
        let reader = Reader {
            next: ring.sent,
            waker: None,
        };
        let slot = match ring.free.pop() {
            Some(slot) => slot,
            None => {
                ring.readers.push(None);
                ring.readers.len() - 1
            }
        };
        ring.readers[slot] = Some(reader);
        EventStream {
            shared: self.shared.clone(),
            slot,
            taken: VecDeque::new(),
            name,
        }
    }

    /// Sends `events`, in order, leaving the vector empty.
    pub(crate) fn send_all(&self, events: &mut Vec<Event>) {
        let mut guard = self.shared.lock();
        let ring = &mut *guard;
        if ring.streams() == 0 {
            ring.sent += events.len() as u64;
            drop(guard);
            events.clear();
            return;
        }
        ring.trim();
        ring.sent += events.len() as u64;
        // Only the newest `capacity` are kept: the streams that had not
        // taken the others are told they lagged.
        let keep = events.len().min(ring.capacity);
        let overflow = (ring.events.len() + keep).saturating_sub(ring.capacity);
        ring.events.drain(..overflow);
        ring.events.extend(events.drain(events.len() - keep..));
        let waiting = ring.waiting();
        drop(guard);
        waiting.wake();
        // Those that did not fit, outside the lock.
        events.clear();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut ring = self.shared.lock();
        ring.closed = true;
        let waiting = ring.waiting();
        drop(ring);
        waiting.wake();
    }
}

/// The wakers of the streams waiting for an event, to be woken once the
/// ring is unlocked: a stream woken while it is locked would run, find it
/// locked and sleep again on the mutex (paced events took 2.6 µs longer).
#[derive(Default)]
struct Waiting {
    /// Most registries have a stream or two.
    first: [Option<Waker>; 4],
    more: Vec<Waker>,
}

impl Waiting {
    fn wake(self) {
        for w in self.first.into_iter().flatten().chain(self.more) {
            w.wake();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Nothing in the ring's critical sections can leave it half changed.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let mut ring = self.shared.lock();
        ring.readers[self.slot] = None;
        ring.free.push(self.slot);
        ring.trim();
    }
}

impl Stream for EventStream {
    type Item = Result<Event, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // Yields when the task's budget is spent, as tokio's own
            // channels do: a stream that always has an event must not hog
            // its worker.
            let budget = ready!(coop::poll_proceed(cx));
            if let Some(ev) = this.taken.pop_front() {
                budget.made_progress();
                // Another name's event, for a stream of one name.
                if this
                    .name
                    .as_deref()
                    .is_some_and(|n| n != ev.instance.name())
                {
                    continue;
                }
                return Poll::Ready(Some(Ok(ev)));
            }
            let took = this
                .shared
                .lock()
                .take(this.slot, &mut this.taken, cx.waker());
            match took {
                Took::Some => {}
                Took::Lagged(n) => {
                    budget.made_progress();
                    return Poll::Ready(Some(Err(Lagged(n))));
                }
                // Nothing taken: the budget is given back.
                Took::Nothing => return Poll::Pending,
                Took::Closed => return Poll::Ready(None),
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

    use super::*;
    use crate::service::Service;

    fn event(name: &str, address: &str) -> Event {
        let service = Service::new(name, address);
        let instance = Instance::new(service, Status::Passing, Duration::from_secs(1), 0, 0);
        Event {
            kind: EventKind::Registered,
            instance: Arc::new(instance),
        }
    }

    fn send(tx: &Sender, addresses: &[&str]) {
        let mut events = addresses.iter().map(|a| event("svc", a)).collect();
        tx.send_all(&mut events);
        assert!(events.is_empty());
    }

    fn address(got: Option<Result<Event, Lagged>>) -> String {
        got.expect("an event")
            .expect("not lagged")
            .instance
            .address()
            .to_string()
    }

    /// Events the ring still holds.
    fn kept(tx: &Sender) -> usize {
        tx.shared.lock().events.len()
    }

    #[test]
    fn a_stream_can_move_between_threads_and_be_shared() {
        fn check<T: Send + Sync + Unpin>() {}
        check::<EventStream>();
    }

    #[tokio::test]
    async fn takes_what_was_sent_then_waits_then_ends() {
        let tx = Sender::new(8);
        let mut events = tx.subscribe(None);
        send(&tx, &["a:1", "b:1"]);
        assert_eq!(address(events.next().await), "a:1");
        assert_eq!(address(events.next().await), "b:1");
        // Nothing sent: the stream waits, and the wait gets the next one.
        assert!(events.next().now_or_never().is_none());
        send(&tx, &["c:1"]);
        assert_eq!(address(events.next().await), "c:1");
        assert!(events.next().now_or_never().is_none());
        // What was sent before the end is still read, then the end.
        send(&tx, &["d:1"]);
        drop(tx);
        assert_eq!(address(events.next().await), "d:1");
        assert!(events.next().await.is_none());
        assert!(events.next().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_stream_is_woken_by_a_send() {
        let tx = Sender::new(8);
        let mut events = tx.subscribe(None);
        let reader = tokio::spawn(async move { address(events.next().await) });
        // Until the reader waits, a send could be taken without a wake-up.
        while tx.shared.lock().readers[0]
            .as_ref()
            .unwrap()
            .waker
            .is_none()
        {
            tokio::task::yield_now().await;
        }
        send(&tx, &["a:1"]);
        let got = tokio::time::timeout(Duration::from_secs(10), reader).await;
        assert_eq!(got.expect("woken").unwrap(), "a:1");
    }

    #[tokio::test]
    async fn every_waiting_stream_is_woken() {
        let tx = Sender::new(8);
        // More than `Waiting` keeps inline.
        let readers: Vec<_> = (0..6)
            .map(|_| {
                let mut events = tx.subscribe(None);
                tokio::spawn(async move { address(events.next().await) })
            })
            .collect();
        while tx
            .shared
            .lock()
            .readers
            .iter()
            .flatten()
            .any(|r| r.waker.is_none())
        {
            tokio::task::yield_now().await;
        }
        send(&tx, &["a:1"]);
        for reader in readers {
            let got = tokio::time::timeout(Duration::from_secs(10), reader).await;
            assert_eq!(got.expect("woken").unwrap(), "a:1");
        }
    }

    #[tokio::test]
    async fn each_stream_gets_every_event_and_the_ring_keeps_none_taken() {
        let tx = Sender::new(8);
        let (mut one, mut two) = (tx.subscribe(None), tx.subscribe(None));
        send(&tx, &["a:1", "b:1"]);
        // Each stream takes both at its first read.
        assert_eq!(address(one.next().await), "a:1");
        assert_eq!(address(two.next().await), "a:1");
        assert_eq!(kept(&tx), 2, "copies, dropped by the next send");
        send(&tx, &["c:1"]);
        assert_eq!(kept(&tx), 1, "both took a:1 and b:1");
        assert_eq!(address(one.next().await), "b:1");
        assert_eq!(address(one.next().await), "c:1");
        send(&tx, &["d:1"]);
        assert_eq!(kept(&tx), 2, "the second stream has not taken c:1");
        drop(two);
        assert_eq!(kept(&tx), 1, "a stream that ends needs nothing kept");
        assert_eq!(address(one.next().await), "d:1");
        assert_eq!(kept(&tx), 0, "a stream alone moves what it takes");
        drop(one);
        send(&tx, &["e:1"]);
        assert_eq!(kept(&tx), 0, "no stream, nothing kept");
    }

    #[tokio::test]
    async fn a_new_stream_takes_the_place_of_one_that_ended() {
        let tx = Sender::new(8);
        let one = tx.subscribe(None);
        let mut two = tx.subscribe(None);
        drop(one);
        let mut three = tx.subscribe(None);
        assert_eq!(tx.shared.lock().readers.len(), 2, "the place was reused");
        send(&tx, &["a:1"]);
        assert_eq!(address(two.next().await), "a:1");
        assert_eq!(address(three.next().await), "a:1");
        drop(two);
        send(&tx, &["b:1"]);
        assert_eq!(address(three.next().await), "b:1");
        assert_eq!(kept(&tx), 0);
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_is_told_then_reads_on() {
        let tx = Sender::new(2);
        let mut events = tx.subscribe(None);
        for a in ["a:1", "b:1", "c:1", "d:1", "e:1"] {
            send(&tx, &[a]);
        }
        assert_eq!(events.next().await.unwrap().unwrap_err(), Lagged(3));
        assert_eq!(address(events.next().await), "d:1");
        assert_eq!(address(events.next().await), "e:1");
        // A batch larger than the capacity: its oldest are missed.
        send(&tx, &["f:1", "g:1", "h:1"]);
        assert_eq!(events.next().await.unwrap().unwrap_err(), Lagged(1));
        assert_eq!(address(events.next().await), "g:1");
        assert_eq!(address(events.next().await), "h:1");
        assert!(events.next().now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_stream_of_one_name_skips_the_others() {
        let tx = Sender::new(8);
        let mut events = tx.subscribe(Some("b".into()));
        let mut batch = vec![event("a", "a:1"), event("b", "b:1"), event("a", "a:2")];
        tx.send_all(&mut batch);
        let mut batch = vec![event("b", "b:2")];
        tx.send_all(&mut batch);
        assert_eq!(address(events.next().await), "b:1");
        assert_eq!(address(events.next().await), "b:2");
        assert!(events.next().now_or_never().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_that_always_has_events_lets_other_tasks_run() {
        let n = 1000;
        let tx = Sender::new(n);
        let mut events = tx.subscribe(None);
        let mut batch = (0..n)
            .map(|i| event("svc", &format!("10.0.0.{i}:80")))
            .collect();
        tx.send_all(&mut batch);
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
