//! NATS, over the `async-nats` client.
//!
//! The client reconnects by itself and restores its subscriptions; this
//! transport reports each reconnection so the registry can announce itself
//! again at once instead of at the next heartbeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::{Message, Messages, Topic, Transport};
use crate::error::{Error, Result};

/// Longest wait for the server to acknowledge what was sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// A registry transport over an `async_nats::Client`.
#[derive(Clone, Debug)]
pub struct NatsTransport {
    client: async_nats::Client,
    reconnects: watch::Receiver<u64>,
    url: String,
}

impl NatsTransport {
    /// Connects to `url` (one URL, or several separated by commas for a
    /// cluster) with default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, async_nats::ConnectOptions::new()).await
    }

    /// Connects to `url` with the caller's options (credentials, TLS, ...).
    /// The event callback is taken over to follow reconnections.
    pub async fn connect_with(url: &str, options: async_nats::ConnectOptions) -> Result<Self> {
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        // The first `Connected` is the initial connection; only one that
        // follows a `Disconnected` is a reconnection.
        let lost = Arc::new(AtomicBool::new(false));
        let options = options.event_callback(move |event| {
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

impl Transport for NatsTransport {
    fn publish(
        &self,
        subject: String,
        reply: Option<String>,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let sent = match reply {
                Some(reply) => {
                    self.client
                        .publish_with_reply(subject, reply, payload)
                        .await
                }
                None => self.client.publish(subject, payload).await,
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
            // The SUB must reach the server before the caller pings or
            // announces, or the answer could beat the subscription. While
            // the server is away the client keeps the subscription and
            // restores it on reconnection, so a bounded wait is enough.
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await;
            let messages = sub.map(|m| Message {
                subject: m.subject.to_string(),
                reply: m.reply.map(|r| r.to_string()),
                payload: m.payload,
            });
            Ok(messages.boxed())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
                Ok(flushed) => flushed.map_err(|e| Error::transport("flush", e)),
                Err(_) => Err(Error::transport("flush", "timed out: the NATS server is unreachable")),
            }
        })
    }

    fn reconnects(&self) -> Option<watch::Receiver<u64>> {
        Some(self.reconnects.clone())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}
