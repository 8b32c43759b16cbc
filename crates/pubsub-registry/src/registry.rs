//! The registry: registers this process's services, keeps the local cache of
//! others' in step with the broker, and answers lookups from it.
//!
//! The path of a message: a transport subscription task receives it,
//! [`protocol`](crate::protocol) decodes and checks it, the
//! [`catalog`](crate::catalog) takes it in, and the change goes out as an
//! [`Event`] to the callback and the event streams; lookups read the catalog.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::{AbortHandle as Unfollow, AbortRegistration, Abortable};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::catalog::{Catalog, Change, ChangeKind, Snapshot};
use crate::due::{self, DueHeap};
use crate::error::{Error, Result};
use crate::event::{self, Event, EventStream};
use crate::filter::{Chain, Filter, ObserveFilter};
use crate::protocol::{self, Kind};
use crate::release::Release;
use crate::service::{Instance, Instances, Service, Status};
use crate::transport::memory::MemoryBus;
use crate::transport::{Message, Messages, Subject, Topic, Transport};

/// The Go package's lookup timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// The Go package's register interval.
pub const DEFAULT_REGISTER_INTERVAL: Duration = Duration::from_secs(20);
/// The Go package's due factor: an instance expires when not heard from for
/// its interval times this.
pub const DEFAULT_DUE_FACTOR: f64 = 1.5;
/// How often an instance answers pings for one name at most; pings within
/// the window are answered once, at its end, so every pinger is served.
pub const DEFAULT_PING_WINDOW: Duration = Duration::from_millis(50);
/// Most messages a subscription takes in under one lock of the cache.
const MAX_BATCH: usize = 256;
/// A batch at least this long was a queue: messages arrived faster than
/// they were taken in. (tokio's cooperative budget ends a batch at 128
/// messages in practice, before `MAX_BATCH`.)
const QUEUED: usize = 64;

/// Events a subscriber may fall behind by before it starts missing some.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

/// Builds a [`Registry`]; every option has the Go package's default.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use std::time::Duration;
/// use pubsub_registry::{Filter, Registry};
///
/// let registry = Registry::builder()
///     .nats_url("nats://127.0.0.1:4222")
///     .main_topic("tenant-a")
///     .timeout(Duration::from_millis(250))
///     .filter(Filter::passing())
///     .on_event(|e| println!("{} {}", e.kind.as_str(), e.instance.address()))
///     .build()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct RegistryBuilder {
    transport: Option<Source>,
    opts: Options,
}

enum Source {
    Ready(Arc<dyn Transport>),
    #[cfg(feature = "nats")]
    NatsUrl(String, Option<Box<async_nats::ConnectOptions>>),
    #[cfg(feature = "nats")]
    NatsClient(async_nats::Client),
    #[cfg(feature = "redis")]
    RedisUrl(String),
    #[cfg(feature = "redis")]
    RedisClient(Box<redis::Client>),
}

#[derive(Clone)]
struct Options {
    timeout: Duration,
    register_interval: Duration,
    due_factor: f64,
    main_topic: String,
    filters: Vec<Filter>,
    observe_filters: Vec<ObserveFilter>,
    on_event: Option<Callback>,
    host: String,
    ping_window: Duration,
    event_capacity: usize,
    release_memory: bool,
}

impl Default for RegistryBuilder {
    fn default() -> Self {
        RegistryBuilder {
            transport: None,
            opts: Options {
                timeout: DEFAULT_TIMEOUT,
                register_interval: DEFAULT_REGISTER_INTERVAL,
                due_factor: DEFAULT_DUE_FACTOR,
                main_topic: protocol::DEFAULT_MAIN_TOPIC.to_string(),
                filters: Vec::new(),
                observe_filters: Vec::new(),
                on_event: None,
                host: gethostname::gethostname().to_string_lossy().into_owned(),
                ping_window: DEFAULT_PING_WINDOW,
                event_capacity: DEFAULT_EVENT_CAPACITY,
                release_memory: true,
            },
        }
    }
}

impl RegistryBuilder {
    /// Connects to NATS at `url` (several URLs separated by commas for a
    /// cluster) when built.
    #[cfg(feature = "nats")]
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.transport = Some(Source::NatsUrl(url.into(), None));
        self
    }

    /// Connects to NATS at `url` with the caller's connect options
    /// (credentials, token, TLS, ...).
    #[cfg(feature = "nats")]
    pub fn nats_options(
        mut self,
        url: impl Into<String>,
        options: async_nats::ConnectOptions,
    ) -> Self {
        self.transport = Some(Source::NatsUrl(url.into(), Some(Box::new(options))));
        self
    }

    /// Runs over a NATS client the caller already has.
    #[cfg(feature = "nats")]
    pub fn nats_client(mut self, client: async_nats::Client) -> Self {
        self.transport = Some(Source::NatsClient(client));
        self
    }

    /// Connects to Redis at `url` when built: `redis://[user][:password@]host[:port][/db]`,
    /// or `rediss://...` for TLS. The registry then uses two Redis
    /// connections, whatever the number of names it observes.
    #[cfg(feature = "redis")]
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.transport = Some(Source::RedisUrl(url.into()));
        self
    }

    /// Runs over Redis with a client the caller already has (its own TLS
    /// certificates, credentials, ...); the two connections are opened from
    /// it when built.
    #[cfg(feature = "redis")]
    pub fn redis_client(mut self, client: redis::Client) -> Self {
        self.transport = Some(Source::RedisClient(Box::new(client)));
        self
    }

    /// Runs over an in-process bus.
    pub fn memory(mut self, bus: &MemoryBus) -> Self {
        self.transport = Some(Source::Ready(Arc::new(bus.clone())));
        self
    }

    /// Runs over any [`Transport`].
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(Source::Ready(transport));
        self
    }

    /// How long a lookup that missed the cache waits for an answer to its
    /// ping (default 100 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = timeout;
        self
    }

    /// How often registered services are announced again (default 20 s).
    pub fn register_interval(mut self, interval: Duration) -> Self {
        self.opts.register_interval = interval;
        self
    }

    /// An instance expires when not heard from for its announced interval
    /// times this factor (default 1.5; at least 1).
    pub fn due_factor(mut self, factor: f64) -> Self {
        self.opts.due_factor = factor;
        self
    }

    /// The prefix of every subject; one per tenant (default `registry`).
    pub fn main_topic(mut self, topic: impl Into<String>) -> Self {
        self.opts.main_topic = topic.into();
        self
    }

    /// Adds a filter applied to every lookup.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.opts.filters.push(filter);
        self
    }

    /// Adds an observe filter: announcements it refuses never enter the
    /// cache.
    pub fn observe_filter(mut self, filter: ObserveFilter) -> Self {
        self.opts.observe_filters.push(filter);
        self
    }

    /// Calls `f` for every event, in order, on the task that received the
    /// message (the Go package's observer event). Keep it short; use
    /// [`Registry::events`] for anything slow.
    pub fn on_event(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.opts.on_event = Some(Arc::new(f));
        self
    }

    /// The host name put on services registered without one and used by the
    /// same-host filters (default: this machine's).
    pub fn host_name(mut self, host: impl Into<String>) -> Self {
        self.opts.host = host.into();
        self
    }

    /// The window within which pings for one name are answered once
    /// (default 50 ms; zero answers every ping).
    pub fn ping_window(mut self, window: Duration) -> Self {
        self.opts.ping_window = window;
        self
    }

    /// Events each stream subscriber may fall behind by (default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.opts.event_capacity = capacity;
        self
    }

    /// Whether to give the memory a burst of messages leaves behind back to
    /// the system (default: yes). With glibc, messages that queue faster
    /// than the cache takes them in leave freed memory in the allocator's
    /// per-thread arenas, which it keeps: an observer that took in 100,000
    /// announcements at once held 73 MiB for a live set of 45. When a
    /// subscription has worked through a backlog of at least 8,192
    /// messages and a second has then passed without a new one, the
    /// registry calls glibc's `malloc_trim` once, on tokio's blocking pool,
    /// and while a backlog lasts, once after every 16,384 messages taken
    /// from it; [`Stats::memory_releases`] counts the calls. Paced traffic and
    /// heartbeats never build a backlog and never cause one. It walks the
    /// whole heap with each arena locked in turn, so a process with a
    /// large heap and strict allocation latencies may prefer to turn it
    /// off. Other allocators and platforms: no effect.
    pub fn release_memory(mut self, release: bool) -> Self {
        self.opts.release_memory = release;
        self
    }

    /// Checks the options, connects, and starts the registry.
    pub async fn build(self) -> Result<Registry> {
        let o = &self.opts;
        protocol::validate_main_topic(&o.main_topic)?;
        if o.register_interval.is_zero() {
            return Err(invalid("register_interval", "must be greater than zero"));
        }
        if !(o.due_factor >= 1.0 && o.due_factor <= 1000.0) {
            return Err(invalid("due_factor", "must be between 1 and 1000"));
        }
        if o.event_capacity == 0 {
            return Err(invalid("event_capacity", "must be at least 1"));
        }
        // With no broker feature only `Ready` is left to match.
        #[cfg_attr(
            not(any(feature = "nats", feature = "redis")),
            allow(clippy::infallible_destructuring_match)
        )]
        let transport: Arc<dyn Transport> = match self.transport.ok_or(Error::NoTransport)? {
            Source::Ready(t) => t,
            #[cfg(feature = "nats")]
            Source::NatsUrl(url, None) => {
                Arc::new(crate::transport::nats::NatsTransport::connect(&url).await?)
            }
            #[cfg(feature = "nats")]
            Source::NatsUrl(url, Some(options)) => {
                Arc::new(crate::transport::nats::NatsTransport::connect_with(&url, *options).await?)
            }
            #[cfg(feature = "nats")]
            Source::NatsClient(client) => {
                Arc::new(crate::transport::nats::NatsTransport::from_client(client))
            }
            #[cfg(feature = "redis")]
            Source::RedisUrl(url) => {
                Arc::new(crate::transport::redis::RedisTransport::connect(&url).await?)
            }
            #[cfg(feature = "redis")]
            Source::RedisClient(client) => {
                Arc::new(crate::transport::redis::RedisTransport::from_client(*client).await?)
            }
        };
        Ok(Registry::start(transport, self.opts))
    }
}

fn invalid(option: &'static str, reason: &str) -> Error {
    Error::InvalidOption {
        option,
        reason: reason.to_string(),
    }
}

/// The options of a plain lookup.
static NO_OPTIONS: Lookup = Lookup {
    filters: Vec::new(),
    no_wait: false,
    timeout: None,
};

/// A lookup's future: ready at once on a cache hit (nothing to allocate or
/// poll twice), boxed on a miss, which waits on the network anyway.
enum Answer<'a, T> {
    Ready(Option<Result<T>>),
    Waiting(Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>),
}

impl<T: Unpin> Future for Answer<'_, T> {
    type Output = Result<T>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        match self.get_mut() {
            Answer::Ready(found) => Poll::Ready(found.take().expect("polled after completion")),
            Answer::Waiting(waiting) => waiting.as_mut().poll(cx),
        }
    }
}

/// Per-call lookup options: extra filters, cache only, a timeout of its own.
///
/// ```
/// use std::time::Duration;
/// use pubsub_registry::{Filter, Lookup};
/// let lookup = Lookup::new()
///     .filter(Filter::round_robin())
///     .timeout(Duration::from_millis(500));
/// # let _ = (lookup, Lookup::new().no_wait());
/// ```
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Lookup {
    filters: Vec<Filter>,
    no_wait: bool,
    timeout: Option<Duration>,
}

impl Lookup {
    /// No extra filter, the registry's timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a filter for this call, after the registry's own.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filters.push(filter);
        self
    }

    /// Answers from the cache only: no observe, no ping, no wait.
    pub fn no_wait(mut self) -> Self {
        self.no_wait = true;
        self
    }

    /// How long to wait after a cache miss, instead of the registry's
    /// timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Counters of what arrived from the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages taken in (announcements, unregisters, pings).
    pub received: u64,
    /// Messages rejected as malformed or unsafe (see
    /// [`DecodeError`](crate::protocol::DecodeError)); the cache never saw
    /// them.
    pub rejected: u64,
    /// Announcements an observe filter refused.
    pub filtered: u64,
    /// Pings answered (coalesced pings count once).
    pub pings_answered: u64,
    /// Instances in the cache now.
    pub instances: usize,
    /// Due-time entries the expiry timer examined: it grows with what comes
    /// due (an expiry, a refreshed instance's entry pushed back once per
    /// due time, the entry of an instance that moved when another was
    /// removed), never with a scan of everything tracked.
    pub expiry_checks: u64,
    /// Times the memory a burst left behind was given back (see
    /// [`RegistryBuilder::release_memory`]).
    pub memory_releases: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    rejected: AtomicU64,
    filtered: AtomicU64,
    pings_answered: AtomicU64,
    /// Unix seconds of the last rejection warning, to rate-limit them.
    last_warning: AtomicU64,
}

/// A service registry over one pub/sub connection.
///
/// Cloning gives another handle to the same registry. When the last handle
/// is dropped, the registry unregisters what it registered (best effort: use
/// [`close`](Self::close) to wait for it).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use pubsub_registry::{MemoryBus, Registry, Service, Status};
///
/// let bus = MemoryBus::new();
/// let registry = Registry::builder().memory(&bus).build().await?;
/// let svc = Service::new("api", "127.0.0.1:8080");
/// let handle = registry.register(svc.clone()).await?;
/// registry.set_service_status(&svc, Status::Warning).await?;
/// let found = registry.get_service("api").await?;
/// assert_eq!(found.status, Status::Warning);
/// handle.unregister().await?;
/// registry.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<dyn Transport>,
    opts: Options,
    catalog: Arc<Catalog>,
    events: event::Sender,
    own: Mutex<Own>,
    /// Serialises subscribe and unsubscribe, which await the broker, so
    /// concurrent lookups of one name subscribe once.
    subs: tokio::sync::Mutex<Subs>,
    closed: AtomicBool,
    counters: Counters,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Woken when the earliest heartbeat moves earlier. Not in `own`: the
    /// heartbeat task waits on it without keeping the registry alive.
    beat_timer: Arc<Notify>,
    release: Arc<Release>,
}

/// What a subscription is for.
#[derive(Clone, Copy)]
enum Listener {
    /// Announcements and unregisters, for the cache.
    Observer,
    /// Pings for names registered here.
    Pinged,
    /// "Ping all" (see [`Registry::ping_all`]).
    PingAll,
}

/// A ping a listener was asked to answer.
enum Ping<'m> {
    /// Every name registered here.
    All,
    Name(&'m str),
}

/// A subscription's messages and what reading them keeps between batches.
struct Reader {
    messages: Messages,
    listener: Listener,
    last: LastSubject,
    changes: Vec<Change>,
    events: Vec<Event>,
}

impl Reader {
    fn new(messages: Messages, listener: Listener) -> Self {
        Reader {
            messages,
            listener,
            last: LastSubject::default(),
            changes: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Takes `first` and whatever else is already waiting: the cache then
    /// publishes one snapshot per name for the whole batch.
    async fn batch(&mut self, inner: &Arc<Inner>, first: Message) {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(msg) = next {
            match inner.handle(&msg, self.listener, &mut self.last, &mut self.changes) {
                None => {}
                Some(Ping::All) => inner.on_ping_all().await,
                Some(Ping::Name(name)) => inner.on_ping(name).await,
            }
            taken += 1;
            next = if taken < MAX_BATCH {
                self.messages.next().now_or_never().flatten()
            } else {
                None
            };
        }
        if taken >= QUEUED {
            inner.release.queued(taken);
        }
        if !self.changes.is_empty() {
            let factor = inner.opts.due_factor;
            inner
                .catalog
                .apply(&mut self.changes, factor, &mut self.events);
            inner.emit(&mut self.events);
        }
    }
}

/// A cold lookup's hold on the name's reader when the lookup subscribed:
/// it reads the answer to its own ping itself, and hands the reader to a
/// listener task when it is done, however it ends. Spawning that task
/// before the ping would leave two tasks to run on the lookup's worker
/// (the listener and the connection's), and tokio then wakes another worker
/// thread, a system call on the lookup's path (about 10 µs of a cold
/// lookup's 150 µs in the seventeenth session's probes). Until the hand-over
/// the name's messages are taken in as the lookup is polled, for lookups of
/// the name waiting alongside it too, at most for the lookup's timeout; and
/// stopping the name (`close`, `observe_all`) takes effect at the hand-over.
struct Reading<'a> {
    inner: &'a Arc<Inner>,
    held: Option<Followed>,
}

/// A name's reader as [`Inner::follow_name`] made it.
struct Followed {
    reader: Reader,
    /// Stops the reader's task once it has one.
    stop: AbortRegistration,
    /// The name's entry in [`Subs`], for a reader dropped with no task to
    /// read on.
    entry: Unfollow,
}

impl Reading<'_> {
    /// Returns when `changed` fires or, if this lookup holds the reader,
    /// once it has taken in a batch of messages (or found their stream
    /// ended: the subscription is gone with the connection).
    async fn until(&mut self, changed: Pin<&mut tokio::sync::futures::Notified<'_>>) {
        let Some(held) = self.held.as_mut() else {
            return changed.await;
        };
        tokio::select! {
            biased;
            () = changed => {}
            next = held.reader.messages.next() => match next {
                Some(first) => held.reader.batch(self.inner, first).await,
                None => self.held = None,
            },
        }
    }

    /// Hands the reader, if this lookup holds it, to a listener task.
    fn hand_over(&mut self) {
        if let Some(held) = self.held.take() {
            self.inner.listen_until(held.reader, held.stop);
        }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            self.inner.listen_until(held.reader, held.stop);
        } else {
            // Dropped off the runtime, with no task to read on, and maybe
            // while another thread holds `subs`: the entry is marked
            // stopped instead of removed, so that the next lookup of the
            // name subscribes again.
            held.entry.abort();
        }
    }
}

/// The last subject a listener found well formed, with its kind and where
/// its name starts. A burst, and every heartbeat of a name, repeats one
/// subject: comparing it with this one costs less than taking it apart and
/// checking its name again.
#[derive(Default)]
struct LastSubject {
    text: String,
    kind: Option<Kind>,
    name_at: usize,
}

impl LastSubject {
    /// `subject`'s kind and name, if it is the last subject.
    fn get<'s>(&self, subject: &'s str) -> Option<(Kind, &'s str)> {
        let kind = self.kind.filter(|_| self.text == subject)?;
        Some((kind, &subject[self.name_at..]))
    }

    /// Remembers a well-formed subject and the name at its end.
    fn set(&mut self, subject: &str, kind: Kind, name: &str) {
        // Reused, so a stream of ever different subjects costs a copy each,
        // not an allocation.
        self.text.clear();
        self.text.push_str(subject);
        self.kind = Some(kind);
        self.name_at = subject.len() - name.len();
    }
}

#[derive(Default)]
struct Own {
    services: Registrations,
    pings: HashMap<String, Pinged, foldhash::fast::RandomState>,
    /// The "ping all" listener, from the first registration on.
    ping_all: Option<Unfollow>,
    /// Heartbeats by due time, one entry per registration, all sent by one
    /// task: a registration costs a heap push, not a task and a timer. An
    /// unregistered service's entry is dropped when it comes up.
    beats: DueHeap<Instant, RegId>,
    /// The last registration's number (see [`RegId`]).
    last_id: u64,
}

impl Own {
    /// Drops the heartbeat entries of services unregistered since, once
    /// they outnumber the live ones: a service registered and unregistered
    /// in a loop must not grow the heap until its entries come due.
    fn forget_stale_beats(&mut self) {
        let services = &self.services;
        if self.beats.needs_compacting(services.len()) {
            self.beats.compact(|_, b| services.by_id(*b).is_some());
        }
    }
}

/// The services registered here. The table's key is each registration's
/// own name and address, not a copy of them: registering hashes them once,
/// for the lookup, the insertion and the heartbeat's phase, and the heap
/// and the ping lists refer to a registration by its [`RegId`].
#[derive(Default)]
struct Registrations(hashbrown::HashTable<Registered>);

impl Registrations {
    /// Fixed seed: a registration's heartbeat phase comes from this hash
    /// and must not change for the process's life.
    fn hash(name: &str, address: &str) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::default().hash_one((name, address))
    }

    fn find_mut(&mut self, hash: u64, name: &str, address: &str) -> Option<&mut Registered> {
        self.0.find_mut(hash, Self::matching(name, address))
    }

    fn matching<'a>(name: &'a str, address: &'a str) -> impl Fn(&Registered) -> bool + 'a {
        move |r| r.service.address == address && r.service.name == name
    }

    fn get_mut(&mut self, name: &str, address: &str) -> Option<&mut Registered> {
        self.find_mut(Self::hash(name, address), name, address)
    }

    /// The registration `id` names, if it still stands.
    fn by_id(&self, id: RegId) -> Option<&Registered> {
        self.0.find(id.hash, |r| r.id == id)
    }

    /// Adds a registration whose name and address are not in the table.
    fn insert_new(&mut self, r: Registered) {
        self.0.insert_unique(r.id.hash, r, |r| r.id.hash);
    }

    fn remove(&mut self, name: &str, address: &str) -> Option<Registered> {
        let hash = Self::hash(name, address);
        let found = self.0.find_entry(hash, Self::matching(name, address));
        Some(found.ok()?.remove().0)
    }

    fn values(&self) -> impl Iterator<Item = &Registered> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn drain(&mut self) -> impl Iterator<Item = Registered> + '_ {
        self.0.drain()
    }
}

struct Registered {
    /// Shared with the caller's [`Registration`]: one copy per registration.
    service: Arc<Service>,
    status: Status,
    /// Where it is announced, shared by its name's registrations.
    subject: Subject,
    id: RegId,
}

/// A registration's announcement to send: where, what, and its status.
type Outgoing = (Subject, Arc<Service>, Status);

impl Registered {
    fn outgoing(&self) -> Outgoing {
        (self.subject.clone(), self.service.clone(), self.status)
    }
}

/// Names one registration, in the heartbeat heap and its name's list: the
/// hash of its name and address, to find it, and a number that tells it
/// from an earlier registration of the same name and address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RegId {
    hash: u64,
    id: u64,
}

struct Pinged {
    listener: Unfollow,
    /// The name's announcement subject, made once.
    announce: Subject,
    last_answer: Option<Instant>,
    answer_pending: bool,
    /// The services registered here under this name: a ping reads these,
    /// however many other names are registered here.
    ids: Vec<RegId>,
}

/// What this registry follows; aborting a handle stops its listener.
#[derive(Default)]
struct Subs {
    all: Option<Unfollow>,
    names: HashMap<String, Unfollow>,
}

impl Subs {
    /// Whether `name`'s messages are read. An entry whose reader was
    /// dropped unread (see [`Reading`]) is stopped and does not count.
    fn follows(&self, name: &str) -> bool {
        self.all.is_some() || self.names.get(name).is_some_and(|u| !u.is_aborted())
    }

    /// The names followed one by one.
    fn followed_names(&self) -> impl Iterator<Item = &String> {
        self.names
            .iter()
            .filter(|(_, u)| !u.is_aborted())
            .map(|(name, _)| name)
    }

    /// Stops following names one by one.
    fn unfollow_names(&mut self) {
        for (_, unfollow) in self.names.drain() {
            unfollow.abort();
        }
    }

    /// Stops following anything.
    fn unfollow_all(&mut self) {
        if let Some(all) = self.all.take() {
            all.abort();
        }
        self.unfollow_names();
    }
}

/// A registration; [`unregister`](Self::unregister) it to withdraw the
/// service. Dropping it does not unregister (the service stays until the
/// registry is closed or dropped).
#[derive(Debug)]
pub struct Registration {
    registry: Weak<Inner>,
    service: Arc<Service>,
}

impl Registration {
    /// The service as registered (with its host name filled in).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Unregisters the service. A no-op if the registry is gone.
    pub async fn unregister(self) -> Result<()> {
        match self.registry.upgrade() {
            Some(inner) => Registry { inner }.unregister(&self.service).await,
            None => Ok(()),
        }
    }
}

impl Registry {
    /// A builder with the Go package's defaults.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    fn start(transport: Arc<dyn Transport>, opts: Options) -> Registry {
        let events = event::Sender::new(opts.event_capacity);
        let release = Arc::new(Release::new(opts.release_memory));
        let inner = Arc::new(Inner {
            transport,
            opts,
            catalog: Arc::new(Catalog::new()),
            events,
            own: Mutex::default(),
            subs: tokio::sync::Mutex::default(),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            tasks: Mutex::default(),
            beat_timer: Arc::default(),
            release,
        });
        let weak = Arc::downgrade(&inner);
        let expiry = tokio::spawn(expire(inner.catalog.clone(), weak.clone()));
        let beats = tokio::spawn(heartbeats(inner.beat_timer.clone(), weak.clone()));
        let mut tasks = vec![expiry.abort_handle(), beats.abort_handle()];
        if let Some(reconnects) = inner.transport.reconnects() {
            tasks.push(tokio::spawn(follow_reconnects(reconnects, weak)).abort_handle());
        }
        *lock(&inner.tasks) = tasks;
        Registry { inner }
    }

    /// Registers a service: answers pings for its name, announces it now and
    /// every register interval. Registering the same name and address again
    /// replaces the details and keeps the status.
    ///
    /// Errors: an invalid name, an empty address, a closed registry, or the
    /// broker refusing the subscription. A broker that is away is not an
    /// error: the service is kept and announced as soon as the link is back.
    pub async fn register(&self, mut service: Service) -> Result<Registration> {
        let inner = &self.inner;
        inner.check()?;
        if service.address.is_empty() {
            return Err(Error::InvalidService {
                name: service.name.into(),
                reason: "the address is empty: an instance is identified by name and address",
            });
        }
        if service.host.is_empty() {
            service.host = inner.opts.host.as_str().into();
        }
        let service = Arc::new(service);
        // `record` checks that pings for the name are answered under the
        // lock it records under: an unregister of the name's last other
        // service in between would take the ping subscription away (then
        // subscribe again and retry).
        let (subject, status) = loop {
            if let Some(recorded) = inner.record(&mut lock(&inner.own), &service) {
                break recorded;
            }
            // Checked here, off the path of a name whose pings are answered
            // already: it passed this check before they could be.
            protocol::validate_name(&service.name)?;
            inner.answer_pings(&service.name).await?;
        };
        // Kept even if the broker is away: heartbeats and the reconnection
        // handler announce it when the link is back.
        if let Err(e) = inner.announce(subject, &service, status).await {
            tracing::warn!(error = %e, name = %service.name, "registered, not announced yet");
        }
        Ok(Registration {
            registry: Arc::downgrade(inner),
            service,
        })
    }

    /// Withdraws a service registered here: stops announcing it, stops
    /// answering pings for it (unlike the Go package, which brings it back),
    /// and tells observers it is gone.
    pub async fn unregister(&self, service: &Service) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        protocol::validate_name(&service.name)?;
        let removed = {
            let mut own = lock(&inner.own);
            let removed = own.services.remove(&service.name, &service.address);
            let last_of_name = match own.pings.get_mut(service.name.as_str()) {
                Some(p) => {
                    if let Some(r) = &removed {
                        p.ids.retain(|id| *id != r.id);
                    }
                    p.ids.is_empty()
                }
                None => false,
            };
            if removed.is_some() && last_of_name {
                if let Some(p) = own.pings.remove(service.name.as_str()) {
                    p.listener.abort();
                }
            }
            own.forget_stale_beats();
            removed
        };
        let Some(removed) = removed else {
            return Err(Error::NotRegistered {
                name: service.name.to_string(),
                address: service.address.to_string(),
            });
        };
        inner.publish_unregister(&removed.service).await?;
        inner.flush().await
    }

    /// Changes the status of a service registered here and announces it at
    /// once; observers that cache it raise `StatusChanged`.
    pub async fn set_service_status(&self, service: &Service, status: Status) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        protocol::validate_name(&service.name)?;
        let registered = {
            let mut own = lock(&inner.own);
            own.services
                .get_mut(&service.name, &service.address)
                .map(|r| {
                    r.status = status;
                    (r.subject.clone(), r.service.clone())
                })
        };
        match registered {
            Some((subject, s)) => inner.announce(subject, &s, status).await,
            None => Err(Error::NotRegistered {
                name: service.name.to_string(),
                address: service.address.to_string(),
            }),
        }
    }

    /// The services registered here, with their status.
    pub fn registered_services(&self) -> Vec<(Service, Status)> {
        let own = lock(&self.inner.own);
        let mut v: Vec<_> = own
            .services
            .values()
            .map(|r| (Service::clone(&r.service), r.status))
            .collect();
        v.sort_by(|a, b| (&a.0.name, &a.0.address).cmp(&(&b.0.name, &b.0.address)));
        v
    }

    /// One instance of `name` that passes the registry's filters: from the
    /// cache when it has one (no allocation, no lock), otherwise after
    /// observing the name and pinging it, waiting up to the timeout.
    ///
    /// The cache is read when this is called; the returned future is small
    /// and answers at once on a hit (the miss path is boxed: it waits on the
    /// network anyway).
    #[inline]
    pub fn get_service<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Future<Output = Result<Arc<Instance>>> + Send + 'a {
        self.get_service_with(name, &NO_OPTIONS)
    }

    /// [`get_service`](Self::get_service) with per-call options.
    #[inline]
    pub fn get_service_with<'a>(
        &'a self,
        name: &'a str,
        lookup: &'a Lookup,
    ) -> impl Future<Output = Result<Arc<Instance>>> + Send + 'a {
        match self.cached_service(name, &lookup.filters) {
            Some(found) => Answer::Ready(Some(Ok(found))),
            None => Answer::Waiting(Box::pin(async move {
                let chain = self.inner.chain(&lookup.filters);
                let pick = move |v: &Snapshot, turn: &AtomicUsize| chain.pick(v, turn).cloned();
                self.inner.wait_for(name, lookup, pick).await
            })),
        }
    }

    /// Every instance of `name` that passes the filters (with round-robin,
    /// the one next in turn). Unfiltered, the cache's snapshot is shared,
    /// not copied. Waits like [`get_service`](Self::get_service) on a miss.
    #[inline]
    pub fn get_services<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Future<Output = Result<Instances>> + Send + 'a {
        self.get_services_with(name, &NO_OPTIONS)
    }

    /// [`get_services`](Self::get_services) with per-call options.
    #[inline]
    pub fn get_services_with<'a>(
        &'a self,
        name: &'a str,
        lookup: &'a Lookup,
    ) -> impl Future<Output = Result<Instances>> + Send + 'a {
        let inner = &self.inner;
        let chain = inner.chain(&lookup.filters);
        let select = move |v: &Snapshot, turn: &AtomicUsize| {
            let found = chain.select(v, turn);
            (!found.is_empty()).then_some(found)
        };
        let hit = match inner.check() {
            Ok(()) => inner.catalog.read(name, select).flatten(),
            Err(_) => None,
        };
        match hit {
            Some(found) => Answer::Ready(Some(Ok(found))),
            None => Answer::Waiting(Box::pin(inner.wait_for(name, lookup, select))),
        }
    }

    /// Runs `f` on the instance the cache would answer with, borrowing it:
    /// no reference count moves, so lookups from many threads do not touch
    /// a shared cache line. `None` when the cache has no match (or the
    /// registry is closed); never waits or pings.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> pubsub_registry::Result<()> {
    /// # use pubsub_registry::{MemoryBus, Registry, Service};
    /// # let bus = MemoryBus::new();
    /// # let registry = Registry::builder().memory(&bus).build().await?;
    /// # registry.register(Service::new("api", "10.0.0.1:80")).await?;
    /// # registry.get_service("api").await?;
    /// let port = registry.with_cached_service("api", &[], |i| i.service.port());
    /// assert_eq!(port, Some(Some(80)));
    /// # Ok(())
    /// # }
    /// ```
    #[inline]
    pub fn with_cached_service<R>(
        &self,
        name: &str,
        filters: &[Filter],
        f: impl FnOnce(&Instance) -> R,
    ) -> Option<R> {
        self.pick_cached(name, filters, |i| f(i))
    }

    /// The cache's answer alone: no wait, no network, no allocation.
    /// `None` also when the registry is closed.
    #[inline]
    pub fn cached_service(&self, name: &str, filters: &[Filter]) -> Option<Arc<Instance>> {
        self.pick_cached(name, filters, Arc::clone)
    }

    /// Runs `f` on the instance the cache picks, under the snapshot's guard.
    #[inline]
    fn pick_cached<R>(
        &self,
        name: &str,
        filters: &[Filter],
        f: impl FnOnce(&Arc<Instance>) -> R,
    ) -> Option<R> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Relaxed) {
            return None;
        }
        let chain = inner.chain(filters);
        inner
            .catalog
            .read(name, |v, turn| chain.pick(v, turn).map(f))
            .flatten()
    }

    /// Follows `name` in real time: subscribes to its announcements and
    /// unregisters. Returns once the subscription is active.
    ///
    /// `"*"` means every service, as in the Go API (see
    /// [`observe_all`](Self::observe_all)).
    pub async fn observe(&self, name: &str) -> Result<()> {
        if name == "*" {
            return self.observe_all().await;
        }
        self.inner.check()?;
        protocol::validate_name(name)?;
        self.inner.observe(name).await?;
        self.inner.flush().await
    }

    /// Follows every service under the main topic, dotted names included
    /// (`*` in the Go API).
    pub async fn observe_all(&self) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        let mut subs = inner.subs.lock().await;
        if subs.all.is_some() {
            return Ok(());
        }
        let main = &inner.opts.main_topic;
        let messages = inner
            .follow(
                Topic::Pattern(protocol::all_pattern(main, Kind::Register)),
                Topic::Pattern(protocol::all_pattern(main, Kind::Unregister)),
            )
            .await?;
        subs.all = Some(inner.listen(Reader::new(messages, Listener::Observer)));
        // Per-name subscriptions would only deliver everything twice now.
        subs.unfollow_names();
        drop(subs);
        inner.flush().await
    }

    /// Asks every instance registered by a registry of this crate under the
    /// main topic to announce itself now, so an [`observe_all`](Self::observe_all)
    /// cache fills at once instead of at the next heartbeats. An extension
    /// of the protocol on its own subject, `<main>.pingall`, which the Go
    /// package and the Java port neither subscribe to nor answer: their
    /// instances show up at their next heartbeat.
    pub async fn ping_all(&self) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        let subject = protocol::ping_all_subject(&inner.opts.main_topic);
        inner
            .transport
            .publish(subject.into(), None, Bytes::new())
            .await?;
        inner.flush().await
    }

    /// Names of the services in the cache (with at least one instance).
    pub fn observed_service_names(&self) -> Vec<String> {
        self.inner.catalog.names()
    }

    /// Every instance in the cache.
    pub fn cached_instances(&self) -> Vec<Arc<Instance>> {
        self.inner.catalog.all()
    }

    /// The subjects this registry is subscribed to.
    pub async fn subscribers(&self) -> Vec<String> {
        let inner = &self.inner;
        let main = &inner.opts.main_topic;
        let mut subjects = Vec::new();
        {
            let subs = inner.subs.lock().await;
            if subs.all.is_some() {
                subjects.push(protocol::all_pattern(main, Kind::Register));
                subjects.push(protocol::all_pattern(main, Kind::Unregister));
            }
            for name in subs.followed_names() {
                subjects.push(protocol::subject(main, Kind::Register, name));
                subjects.push(protocol::subject(main, Kind::Unregister, name));
            }
        }
        let own = lock(&inner.own);
        for name in own.pings.keys() {
            subjects.push(protocol::subject(main, Kind::Ping, name));
        }
        if own.ping_all.is_some() {
            subjects.push(protocol::ping_all_subject(main));
        }
        drop(own);
        subjects.sort();
        subjects
    }

    /// Every event, as a stream.
    pub fn events(&self) -> EventStream {
        self.inner.events.subscribe(None)
    }

    /// The events of one service name, as a stream. Does not observe the
    /// name by itself: call [`observe`](Self::observe) too.
    pub fn events_for(&self, name: &str) -> EventStream {
        self.inner.events.subscribe(Some(name.to_string()))
    }

    /// Counters of what arrived from the network.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        Stats {
            received: c.received.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            filtered: c.filtered.load(Ordering::Relaxed),
            pings_answered: c.pings_answered.load(Ordering::Relaxed),
            instances: self.inner.catalog.len(),
            expiry_checks: self.inner.catalog.expiry_checks.load(Ordering::Relaxed),
            memory_releases: self.inner.release.done.load(Ordering::Relaxed),
        }
    }

    /// The host name this registry uses.
    pub fn host_name(&self) -> &str {
        &self.inner.opts.host
    }

    /// The main topic.
    pub fn main_topic(&self) -> &str {
        &self.inner.opts.main_topic
    }

    /// The transport it runs over.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed)
    }

    /// Whether two handles are the same registry.
    pub fn ptr_eq(&self, other: &Registry) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Unregisters everything registered here, drops every subscription and
    /// stops every task; later calls answer [`Error::Closed`]. Closing twice
    /// is a no-op.
    pub async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let services = inner.stop_tasks();
        inner.subs.lock().await.unfollow_all();
        let mut first_error = None;
        for s in &services {
            if let Err(e) = inner.publish_unregister(s).await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = inner.flush().await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("transport", &self.inner.transport.describe())
            .field("main_topic", &self.inner.opts.main_topic)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn check(&self) -> Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn chain<'a>(&'a self, call: &'a [Filter]) -> Chain<'a> {
        Chain {
            defaults: &self.opts.filters,
            call,
            host: &self.opts.host,
        }
    }

    /// The miss path of a lookup: observe, ping, wait for `pick` to find
    /// something, all within the deadline.
    async fn wait_for<T>(
        self: &Arc<Self>,
        name: &str,
        lookup: &Lookup,
        pick: impl Fn(&Snapshot, &AtomicUsize) -> Option<T>,
    ) -> Result<T> {
        self.check()?;
        protocol::validate_name(name)?;
        let timeout = lookup.timeout.unwrap_or(self.opts.timeout);
        let not_found = || Error::NotFound {
            name: name.to_string(),
            waited: if lookup.no_wait {
                Duration::ZERO
            } else {
                timeout
            },
        };
        if lookup.no_wait {
            return self
                .catalog
                .read(name, &pick)
                .flatten()
                .ok_or_else(not_found);
        }
        let search = async {
            let mut reading = Reading {
                inner: self,
                held: self.follow_name(name).await?,
            };
            if tokio::task::try_id().is_none() {
                // Not in a task (a `block_on`): a spawn from here always
                // wakes a worker thread, and now it overlaps with the one
                // the subscription woke.
                reading.hand_over();
            }
            let entry = self.catalog.ensure(name);
            let mut changed = pin!(entry.changed.notified());
            changed.as_mut().enable();
            if let Some(found) = pick(&entry.instances.load(), &entry.turn) {
                return Ok(found);
            }
            self.ping(name).await?;
            loop {
                reading.until(changed.as_mut()).await;
                changed.set(entry.changed.notified());
                changed.as_mut().enable();
                if let Some(found) = pick(&entry.instances.load(), &entry.turn) {
                    return Ok(found);
                }
            }
        };
        match tokio::time::timeout(timeout, search).await {
            Ok(found) => found,
            Err(_) => Err(not_found()),
        }
    }

    /// Subscribes to a name's messages, read by a task of their own.
    async fn observe(self: &Arc<Self>, name: &str) -> Result<()> {
        if let Some(held) = self.follow_name(name).await? {
            self.listen_until(held.reader, held.stop);
        }
        Ok(())
    }

    /// Subscribes to a name's messages unless they are followed already,
    /// and returns their reader and what stops it. Does not wait for the
    /// broker to take the subscription: a lookup's ping follows on the same
    /// connection, so the broker has the subscription before any answer.
    async fn follow_name(self: &Arc<Self>, name: &str) -> Result<Option<Followed>> {
        let mut subs = self.subs.lock().await;
        if subs.follows(name) {
            return Ok(None);
        }
        let main = &self.opts.main_topic;
        let messages = self
            .follow(
                Topic::Subject(protocol::subject(main, Kind::Register, name)),
                Topic::Subject(protocol::subject(main, Kind::Unregister, name)),
            )
            .await?;
        let (unfollow, stop) = Unfollow::new_pair();
        subs.names.insert(name.to_string(), unfollow.clone());
        self.catalog.ensure(name);
        Ok(Some(Followed {
            reader: Reader::new(messages, Listener::Observer),
            stop,
            entry: unfollow,
        }))
    }

    /// Subscribes to pings for `name` if nothing registered here answers
    /// them yet, and waits until the broker has the subscription: a peer
    /// may ping as soon as it hears the announcement.
    async fn answer_pings(self: &Arc<Self>, name: &str) -> Result<()> {
        let serial = self.subs.lock().await;
        if lock(&self.own).ping_all.is_none() {
            let subject = protocol::ping_all_subject(&self.opts.main_topic);
            let messages = self.subscribe(Topic::Subject(subject)).await?;
            lock(&self.own).ping_all = Some(self.listen(Reader::new(messages, Listener::PingAll)));
        }
        if lock(&self.own).pings.contains_key(name) {
            return Ok(());
        }
        let subject = protocol::subject(&self.opts.main_topic, Kind::Ping, name);
        let messages = self.subscribe(Topic::Subject(subject)).await?;
        let listener = self.listen(Reader::new(messages, Listener::Pinged));
        let announce = protocol::subject(&self.opts.main_topic, Kind::Register, name).into();
        lock(&self.own).pings.insert(
            name.to_string(),
            Pinged {
                listener,
                announce,
                last_answer: None,
                answer_pending: false,
                ids: Vec::new(),
            },
        );
        drop(serial);
        // A broker that is away gets the subscription on reconnection; the
        // registration stands either way.
        if let Err(e) = self.flush().await {
            tracing::debug!(error = %e, name, "ping subscription not confirmed yet");
        }
        Ok(())
    }

    async fn subscribe(&self, topic: Topic) -> Result<Messages> {
        self.transport.subscribe(topic).await
    }

    /// Announcements and unregisters, as one stream. Two subscriptions lose
    /// their relative order, so when both have messages waiting the
    /// announcements go first: a last heartbeat followed by an unregister
    /// must never leave a ghost instance behind. (The rare reverse, an
    /// unregister and an immediate re-register of the same address, leaves
    /// the instance out until its next announcement or a lookup's ping.) A
    /// single `<main>.*.<name>` subscription would keep the order but also
    /// deliver every ping to every observer: a ping storm would cost the
    /// broker observers x pings messages.
    async fn follow(&self, announcements: Topic, unregisters: Topic) -> Result<Messages> {
        let announcements = self.subscribe(announcements).await?;
        let unregisters = self.subscribe(unregisters).await?;
        let merged =
            futures_util::stream::select_with_strategy(announcements, unregisters, |_: &mut ()| {
                futures_util::stream::PollNext::Left
            });
        Ok(merged.boxed())
    }

    /// Spawns the task that reads a subscription until it ends or the
    /// returned handle stops it.
    fn listen(self: &Arc<Self>, reader: Reader) -> Unfollow {
        let (unfollow, stop) = Unfollow::new_pair();
        self.listen_until(reader, stop);
        unfollow
    }

    /// [`listen`](Self::listen) with the handle made beforehand. The task
    /// checks it each time it wakes, not for every message of a burst.
    fn listen_until(self: &Arc<Self>, mut reader: Reader, stop: AbortRegistration) {
        let weak = Arc::downgrade(self);
        let reading = async move {
            while let Some(first) = reader.messages.next().await {
                let Some(inner) = weak.upgrade() else { return };
                reader.batch(&inner, first).await;
            }
        };
        tokio::spawn(Abortable::new(reading, stop));
    }

    /// Checks a message; what it asks of the cache goes to `changes`, and a
    /// ping to answer is returned. (Not async: a message moved into an
    /// `async fn`'s state is a copy, on every message of a burst.)
    fn handle<'m>(
        &self,
        msg: &'m Message,
        listener: Listener,
        last: &mut LastSubject,
        changes: &mut Vec<Change>,
    ) -> Option<Ping<'m>> {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let (kind, name) = match last.get(&msg.subject) {
            Some(known) => known,
            None => {
                let main = &self.opts.main_topic;
                if protocol::is_ping_all(main, &msg.subject) {
                    // An observer's `<main>.>` sees it too: not a malformed
                    // message.
                    return matches!(listener, Listener::PingAll).then_some(Ping::All);
                }
                let Some((kind, name)) = protocol::parse_subject(main, &msg.subject) else {
                    self.reject(&msg.subject, &"subject outside the main topic");
                    return None;
                };
                if let Err(e) = protocol::validate_name(name) {
                    self.reject(&msg.subject, &e);
                    return None;
                }
                last.set(&msg.subject, kind, name);
                (kind, name)
            }
        };
        match (kind, listener) {
            (Kind::Register, Listener::Observer) => {
                self.on_announcement(name, &msg.payload, changes)
            }
            (Kind::Unregister, Listener::Observer) => {
                self.on_unregister(name, &msg.payload, changes)
            }
            // Pings are empty (PROTOCOL.md); anything else is not a ping.
            (Kind::Ping, Listener::Pinged) if !msg.payload.is_empty() => {
                self.reject(&msg.subject, &"a ping with a payload")
            }
            (Kind::Ping, Listener::Pinged) => return Some(Ping::Name(name)),
            // An observer's pattern also sees pings; they are not its business.
            _ => {}
        }
        None
    }

    fn on_announcement(&self, name: &str, payload: &[u8], changes: &mut Vec<Change>) {
        let Some(change) = self.decode_change(name, payload, changes) else {
            return;
        };
        if !self.accepts(&change.what.service) {
            changes.pop();
            return;
        }
        let interval = change.what.interval();
        change.kind = ChangeKind::Announce {
            interval: interval.unwrap_or(self.opts.register_interval),
        };
    }

    fn on_unregister(&self, name: &str, payload: &[u8], changes: &mut Vec<Change>) {
        // A change is a removal until made an announcement.
        self.decode_change(name, payload, changes);
    }

    /// Decodes a payload into a new change at the end of `changes`; a
    /// payload that does not decode is rejected and leaves no change.
    fn decode_change<'c>(
        &self,
        name: &str,
        payload: &[u8],
        changes: &'c mut Vec<Change>,
    ) -> Option<&'c mut Change> {
        let change = Change::push(changes);
        match protocol::decode_into(payload, name, &mut change.what) {
            Ok(()) => changes.last_mut(),
            Err(e) => {
                changes.pop();
                self.reject(name, &e);
                None
            }
        }
    }

    /// Answers a ping at most once per window per name; a ping inside the
    /// window gets one answer at its end, so a pinger that subscribed after
    /// the last answer is still served.
    async fn on_ping(self: &Arc<Self>, name: &str) {
        let now = Instant::now();
        let window = self.opts.ping_window;
        let later = {
            let mut own = lock(&self.own);
            let Some(p) = own.pings.get_mut(name) else {
                return;
            };
            match p.last_answer {
                Some(last) if now < last + window => {
                    if p.answer_pending {
                        return;
                    }
                    p.answer_pending = true;
                    Some(last + window)
                }
                _ => {
                    p.last_answer = Some(now);
                    None
                }
            }
        };
        match later {
            None => self.answer(name).await,
            Some(at) => {
                let weak = Arc::downgrade(self);
                let name = name.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Some(p) = lock(&inner.own).pings.get_mut(&name) {
                        p.answer_pending = false;
                        p.last_answer = Some(Instant::now());
                    }
                    inner.answer(&name).await;
                });
            }
        }
    }

    /// A ping of every name registered here, each coalesced as its own
    /// pings are.
    async fn on_ping_all(self: &Arc<Self>) {
        let names: Vec<String> = lock(&self.own).pings.keys().cloned().collect();
        for name in names {
            self.on_ping(&name).await;
        }
    }

    /// Announces every instance of `name` registered here.
    async fn answer(&self, name: &str) {
        self.counters.pings_answered.fetch_add(1, Ordering::Relaxed);
        let services: Vec<Outgoing> = {
            let own = lock(&self.own);
            let ids = own.pings.get(name).map_or(&[][..], |p| &p.ids[..]);
            ids.iter()
                .filter_map(|id| own.services.by_id(*id))
                .map(Registered::outgoing)
                .collect()
        };
        for (subject, service, status) in services {
            if let Err(e) = self.announce(subject, &service, status).await {
                tracing::warn!(error = %e, name, "cannot answer ping");
            }
        }
    }

    fn registered(&self, keep: impl Fn(&str) -> bool) -> Vec<Outgoing> {
        lock(&self.own)
            .services
            .values()
            .filter(|r| keep(&r.service.name))
            .map(Registered::outgoing)
            .collect()
    }

    fn accepts(&self, s: &Service) -> bool {
        let host = &self.opts.host;
        let ok = self.opts.observe_filters.iter().all(|f| f.accepts(s, host));
        if !ok {
            self.counters.filtered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Counts a rejected message and warns, at most once a second.
    fn reject(&self, what: &str, why: &dyn fmt::Display) {
        let total = self.counters.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.counters.last_warning.load(Ordering::Relaxed);
        if now > last
            && self
                .counters
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let what: String = what.chars().take(80).collect();
            tracing::warn!(%why, subject = %what, rejected_total = total, "rejected a message");
        }
    }

    /// Hands `events` to the callback and the streams, leaving it empty.
    fn emit(&self, events: &mut Vec<Event>) {
        if let Some(f) = &self.opts.on_event {
            for event in events.iter() {
                // A panicking callback must not take the subscription down.
                if std::panic::catch_unwind(AssertUnwindSafe(|| f(event))).is_err() {
                    tracing::error!("the on_event callback panicked");
                }
            }
        }
        self.events.send_all(events);
    }

    /// Keeps a registration: its details, status and heartbeat schedule.
    /// Registering the same name and address again replaces the details
    /// and keeps the status and the schedule.
    /// Returns where to announce it and the status; `None`, recording
    /// nothing, while pings for its name are not answered here yet.
    fn record(&self, own: &mut Own, service: &Arc<Service>) -> Option<(Subject, Status)> {
        own.ping_all.as_ref()?;
        let pinged = own.pings.get_mut(service.name.as_str())?;
        let hash = Registrations::hash(&service.name, &service.address);
        if let Some(r) = own.services.find_mut(hash, &service.name, &service.address) {
            r.service = service.clone();
            return Some((r.subject.clone(), r.status));
        }
        own.last_id += 1;
        let id = RegId {
            hash,
            id: own.last_id,
        };
        let at = Instant::now() + phase(hash, self.opts.register_interval);
        if own.beats.push(at, id) {
            self.beat_timer.notify_one();
        }
        pinged.ids.push(id);
        let subject = pinged.announce.clone();
        own.services.insert_new(Registered {
            service: service.clone(),
            status: Status::Passing,
            subject: subject.clone(),
            id,
        });
        Some((subject, Status::Passing))
    }

    /// The registrations whose heartbeat is due by `now`, each scheduled
    /// again one interval on (from now if it is late: no catch-up bursts);
    /// and when the next one is due.
    fn due_heartbeats(&self, now: Instant) -> (Vec<Outgoing>, Option<Instant>) {
        let interval = self.opts.register_interval;
        let mut own = lock(&self.own);
        let own = &mut *own;
        let mut due = Vec::new();
        while let Some((was, beat)) = own.beats.pop_due(now) {
            // Gone if unregistered since, or if the entry is an earlier
            // registration's.
            let Some(r) = own.services.by_id(beat) else {
                continue;
            };
            due.push(r.outgoing());
            let on_time = was + interval;
            let at = if on_time > now {
                on_time
            } else {
                now + interval
            };
            own.beats.push(at, beat);
        }
        (due, own.beats.arm(None))
    }

    async fn ping(&self, name: &str) -> Result<()> {
        let main = &self.opts.main_topic;
        // Go ignores the reply subject; the Java port answers on it.
        let reply = protocol::subject(main, Kind::Register, name);
        self.transport
            .publish(
                protocol::subject(main, Kind::Ping, name).into(),
                Some(reply.into()),
                Bytes::new(),
            )
            .await
    }

    async fn announce(&self, subject: Subject, service: &Service, status: Status) -> Result<()> {
        let payload = protocol::encode_announcement(
            service,
            status,
            SystemTime::now(),
            self.opts.register_interval,
        );
        self.transport.publish(subject, None, payload.into()).await
    }

    async fn publish_unregister(&self, service: &Service) -> Result<()> {
        unregister(&*self.transport, &self.opts.main_topic, service).await
    }

    async fn flush(&self) -> Result<()> {
        self.transport.flush().await
    }

    /// After a reconnection: announce everything at once and ping every
    /// observed name, so caches on both sides are whole again without
    /// waiting for heartbeats.
    async fn recover(&self) {
        for (subject, service, status) in self.registered(|_| true) {
            if let Err(e) = self.announce(subject, &service, status).await {
                tracing::warn!(error = %e, "cannot announce after reconnecting");
            }
        }
        // Peers that reconnected at the same moment may have announced
        // before our subscriptions were back: ask every name we follow or
        // hold to announce again (Go and Java peers answer per-name pings),
        // and, when following everything, every instance of this crate.
        let (mut names, all) = {
            let subs = self.subs.lock().await;
            let names: Vec<String> = subs.followed_names().cloned().collect();
            (names, subs.all.is_some())
        };
        names.extend(self.catalog.names());
        names.sort();
        names.dedup();
        for name in names {
            let _ = self.ping(&name).await;
        }
        if all {
            let subject = protocol::ping_all_subject(&self.opts.main_topic);
            let _ = self
                .transport
                .publish(subject.into(), None, Bytes::new())
                .await;
        }
        let _ = self.flush().await;
    }

    /// Stops every task; returns the services that were registered.
    fn stop_tasks(&self) -> Vec<Arc<Service>> {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let mut own = lock(&self.own);
        for (_, p) in own.pings.drain() {
            p.listener.abort();
        }
        if let Some(listener) = own.ping_all.take() {
            listener.abort();
        }
        own.beats.clear();
        own.services.drain().map(|r| r.service).collect()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let services = self.stop_tasks();
        if let Ok(mut subs) = self.subs.try_lock() {
            subs.unfollow_all();
        }
        if self.closed.load(Ordering::SeqCst) || services.is_empty() {
            return;
        }
        // The last handle went away without close(): unregister in the
        // background if a runtime is still there to do it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let transport = self.transport.clone();
        let main = self.opts.main_topic.clone();
        runtime.spawn(async move {
            for s in &services {
                let _ = unregister(&*transport, &main, s).await;
            }
            let _ = transport.flush().await;
        });
    }
}

/// Tells observers that `service` is gone.
async fn unregister(transport: &dyn Transport, main: &str, service: &Service) -> Result<()> {
    let subject = protocol::subject(main, Kind::Unregister, &service.name);
    let payload = protocol::encode_unregister(service);
    transport
        .publish(subject.into(), None, payload.into())
        .await
}

/// Where in the interval a registration heartbeats: hashed from its name
/// and address, so services registered together (10,000 at start-up) spread
/// their heartbeats over the interval instead of sending them in one burst.
fn phase(hash: u64, interval: Duration) -> Duration {
    // In whole thousandths, without floating point (`mul_f64` costs as
    // much as a tenth of the rest of `register()`).
    let thousandths = (hash % 1000 + 1) as u32;
    interval / 1000 * thousandths
}

/// Sends every registration's heartbeat when it comes due.
async fn heartbeats(timer: Arc<Notify>, inner: Weak<Inner>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let (due, next) = inner.due_heartbeats(Instant::now());
            for (subject, service, status) in due {
                if let Err(e) = inner.announce(subject, &service, status).await {
                    tracing::warn!(error = %e, name = %service.name, "heartbeat not sent");
                }
            }
            next
        };
        due::wait(next, &timer).await;
    }
}

async fn expire(catalog: Arc<Catalog>, inner: Weak<Inner>) {
    loop {
        let (mut events, next) = catalog.expire(Instant::now());
        if !events.is_empty() {
            let Some(inner) = inner.upgrade() else { return };
            inner.emit(&mut events);
        }
        due::wait(Some(next), &catalog.timer).await;
    }
}

async fn follow_reconnects(mut reconnects: tokio::sync::watch::Receiver<u64>, inner: Weak<Inner>) {
    reconnects.borrow_and_update();
    while reconnects.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else { return };
        tracing::info!(transport = %inner.transport.describe(), "reconnected: announcing again");
        inner.recover().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves the guarded state half-changed across a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until the bus has `n` subscriptions, for at most 10 s.
    async fn subscriptions_become(bus: &MemoryBus, n: usize, when: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while bus.subscriptions() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{when}: {} subscriptions, not {n}",
                bus.subscriptions()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A name followed by a lookup (which handed its reader over) or by
    /// `observe` stops being read, and its subscriptions go, when the
    /// registry closes and when `observe_all` takes over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_names_give_up_their_subscriptions() {
        let bus = MemoryBus::new();
        let a = Registry::builder().memory(&bus).build().await.unwrap();
        a.register(Service::new("held", "10.0.0.1:1"))
            .await
            .unwrap();
        // a answers pings for the name, and pings of everything.
        subscriptions_become(&bus, 2, "a registered").await;
        for all in [false, true] {
            let b = Registry::builder().memory(&bus).build().await.unwrap();
            let looking = b.clone();
            tokio::spawn(async move { looking.get_service("held").await })
                .await
                .unwrap()
                .unwrap();
            b.observe("watched").await.unwrap();
            subscriptions_become(&bus, 6, "b follows two names").await;
            if all {
                b.observe_all().await.unwrap();
                subscriptions_become(&bus, 4, "b follows everything instead").await;
            }
            b.close().await.unwrap();
            subscriptions_become(&bus, 2, "b closed").await;
        }
    }

    /// A lookup dropped outside any runtime, while another thread holds
    /// the subscription lock, has no task to hand its reader to and cannot
    /// take the name out of `subs`: the name must still not stay marked as
    /// followed, or no later lookup would read it.
    #[test]
    fn a_lookup_dropped_off_the_runtime_leaves_its_name_to_the_next() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let bus = MemoryBus::new();
        let b = rt
            .block_on(
                Registry::builder()
                    .memory(&bus)
                    .timeout(Duration::from_secs(10))
                    .build(),
            )
            .unwrap();
        // Polled once in a task, where it keeps the name's reader while it
        // waits for an answer; then brought out here.
        let looking = b.clone();
        let probe = bus.clone();
        #[allow(
            clippy::async_yields_async,
            reason = "the lookup leaves its task unfinished on purpose"
        )]
        let task = rt.spawn(async move {
            let mut lookup = Box::pin(async move { looking.get_service("late").await });
            assert!(lookup.as_mut().now_or_never().is_none());
            assert_eq!(probe.subscriptions(), 2, "the lookup follows the name");
            lookup
        });
        let lookup = rt.block_on(task).unwrap();
        assert!(tokio::runtime::Handle::try_current().is_err());
        let held = b.inner.subs.try_lock().unwrap();
        drop(lookup);
        drop(held);
        rt.block_on(async {
            subscriptions_become(&bus, 0, "the dropped lookup's reader is gone").await;
            assert_eq!(b.subscribers().await, Vec::<String>::new());
            let a = Registry::builder().memory(&bus).build().await.unwrap();
            a.register(Service::new("late", "10.0.0.1:1"))
                .await
                .unwrap();
            let looking = b.clone();
            let found = tokio::spawn(async move { looking.get_service("late").await })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(found.address(), "10.0.0.1:1");
            // Followed again: a later announcement reaches the cache.
            a.register(Service::new("late", "10.0.0.2:1"))
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while b.cached_instances().len() != 2 {
                assert!(std::time::Instant::now() < deadline, "not followed again");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    #[tokio::test]
    async fn churn_does_not_grow_the_heartbeat_heap() {
        let bus = MemoryBus::new();
        let registry = Registry::builder().memory(&bus).build().await.unwrap();
        let kept = Service::new("churn", "kept:1");
        registry.register(kept.clone()).await.unwrap();
        for i in 0..5000 {
            let s = Service::new("churn", format!("10.0.{}.{}:1", i / 256, i % 256));
            registry.register(s.clone()).await.unwrap();
            registry.unregister(&s).await.unwrap();
        }
        let mut own = lock(&registry.inner.own);
        assert!(
            own.beats.len() <= 2 * own.services.len() + 1024 + 1,
            "{}",
            own.beats.len()
        );
        // The live registration kept its entry.
        let live = own.services.get_mut(&kept.name, &kept.address).unwrap().id;
        assert!(own.beats.items().any(|b| *b == live));
    }
}
