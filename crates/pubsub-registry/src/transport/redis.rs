//! Redis pub/sub, over the `redis` crate (redis-rs) on tokio.
//!
//! Channels are the NATS subjects verbatim (`registry.register.<name>`, ...)
//! and payloads the same JSON, so this transport talks to the Go package's
//! Redis transport.
//!
//! Two connections per transport, whatever the number of subscriptions: one
//! multiplexed connection that publishes, and one pub/sub connection owned by
//! a background task. That task routes every message to the subscriptions it
//! belongs to, in the order Redis sent it, and when the link is lost it
//! reconnects with exponential backoff, subscribes every channel and pattern
//! again and bumps the [`reconnects`](Transport::reconnects) counter, so the
//! registry announces itself and pings what it observes at once: Redis keeps
//! nothing for a subscriber that was away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{Message, Messages, Subject, Topic, Transport};
use crate::error::{Error, Result};

/// Messages a subscriber may fall behind by before new ones are dropped for
/// it, as a NATS server drops them for a slow consumer.
const BUFFER: usize = 1 << 16;
/// Longest wait for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for Redis to answer a command; past it the link is deemed
/// lost, so no call hangs on a server that stopped answering.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// First wait between reconnection attempts; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest wait between reconnection attempts, which bounds how long after
/// Redis returns the registry is whole again.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the pub/sub connection is pinged. A killed server closes the
/// socket and is noticed at once; this catches a link that died silently.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Channels or patterns per (P)SUBSCRIBE when subscribing everything again.
const RESUBSCRIBE_BATCH: usize = 512;

/// A registry transport over Redis pub/sub.
///
/// A registry on Redis uses **two Redis connections, whatever the number of
/// names it observes or registers**: one publishes (PUBLISH for
/// announcements, unregisters and pings), the other carries every
/// subscription (SUBSCRIBE per exact channel, PSUBSCRIBE per pattern).
/// Subscriptions to the same channel or pattern share one (P)SUBSCRIBE.
///
/// Redis has no reply subjects: the reply subject given to
/// [`publish`](Transport::publish) is dropped and messages arrive without
/// one. Pings are answered on the register channel anyway, as the Go
/// package does.
///
/// While Redis is away, [`publish`](Transport::publish) and
/// [`flush`](Transport::flush) fail at once with [`Error::Transport`],
/// [`subscribe`](Transport::subscribe) records the subscription and returns,
/// and a background task reconnects (backoff from 50 ms to 1 s) and
/// subscribes everything again before reporting the reconnection.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use pubsub_registry::Registry;
///
/// let registry = Registry::builder()
///     .redis_url("redis://:secret@127.0.0.1:6379")
///     .build()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// The URL without its password, for logs and errors.
    url: String,
    commands: mpsc::UnboundedSender<Command>,
    publisher: Arc<Publisher>,
    reconnects: watch::Receiver<u64>,
    dropped: Arc<AtomicU64>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Subscription guards keep the command channel open, so the task is
        // told explicitly that no transport handle is left.
        let _ = self.commands.send(Command::Shutdown);
    }
}

/// The publishing connection of the current link, tagged with the link's
/// generation so that a failure seen on an old link cannot tear down a new
/// one.
#[derive(Default)]
struct Publisher {
    slot: Mutex<Option<(u64, MultiplexedConnection)>>,
}

impl Publisher {
    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.lock().clone()
    }

    fn set(&self, generation: u64, connection: MultiplexedConnection) {
        *self.lock() = Some((generation, connection));
    }

    fn clear(&self) {
        *self.lock() = None;
    }

    /// Forgets the connection if it is still the one of `generation`.
    fn clear_if(&self, generation: u64) {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        // The slot is replaced whole: a panic cannot leave it half-written.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a publish or flush was refused without trying.
#[derive(Debug, thiserror::Error)]
#[error("not connected to {0}: reconnecting")]
struct Disconnected(String);

/// What the connection task is asked to do.
enum Command {
    Subscribe {
        topic: Topic,
        tx: mpsc::Sender<Message>,
        done: oneshot::Sender<Result<u64>>,
    },
    Unsubscribe(u64),
    /// Publishing failed on the link of this generation: replace it.
    Reset(u64),
    Shutdown,
}

impl RedisTransport {
    /// Connects to `url`: `redis://[user][:password@]host[:port][/db]`,
    /// `rediss://...` for TLS (rustls, the system's root certificates), or
    /// `redis+unix:///path`.
    ///
    /// Fails with [`Error::Connect`] if the URL is invalid or Redis cannot
    /// be reached now; once connected, losses are repaired in the background.
    pub async fn connect(url: &str) -> Result<Self> {
        let shown = redact(url);
        let client = Client::open(url).map_err(|e| Error::Connect {
            url: shown.clone(),
            source: Box::new(e),
        })?;
        Self::start(client, shown).await
    }

    /// Runs over a client the caller already has (with its own TLS
    /// certificates, credentials, database, protocol). A `redis::Client`
    /// holds no connection: this opens the transport's two connections
    /// from it.
    pub async fn from_client(client: Client) -> Result<Self> {
        let shown = describe_client(&client);
        Self::start(client, shown).await
    }

    async fn start(client: Client, url: String) -> Result<Self> {
        let link = open(&client).await.map_err(|e| Error::Connect {
            url: url.clone(),
            source: Box::new(e),
        })?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (reconnected, reconnects) = watch::channel(0u64);
        let publisher = Arc::new(Publisher::default());
        let dropped = Arc::new(AtomicU64::new(0));
        let generation = 1;
        publisher.set(generation, link.publisher.clone());
        let task = Task {
            client: client.clone(),
            url: url.clone(),
            commands: rx,
            publisher: publisher.clone(),
            reconnected,
            dropped: dropped.clone(),
            subs: Subs::default(),
            generation,
        };
        tokio::spawn(task.run(link));
        Ok(RedisTransport {
            shared: Arc::new(Shared {
                client,
                url,
                commands,
                publisher,
                reconnects,
                dropped,
            }),
        })
    }

    /// The client the connections are opened from.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Whether the link to Redis is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared.publisher.current().is_some()
    }

    /// Messages dropped because a subscriber was 65 536 messages behind, as
    /// a NATS server drops them for a slow consumer.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Runs one command on the publishing connection, bounded in time. A
    /// failure of the link (not a refusal by the server) hands the link to
    /// the connection task for replacement.
    async fn command(&self, op: &'static str, cmd: redis::Cmd) -> Result<()> {
        let shared = &self.shared;
        let Some((generation, mut connection)) = shared.publisher.current() else {
            return Err(Error::transport(op, Disconnected(shared.url.clone())));
        };
        let failure: crate::error::BoxError =
            match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<Value>(&mut connection))
                .await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if !broken(&e) => return Err(Error::transport(op, e)),
                Ok(Err(e)) => Box::new(e),
                Err(_) => {
                    format!("no answer from {} within {COMMAND_TIMEOUT:?}", shared.url).into()
                }
            };
        shared.publisher.clear_if(generation);
        let _ = shared.commands.send(Command::Reset(generation));
        Err(Error::Transport {
            op,
            source: failure,
        })
    }
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.shared.url)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Transport for RedisTransport {
    fn publish(
        &self,
        subject: Subject,
        _reply: Option<Subject>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<()>> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(subject.as_str()).arg(payload.as_ref());
        Box::pin(self.command("publish", cmd))
    }

    fn subscribe(&self, topic: Topic) -> BoxFuture<'_, Result<Messages>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(BUFFER);
            let (done, answer) = oneshot::channel();
            let closed = || Error::transport("subscribe", "the redis connection task has stopped");
            self.shared
                .commands
                .send(Command::Subscribe { topic, tx, done })
                .map_err(|_| closed())?;
            let id = answer.await.map_err(|_| closed())??;
            let guard = Unsubscribe {
                commands: self.shared.commands.clone(),
                id,
            };
            let stream = ReceiverStream::new(rx).map(move |m| {
                let _ = &guard;
                m
            });
            Ok(stream.boxed())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        // Every PUBLISH already waited for Redis's answer: a PING round trip
        // only tells whether the link is up.
        Box::pin(self.command("flush", redis::cmd("PING")))
    }

    fn reconnects(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.reconnects.clone())
    }

    fn describe(&self) -> String {
        self.shared.url.clone()
    }
}

/// Unsubscribes when the subscription's stream is dropped.
struct Unsubscribe {
    commands: mpsc::UnboundedSender<Command>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe(self.id));
    }
}

/// The two connections of one link.
struct Link {
    publisher: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
}

async fn open(client: &Client) -> RedisResult<Link> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let publisher = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connecting"))??;
    let (sink, stream) = pubsub.split();
    Ok(Link {
        publisher,
        sink,
        stream,
    })
}

/// Runs a pub/sub command, bounded in time.
async fn bounded<T>(
    what: &str,
    command: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(COMMAND_TIMEOUT, command)
        .await
        .map_err(|_| timed_out(what))?
}

fn timed_out(what: &str) -> RedisError {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer within {COMMAND_TIMEOUT:?}"),
    )
    .into()
}

/// Whether an error means the connection is unusable, as opposed to Redis
/// answering with a refusal (ACL, wrong type, ...) on a working link.
fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

/// Where a subscription lives on Redis: an exact channel (SUBSCRIBE) or a
/// glob (PSUBSCRIBE).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Channel(String),
    Pattern(String),
}

impl Key {
    fn of(topic: &Topic) -> Key {
        match topic {
            Topic::Subject(s) => Key::Channel(s.clone()),
            Topic::Pattern(p) => Key::Pattern(glob(p)),
        }
    }
}

/// The Redis glob that covers a NATS-style pattern: `*` and `>` tokens
/// become `*`, glob metacharacters elsewhere are escaped. A glob `*` also
/// spans dots, so the glob is wider than the pattern; what it lets through
/// is filtered with [`Topic::matches`].
fn glob(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 4);
    for (i, token) in pattern.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if token == "*" || token == ">" {
            out.push('*');
            continue;
        }
        for c in token.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// One subscriber of a channel or pattern.
struct Member {
    id: u64,
    topic: Topic,
    tx: mpsc::Sender<Message>,
}

/// Every subscription, by what it is subscribed to on Redis.
#[derive(Default)]
struct Subs {
    channels: HashMap<String, Vec<Member>>,
    patterns: HashMap<String, Vec<Member>>,
    keys: HashMap<u64, Key>,
    next_id: u64,
}

impl Subs {
    fn group(&mut self, key: &Key) -> Option<&mut Vec<Member>> {
        match key {
            Key::Channel(c) => self.channels.get_mut(c),
            Key::Pattern(p) => self.patterns.get_mut(p),
        }
    }

    /// Adds a subscriber; also returns whether Redis must be told (the first
    /// subscriber of its channel or pattern).
    fn add(&mut self, topic: Topic, tx: mpsc::Sender<Message>) -> (u64, Key, bool) {
        self.next_id += 1;
        let id = self.next_id;
        let key = Key::of(&topic);
        let group = match &key {
            Key::Channel(c) => self.channels.entry(c.clone()).or_default(),
            Key::Pattern(p) => self.patterns.entry(p.clone()).or_default(),
        };
        let first = group.is_empty();
        group.push(Member { id, topic, tx });
        self.keys.insert(id, key.clone());
        (id, key, first)
    }

    /// Removes a subscriber; returns its channel or pattern if it was the
    /// last one there, for Redis to be told.
    fn remove(&mut self, id: u64) -> Option<Key> {
        let key = self.keys.remove(&id)?;
        let group = self.group(&key)?;
        group.retain(|m| m.id != id);
        if !group.is_empty() {
            return None;
        }
        match &key {
            Key::Channel(c) => self.channels.remove(c),
            Key::Pattern(p) => self.patterns.remove(p),
        };
        Some(key)
    }

    fn dispatch(&self, msg: &redis::Msg, dropped: &AtomicU64) {
        let subject = msg.get_channel_name();
        // A message that matches a channel and a pattern arrives twice, once
        // per subscription kind: each copy goes to its own subscribers only.
        let members = if msg.from_pattern() {
            let pattern = msg.get_pattern::<String>().ok();
            pattern.and_then(|p| self.patterns.get(&p))
        } else {
            self.channels.get(subject)
        };
        let Some(members) = members else { return };
        let message = Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::copy_from_slice(msg.get_payload_bytes()),
        };
        for m in members {
            if !m.topic.matches(subject) {
                continue;
            }
            if let Err(mpsc::error::TrySendError::Full(_)) = m.tx.try_send(message.clone()) {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Why serving a link stopped.
enum Exit {
    Lost(String),
    Shutdown,
}

/// The task that owns the pub/sub connection and every subscription.
struct Task {
    client: Client,
    url: String,
    commands: mpsc::UnboundedReceiver<Command>,
    publisher: Arc<Publisher>,
    reconnected: watch::Sender<u64>,
    dropped: Arc<AtomicU64>,
    subs: Subs,
    generation: u64,
}

impl Task {
    async fn run(mut self, mut link: Link) {
        loop {
            match self.serve(&mut link).await {
                Exit::Shutdown => return,
                Exit::Lost(why) => {
                    tracing::warn!(url = %self.url, %why, "redis link lost: reconnecting")
                }
            }
            // Fail publishes fast from now on instead of queueing them on a
            // dead connection.
            self.publisher.clear();
            self.drain(&mut link);
            drop(link);
            link = match self.reconnect().await {
                Some(link) => link,
                None => return,
            };
            self.generation += 1;
            self.publisher.set(self.generation, link.publisher.clone());
            // Only now: what the registry sends on this signal must find the
            // subscriptions in place and a working publisher.
            self.reconnected.send_modify(|n| *n += 1);
            tracing::info!(url = %self.url, "redis link back");
        }
    }

    /// Routes messages and carries out commands until the link fails or no
    /// transport handle is left.
    async fn serve(&mut self, link: &mut Link) -> Exit {
        let start = tokio::time::Instant::now() + HEALTH_INTERVAL;
        let mut health = tokio::time::interval_at(start, HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = link.stream.next() => match msg {
                    Some(msg) => self.subs.dispatch(&msg, &self.dropped),
                    None => return Exit::Lost("the server closed the connection".into()),
                },
                command = self.commands.recv() => {
                    // What Redis sent before this command goes to the
                    // subscribers there were then, not to one added now.
                    self.drain(link);
                    if let Some(exit) = self.online(command, link).await {
                        return exit;
                    }
                }
                _ = health.tick() => {
                    if let Err(e) = bounded("PING", link.sink.ping::<Value>()).await {
                        return Exit::Lost(format!("PING failed: {e}"));
                    }
                }
            }
        }
    }

    /// Routes the messages already received, without waiting for more.
    fn drain(&self, link: &mut Link) {
        while let Some(Some(msg)) = link.stream.next().now_or_never() {
            self.subs.dispatch(&msg, &self.dropped);
        }
    }

    /// Carries out a command on a live link; `Some` to stop serving it.
    async fn online(&mut self, command: Option<Command>, link: &mut Link) -> Option<Exit> {
        match command? {
            Command::Shutdown => Some(Exit::Shutdown),
            Command::Reset(generation) => {
                (generation == self.generation).then(|| Exit::Lost("publishing failed".into()))
            }
            Command::Unsubscribe(id) => {
                let key = self.subs.remove(id)?;
                let done = match &key {
                    Key::Channel(c) => bounded("UNSUBSCRIBE", link.sink.unsubscribe(c)).await,
                    Key::Pattern(p) => bounded("PUNSUBSCRIBE", link.sink.punsubscribe(p)).await,
                };
                match done {
                    Err(e) if broken(&e) => Some(Exit::Lost(format!("unsubscribe failed: {e}"))),
                    Err(e) => {
                        tracing::warn!(error = %e, ?key, "redis refused to unsubscribe");
                        None
                    }
                    Ok(()) => None,
                }
            }
            Command::Subscribe { topic, tx, done } => {
                let (id, key, first) = self.subs.add(topic, tx);
                let subscribed = if first {
                    match &key {
                        Key::Channel(c) => bounded("SUBSCRIBE", link.sink.subscribe(c)).await,
                        Key::Pattern(p) => bounded("PSUBSCRIBE", link.sink.psubscribe(p)).await,
                    }
                } else {
                    Ok(())
                };
                match subscribed {
                    // The link failed, not the subscription: it is kept and
                    // made on the next link.
                    Err(e) if broken(&e) => {
                        self.answer(done, Ok(id), Some(link)).await;
                        Some(Exit::Lost(format!("subscribe failed: {e}")))
                    }
                    Err(e) => {
                        self.subs.remove(id);
                        let _ = done.send(Err(Error::transport("subscribe", e)));
                        None
                    }
                    Ok(()) => {
                        self.answer(done, Ok(id), Some(link)).await;
                        None
                    }
                }
            }
        }
    }

    /// Tells the subscriber its subscription is in place; if it stopped
    /// waiting, withdraws the subscription.
    async fn answer(
        &mut self,
        done: oneshot::Sender<Result<u64>>,
        answer: Result<u64>,
        link: Option<&mut Link>,
    ) {
        let Err(Ok(id)) = done.send(answer) else {
            return;
        };
        let (Some(key), Some(link)) = (self.subs.remove(id), link) else {
            return;
        };
        let _ = match &key {
            Key::Channel(c) => bounded("UNSUBSCRIBE", link.sink.unsubscribe(c)).await,
            Key::Pattern(p) => bounded("PUNSUBSCRIBE", link.sink.punsubscribe(p)).await,
        };
    }

    /// Carries out a command with no link: subscriptions are only recorded,
    /// to be made on the next link. `false` to stop the task.
    async fn offline(&mut self, command: Option<Command>) -> bool {
        match command {
            None | Some(Command::Shutdown) => false,
            Some(Command::Reset(_)) => true,
            Some(Command::Unsubscribe(id)) => {
                self.subs.remove(id);
                true
            }
            Some(Command::Subscribe { topic, tx, done }) => {
                let (id, _, _) = self.subs.add(topic, tx);
                self.answer(done, Ok(id), None).await;
                true
            }
        }
    }

    /// Connects again, with backoff, and subscribes everything again;
    /// `None` if the transport was dropped meanwhile.
    async fn reconnect(&mut self) -> Option<Link> {
        let mut delay = BACKOFF_START;
        loop {
            let client = self.client.clone();
            let opening = async move { open(&client).await };
            tokio::pin!(opening);
            let opened = loop {
                tokio::select! {
                    opened = &mut opening => break opened,
                    command = self.commands.recv() => {
                        if !self.offline(command).await {
                            return None;
                        }
                    }
                }
            };
            match opened {
                Ok(mut link) => match self.resubscribe(&mut link).await {
                    Ok(()) => return Some(link),
                    Err(e) => {
                        tracing::debug!(url = %self.url, error = %e, "redis resubscription failed")
                    }
                },
                Err(e) => tracing::debug!(url = %self.url, error = %e, "redis still away"),
            }
            let pause = tokio::time::sleep(delay);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    command = self.commands.recv() => {
                        if !self.offline(command).await {
                            return None;
                        }
                    }
                }
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }

    /// SUBSCRIBEs every channel and PSUBSCRIBEs every pattern on a new link.
    /// A refusal by the server is logged and skipped, or one forbidden
    /// channel would keep the whole registry offline.
    async fn resubscribe(&mut self, link: &mut Link) -> RedisResult<()> {
        let channels: Vec<String> = self.subs.channels.keys().cloned().collect();
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            match bounded("SUBSCRIBE", link.sink.subscribe(batch)).await {
                Err(e) if !broken(&e) => tracing::warn!(error = %e, "redis refused SUBSCRIBE"),
                other => other?,
            }
        }
        let patterns: Vec<String> = self.subs.patterns.keys().cloned().collect();
        for batch in patterns.chunks(RESUBSCRIBE_BATCH) {
            match bounded("PSUBSCRIBE", link.sink.psubscribe(batch)).await {
                Err(e) if !broken(&e) => tracing::warn!(error = %e, "redis refused PSUBSCRIBE"),
                other => other?,
            }
        }
        Ok(())
    }
}

/// `url` with the password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A URL for a client given whole, without its credentials.
fn describe_client(client: &Client) -> String {
    let info = client.get_connection_info();
    let db = info.redis_settings().db();
    let db = if db == 0 {
        String::new()
    } else {
        format!("/{db}")
    };
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}{db}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}{db}"),
        ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
        other => format!("redis://{other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_cover_patterns_and_escape_metacharacters() {
        assert_eq!(glob("registry.*.billing"), "registry.*.billing");
        assert_eq!(glob("registry.>"), "registry.*");
        assert_eq!(glob("registry.*.a.b"), "registry.*.a.b");
        assert_eq!(glob("registry.*.svc[1]?"), r"registry.*.svc\[1\]\?");
        assert_eq!(glob(r"t.*.a\b"), r"t.*.a\\b");
        assert_eq!(glob("t.*.a*b"), r"t.*.a\*b");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6379/2"),
            "redis://user:***@host:6379/2"
        );
        assert_eq!(redact("rediss://:secret@host"), "rediss://:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn clients_are_described_without_credentials() {
        let client = Client::open("redis://user:secret@127.0.0.1:7000/3").unwrap();
        assert_eq!(describe_client(&client), "redis://127.0.0.1:7000/3");
        let client = Client::open("rediss://:secret@example.com").unwrap();
        assert_eq!(describe_client(&client), "rediss://example.com:6379");
    }

    #[test]
    fn subscribers_of_one_key_share_it() {
        let mut subs = Subs::default();
        let (tx, _rx) = mpsc::channel(1);
        let (a, key, first) = subs.add(Topic::Pattern("r.*".into()), tx.clone());
        assert!(first);
        assert_eq!(key, Key::Pattern("r.*".into()));
        // `r.>` and `r.*` are the same glob on Redis: one PSUBSCRIBE.
        let (b, _, first) = subs.add(Topic::Pattern("r.>".into()), tx.clone());
        assert!(!first);
        assert_eq!(subs.remove(a), None);
        assert_eq!(subs.remove(b), Some(Key::Pattern("r.*".into())));
        assert_eq!(subs.remove(b), None);
        assert!(subs.patterns.is_empty() && subs.keys.is_empty());
    }
}
