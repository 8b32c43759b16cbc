//! What is registered ([`Service`]) and what a lookup finds ([`Instance`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A service instance as its owner describes it.
///
/// An instance is identified by `name` + `address`: registering the same pair
/// again refreshes it.
///
/// ```
/// use pubsub_registry::Service;
///
/// let svc = Service::new("billing", "10.0.0.7:8080")
///     .with_url("http://10.0.0.7:8080/")
///     .with_version("1.4.2")
///     .with_kv("zone", "eu-1");
/// assert_eq!(svc.kv["zone"], "eu-1");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service {
    /// Network: `tcp`, `tcp6`, `unix`, ... (free text).
    pub network: String,
    /// The address the instance listens on, `host:port`.
    pub address: String,
    /// Base URL to reach the instance.
    pub url: String,
    /// Service name; see [`validate_name`](crate::protocol::validate_name).
    pub name: String,
    /// Version, semver by convention.
    pub version: String,
    /// Host name of the machine it runs on; filled in with the registry's
    /// host name on register when left empty.
    pub host: String,
    /// Free metadata.
    pub kv: BTreeMap<String, String>,
}

impl Service {
    /// A service with a name and the address it listens on (network `tcp`).
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        Service {
            network: "tcp".into(),
            address: address.into(),
            name: name.into(),
            ..Service::default()
        }
    }

    /// Sets the base URL.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the network (`tcp`, `tcp6`, `unix`, ...).
    pub fn with_network(mut self, network: impl Into<String>) -> Self {
        self.network = network.into();
        self
    }

    /// Sets the host name.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Adds one metadata entry.
    pub fn with_kv(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kv.insert(key.into(), value.into());
        self
    }

    /// The port of [`address`](Self::address), if it ends in `:port`.
    ///
    /// ```
    /// # use pubsub_registry::Service;
    /// assert_eq!(Service::new("a", "[::1]:8080").port(), Some(8080));
    /// assert_eq!(Service::new("a", "/tmp/a.sock").port(), None);
    /// ```
    pub fn port(&self) -> Option<u16> {
        let (_, port) = self.address.rsplit_once(':')?;
        port.parse().ok()
    }
}

/// Health of an instance, as its owner announces it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Healthy (the default; omitted on the wire).
    #[default]
    Passing,
    /// Degraded but serving.
    Warning,
    /// Failing.
    Critical,
}

impl Status {
    /// The wire and Consul spelling: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not `passing`, `warning` or `critical`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}: expected passing, warning or critical")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "passing" => Ok(Status::Passing),
            "warning" => Ok(Status::Warning),
            "critical" => Ok(Status::Critical),
            other => Err(UnknownStatus(other.to_string())),
        }
    }
}

/// An instance in the local cache: the service, its status, and when it was
/// last heard from.
///
/// Instances are shared (`Arc<Instance>`) between the cache and every lookup
/// that returned them; a heartbeat updates [`last_heard`](Self::last_heard)
/// in place, any other change replaces the instance.
#[derive(Debug)]
pub struct Instance {
    /// The service as announced.
    pub service: Service,
    /// Its announced status.
    pub status: Status,
    /// The announcer's register interval (how often it promises to announce).
    pub interval: Duration,
    sent_ms: AtomicU64,
    heard_ms: AtomicU64,
}

impl Instance {
    pub(crate) fn new(
        service: Service,
        status: Status,
        interval: Duration,
        sent: Option<SystemTime>,
    ) -> Self {
        Instance {
            service,
            status,
            interval,
            sent_ms: AtomicU64::new(sent.map_or(0, unix_ms)),
            heard_ms: AtomicU64::new(unix_ms(SystemTime::now())),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.service.name
    }

    /// The address the instance listens on.
    pub fn address(&self) -> &str {
        &self.service.address
    }

    /// Whether its status is [`Status::Passing`].
    pub fn is_passing(&self) -> bool {
        self.status == Status::Passing
    }

    /// When this process last received an announcement of it (local clock).
    pub fn last_heard(&self) -> SystemTime {
        from_unix_ms(self.heard_ms.load(Ordering::Relaxed))
    }

    /// The announcer's clock when it sent the last announcement, if it said.
    /// Informational only: expiry never uses another machine's clock.
    pub fn sent_at(&self) -> Option<SystemTime> {
        match self.sent_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(from_unix_ms(ms)),
        }
    }

    pub(crate) fn touch(&self, sent: Option<SystemTime>) {
        self.heard_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        if let Some(sent) = sent {
            self.sent_ms.store(unix_ms(sent), Ordering::Relaxed);
        }
    }

    /// Same service and status: a refresh, not a change.
    pub(crate) fn same_as(&self, service: &Service, status: Status) -> bool {
        self.status == status && self.service == *service
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The instances of one service: a shared, immutable snapshot of the cache,
/// returned without copying.
#[derive(Clone, Debug, Default)]
pub struct Instances(pub(crate) Arc<Vec<Arc<Instance>>>);

impl std::ops::Deref for Instances {
    type Target = [Arc<Instance>];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Instances {
    type Item = &'a Arc<Instance>;
    type IntoIter = std::slice::Iter<'a, Arc<Instance>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<Arc<Instance>>> for Instances {
    fn from(v: Vec<Arc<Instance>>) -> Self {
        Instances(Arc::new(v))
    }
}
