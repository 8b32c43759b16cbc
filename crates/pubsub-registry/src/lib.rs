//! Service discovery over the pub/sub you already run: NATS, Redis, or
//! in-process. No registry server: services announce themselves, clients keep
//! a local cache that follows announcements in real time, find instances in
//! nanoseconds, and forget the dead ones.
//!
//! Wire-compatible with the Go package `github.com/eddieraa/registry` and its
//! Java port (see [`protocol`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pubsub_registry::Result<()> {
//! use pubsub_registry::{Filter, Lookup, MemoryBus, Registry, Service};
//!
//! // Over NATS: Registry::builder().nats_url("nats://127.0.0.1:4222")
//! let bus = MemoryBus::new();
//!
//! // A service announces itself...
//! let server = Registry::builder().memory(&bus).build().await?;
//! server
//!     .register(Service::new("greeter", "127.0.0.1:10001").with_url("http://127.0.0.1:10001/"))
//!     .await?;
//!
//! // ...and a client finds it: the first lookup pings, later ones hit the cache.
//! let client = Registry::builder().memory(&bus).build().await?;
//! let greeter = client.get_service("greeter").await?;
//! assert_eq!(greeter.service.url, "http://127.0.0.1:10001/");
//!
//! let passing = client
//!     .get_service_with("greeter", &Lookup::new().filter(Filter::passing()))
//!     .await?;
//! assert_eq!(passing.address(), "127.0.0.1:10001");
//!
//! server.close().await?; // unregisters "greeter"
//! # Ok(())
//! # }
//! ```
//!
//! The path a message takes: a [`transport`] receives it, [`protocol`]
//! decodes and checks it, the catalog (the local cache) takes it in, and the
//! change reaches [`Event`] subscribers and lookups.
#![warn(missing_docs)]

mod catalog;
mod default;
mod due;
pub mod error;
pub mod event;
pub mod filter;
#[cfg(feature = "http")]
pub mod http;
pub mod net;
pub mod protocol;
mod registry;
mod release;
pub mod service;
pub mod transport;

pub use default::{
    close, default, get_service, get_services, observe, observe_all, register, set_default,
    set_service_status, unregister,
};
pub use error::{Error, Result};
pub use event::{Event, EventKind, EventStream, Lagged};
pub use filter::{Filter, ObserveFilter};
pub use registry::{
    Lookup, Registration, Registry, RegistryBuilder, Stats, DEFAULT_DUE_FACTOR,
    DEFAULT_EVENT_CAPACITY, DEFAULT_PING_WINDOW, DEFAULT_REGISTER_INTERVAL, DEFAULT_TIMEOUT,
};
pub use service::{CompactString, Instance, Instances, Kv, Service, Status};
pub use transport::memory::MemoryBus;
#[cfg(feature = "nats")]
pub use transport::nats::NatsTransport;
#[cfg(feature = "redis")]
pub use transport::redis::RedisTransport;
