//! NATS, over the `async-nats` client.
//!
//! The client reconnects by itself and restores its subscriptions; this
//! transport reports each reconnection so the registry can announce itself
//! again at once instead of at the next heartbeat.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::connection::State;
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::{Message, Messages, Subject, Topic, Transport};
use crate::error::{Error, Result};

/// Longest wait for the server to acknowledge what was sent, or for the
/// client to take a message while it is reconnecting.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Nobody subscribes here: requests to it are answered by the server.
const BARRIER_SUBJECT: &str = "_REGISTRY_BARRIER";

/// Longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// A registry transport over an `async_nats::Client`.
#[derive(Clone, Debug)]
pub struct NatsTransport {
    client: async_nats::Client,
    reconnects: watch::Receiver<u64>,
    url: String,
}

impl NatsTransport {
    /// Connects to `url` (one URL, or several separated by commas for a
    /// cluster) with this crate's defaults: reconnect forever, at most
    /// 250 ms apart (async-nats backs off to 4 s, too slow to be whole again
    /// within a second of the server's return), and deep subscription
    /// buffers so that a burst of announcements is not dropped.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = async_nats::ConnectOptions::new()
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(25u64.saturating_mul(attempts as u64))
                    .min(MAX_RECONNECT_DELAY)
            })
            .subscription_capacity(1 << 18);
        Self::connect_with(url, options).await
    }

    /// Connects to `url` with the caller's options (credentials, TLS, ...).
    /// The event callback is taken over to follow reconnections, and the
    /// client's own check of publish subjects is replaced by this
    /// transport's (see [`Transport::publish`] below): the same rule, a
    /// fraction of the cost on every message sent.
    pub async fn connect_with(url: &str, options: async_nats::ConnectOptions) -> Result<Self> {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        // The first `Connected` is the initial connection; only one that
        // follows a `Disconnected` is a reconnection.
        let lost = Arc::new(AtomicBool::new(false));
        let options = options
            .skip_subject_validation(true)
            .event_callback(move |event| {
                let (tx, lost) = (tx.clone(), lost.clone());
                async move {
                    tracing::debug!(%event, "nats connection event");
                    match event {
                        async_nats::Event::Disconnected => lost.store(true, Ordering::Relaxed),
                        async_nats::Event::Connected if lost.swap(false, Ordering::Relaxed) => {
                            tx.send_modify(|n| *n += 1)
                        }
                        _ => {}
                    }
                }
            });
        let servers: Vec<&str> = url.split(',').map(str::trim).collect();
        let client = options.connect(servers).await.map_err(|e| Error::Connect {
            url: url.to_string(),
            source: Box::new(e),
        })?;
        Ok(NatsTransport {
            client,
            reconnects: rx,
            url: url.to_string(),
        })
    }

    /// Uses a client the caller already has. Reconnections are noticed by
    /// watching the client's connection counter.
    pub fn from_client(client: async_nats::Client) -> Self {
        let (tx, rx) = watch::channel(0u64);
        let stats = client.statistics();
        let url = format!("nats://{}", client.server_info().host);
        tokio::spawn(async move {
            let mut seen = stats.connects.load(Ordering::Relaxed);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !tx.is_closed() {
                tick.tick().await;
                let now = stats.connects.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    tx.send_modify(|n| *n += 1);
                }
            }
        });
        NatsTransport {
            client,
            reconnects: rx,
            url,
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

impl NatsTransport {
    /// Returns once the server has processed everything sent before.
    /// `Client::flush` only empties the socket buffer; a request to a
    /// subject nobody serves comes back as "no responders" from the server
    /// itself, after everything ahead of it on this connection.
    async fn round_trip(&self) -> Result<()> {
        let request = self.client.request(BARRIER_SUBJECT, Bytes::new());
        match tokio::time::timeout(SEND_TIMEOUT, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(Error::transport("flush", e)),
            Err(_) => Err(unreachable("flush")),
        }
    }
}

/// A subscription's messages from peers. A message with a status comes
/// from the server, not a peer: a ping carries `<main>.register.<name>` as
/// its reply subject, so a ping nobody serves earns a "no responders"
/// status there. (A stream of its own, not `filter_map`: that moves every
/// message through a future, a few hundred bytes copied twice.)
struct FromPeers(async_nats::Subscriber);

impl Stream for FromPeers {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            let Some(m) = ready!(self.0.poll_next_unpin(cx)) else {
                return Poll::Ready(None);
            };
            if m.status.is_none() {
                return Poll::Ready(Some(Message {
                    subject: m.subject.into(),
                    reply: m.reply.map(Into::into),
                    payload: m.payload,
                }));
            }
        }
    }
}

/// Whether `subject` can go on the wire: not empty, and no space or
/// control character, which would end the protocol line early (the NATS
/// client's own rule for publishing, with every control character where it
/// names four). Eight bytes at a time, as it runs on every message sent:
/// the client's check, two `memchr` passes each with its own setup, cost
/// about 200 instructions a publish and this one about 65 (callgrind,
/// twentieth session; `register()` went from 3,988 to 3,911 in all).
fn publishable(subject: &str) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x21 sets its high bit here; a byte of 0x80 or more is
    // masked out by `!x`. A borrow only marks bytes above a marked one, so
    // any mark means a real one.
    let low = |word: &[u8]| {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        let x = u64::from_le_bytes(w);
        x.wrapping_sub(ONES * 0x21) & !x & HIGH != 0
    };
    let bytes = subject.as_bytes();
    if bytes.len() < 8 {
        return !bytes.is_empty() && bytes.iter().all(|&b| b > b' ');
    }
    let mut words = bytes.chunks_exact(8);
    if words.any(low) {
        return false;
    }
    // The rest as the last eight bytes, overlapping words already checked.
    words.remainder().is_empty() || !low(&bytes[bytes.len() - 8..])
}

/// A publish of a subject that cannot go on the wire, refused.
#[cold]
fn refused(subject: Subject) -> BoxFuture<'static, Result<()>> {
    let e = Error::transport(
        "publish",
        format!(
            "{:?} is not a subject: empty, or a space or control character in it",
            &*subject
        ),
    );
    Box::pin(std::future::ready(Err(e)))
}

fn unreachable(op: &'static str) -> Error {
    Error::transport(op, "timed out: the NATS server is unreachable")
}

impl Transport for NatsTransport {
    fn publish(
        &self,
        subject: Subject,
        reply: Option<Subject>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<()>> {
        // The client does not check what it is given (see `connect_with`);
        // a client the caller made checks again, at its own cost.
        if !publishable(&subject) {
            return refused(subject);
        }
        if let Some(reply) = reply.as_ref().filter(|r| !publishable(r)) {
            return refused(reply.clone());
        }
        let subject = async_nats::Subject::from(subject);
        Box::pin(async move {
            let send = async {
                match reply {
                    Some(reply) => {
                        let reply = async_nats::Subject::from(reply);
                        self.client
                            .publish_with_reply(subject, reply, payload)
                            .await
                    }
                    None => self.client.publish(subject, payload).await,
                }
            };
            // Almost always ready at once (a free slot in the client's
            // queue): then no timer, whose deadline costs a clock read.
            let mut send = std::pin::pin!(send);
            let sent = match send.as_mut().now_or_never() {
                Some(sent) => sent,
                // The client queues while reconnecting; a full queue must
                // not hang the caller.
                None => tokio::time::timeout(SEND_TIMEOUT, send)
                    .await
                    .map_err(|_| unreachable("publish"))?,
            };
            sent.map_err(|e| Error::transport("publish", e))
        })
    }

    fn subscribe(&self, topic: Topic) -> BoxFuture<'_, Result<Messages>> {
        Box::pin(async move {
            let (Topic::Subject(subject) | Topic::Pattern(subject)) = topic;
            let sub = self
                .client
                .subscribe(subject)
                .await
                .map_err(|e| Error::transport("subscribe", e))?;
            Ok(FromPeers(sub).boxed())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // While the server is away the client keeps subscriptions and
            // restores them on reconnection: nothing to wait for then.
            if self.client.connection_state() != State::Connected {
                return Ok(());
            }
            self.round_trip().await
        })
    }

    fn reconnects(&self) -> Option<watch::Receiver<u64>> {
        Some(self.reconnects.clone())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::publishable;

    /// The word-at-a-time check agrees with a byte-by-byte one, for a bad
    /// byte at every place of subjects of every length up to 40.
    #[test]
    fn publishable_is_no_space_or_control_character() {
        let bytewise = |s: &str| !s.is_empty() && s.bytes().all(|b| b > b' ');
        assert!(!publishable(""));
        for len in 1..=40 {
            let good: String = "registry.register.é-1_abcdefghijklmnopqrstuvwxyz"
                .chars()
                .take(len)
                .collect();
            assert!(publishable(&good), "{good:?}");
            for at in 0..good.len() {
                if !good.is_char_boundary(at) {
                    continue;
                }
                for bad in [' ', '\t', '\r', '\n', '\0', '\u{1f}', '\u{7f}', '!'] {
                    let mut s = good.clone();
                    s.insert(at, bad);
                    assert_eq!(publishable(&s), bytewise(&s), "{s:?}");
                }
            }
        }
    }
}
