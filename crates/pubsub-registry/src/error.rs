//! The crate's one error type.

use std::time::Duration;

use crate::protocol::NameError;

/// A boxed error from a transport's client library (async-nats, redis-rs, ...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in this crate.
///
/// Each variant says what to fix; transport failures keep their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service name (or a main topic) that would be unsafe on the wire.
    #[error(transparent)]
    InvalidName(#[from] NameError),

    /// A service that cannot be registered as given.
    #[error("invalid service {name:?}: {reason}")]
    InvalidService {
        /// The service's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A builder option out of range.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The option's name, as the builder method is called.
        option: &'static str,
        /// What range it takes.
        reason: String,
    },

    /// The builder was given no transport.
    #[error(
        "no transport: call .nats_url(), .nats_client(), .redis_url(), .redis_client(), .memory() or .transport() on the builder"
    )]
    NoTransport,

    /// No instance of the service passed the filters within the lookup timeout.
    #[error("service {name:?} not found (waited {waited:?})")]
    NotFound {
        /// The service looked up.
        name: String,
        /// How long the lookup waited for an answer to its ping.
        waited: Duration,
    },

    /// The service is not registered by this registry.
    #[error("service {name:?} at {address:?} is not registered by this registry")]
    NotRegistered {
        /// The service's name.
        name: String,
        /// The service's address.
        address: String,
    },

    /// The registry was closed; build a new one.
    #[error("the registry is closed")]
    Closed,

    /// A free function was called before [`set_default`](crate::set_default).
    #[error("no default registry: call pubsub_registry::set_default(..) first")]
    NoDefault,

    /// Connecting to the broker failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// Where we tried to connect.
        url: String,
        /// Why it failed.
        #[source]
        source: BoxError,
    },

    /// A broker operation failed.
    #[error("{op} failed: {source}")]
    Transport {
        /// What we were doing (`publish`, `subscribe`, `flush`).
        op: &'static str,
        /// Why it failed.
        #[source]
        source: BoxError,
    },

    /// Finding a free port or local address failed.
    #[error("no free port: {0}")]
    NoFreePort(String),
}

impl Error {
    // Only the broker transports fail this way; the memory bus never does.
    #[cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]
    pub(crate) fn transport(op: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Transport {
            op,
            source: source.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
