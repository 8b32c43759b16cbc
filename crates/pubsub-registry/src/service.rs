//! What is registered ([`Service`]) and what a lookup finds ([`Instance`]).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use compact_str::CompactString;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// A service instance as its owner describes it.
///
/// An instance is identified by `name` + `address`: registering the same pair
/// again refreshes it.
///
/// The text fields are [`CompactString`]s: strings of up to 24 bytes (names,
/// addresses, most URLs) live inline, so a cached instance is one allocation
/// instead of a dozen. They compare with `&str` and `String` and deref to
/// `str`.
///
/// ```
/// use pubsub_registry::Service;
///
/// let svc = Service::new("billing", "10.0.0.7:8080")
///     .with_url("http://10.0.0.7:8080/")
///     .with_version("1.4.2")
///     .with_kv("zone", "eu-1");
/// assert_eq!(svc.kv["zone"], "eu-1");
/// assert_eq!(svc.address, "10.0.0.7:8080");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service {
    /// Network: `tcp`, `tcp6`, `unix`, ... (free text).
    pub network: CompactString,
    /// The address the instance listens on, `host:port`.
    pub address: CompactString,
    /// Base URL to reach the instance.
    pub url: CompactString,
    /// Service name; see [`validate_name`](crate::protocol::validate_name).
    pub name: CompactString,
    /// Version, semver by convention.
    pub version: CompactString,
    /// Host name of the machine it runs on; filled in with the registry's
    /// host name on register when left empty.
    pub host: CompactString,
    /// Free metadata.
    pub kv: Kv,
}

impl Service {
    /// A service with a name and the address it listens on (network `tcp`).
    pub fn new(name: impl Into<CompactString>, address: impl Into<CompactString>) -> Self {
        Service {
            network: "tcp".into(),
            address: address.into(),
            name: name.into(),
            ..Service::default()
        }
    }

    /// Sets the base URL.
    pub fn with_url(mut self, url: impl Into<CompactString>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<CompactString>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the network (`tcp`, `tcp6`, `unix`, ...).
    pub fn with_network(mut self, network: impl Into<CompactString>) -> Self {
        self.network = network.into();
        self
    }

    /// Sets the host name.
    pub fn with_host(mut self, host: impl Into<CompactString>) -> Self {
        self.host = host.into();
        self
    }

    /// Adds one metadata entry.
    pub fn with_kv(
        mut self,
        key: impl Into<CompactString>,
        value: impl Into<CompactString>,
    ) -> Self {
        self.kv.insert(key, value);
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

/// A service's metadata: string keys to string values, kept sorted by key.
///
/// A small sorted vector rather than a tree map: services carry a handful of
/// entries, and a cached instance should not pay for a tree node it never
/// fills (a `BTreeMap` node is about 560 bytes even for one entry).
///
/// ```
/// use pubsub_registry::service::Kv;
///
/// let mut kv = Kv::new();
/// kv.insert("zone", "eu-1");
/// kv.insert("tags", "http,v2");
/// assert_eq!(kv.get("zone"), Some("eu-1"));
/// assert_eq!(kv["tags"], "http,v2");
/// let keys: Vec<&str> = kv.keys().collect();
/// assert_eq!(keys, ["tags", "zone"]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kv(Vec<(CompactString, CompactString)>);

impl Kv {
    /// No entries.
    pub fn new() -> Self {
        Kv(Vec::new())
    }

    /// Entries room is allocated for (a cached kv should have no slack).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.0.capacity()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|i| self.0[i].1.as_str())
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub fn insert(
        &mut self,
        key: impl Into<CompactString>,
        value: impl Into<CompactString>,
    ) -> Option<CompactString> {
        let (key, value) = (key.into(), value.into());
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<CompactString> {
        self.position(key).ok().map(|i| self.0.remove(i).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, sorted by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

/// Panics when the key is missing, like a map's index.
impl std::ops::Index<&str> for Kv {
    type Output = CompactString;

    fn index(&self, key: &str) -> &CompactString {
        match self.position(key) {
            Ok(i) => &self.0[i].1,
            Err(_) => panic!("no kv entry {key:?}"),
        }
    }
}

/// The last of duplicate keys wins, as when decoding a JSON object.
impl<K: Into<CompactString>, V: Into<CompactString>> FromIterator<(K, V)> for Kv {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut entries: Vec<(CompactString, CompactString)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // A stable sort keeps duplicates in arrival order; keep the last
        // (`dedup_by` keeps the first of a run, so the later value is moved
        // into it first).
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        // A cached kv lives as long as its instance: no spare room.
        entries.shrink_to_fit();
        Kv(entries)
    }
}

impl<K: Into<CompactString>, V: Into<CompactString>, const N: usize> From<[(K, V); N]> for Kv {
    fn from(entries: [(K, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<K: Into<CompactString>, V: Into<CompactString>> Extend<(K, V)> for Kv {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<'a> IntoIterator for &'a Kv {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (CompactString, CompactString)>,
        fn(&'a (CompactString, CompactString)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Debug for Kv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A JSON object of strings.
impl Serialize for Kv {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Kv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Kv;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kv, A::Error> {
                // Collected then sorted once: inserting one by one would be
                // quadratic in a hostile payload's thousands of keys.
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(16));
                while let Some(entry) = map.next_entry::<CompactString, CompactString>()? {
                    entries.push(entry);
                }
                Ok(entries.into_iter().collect())
            }
        }
        d.deserialize_map(V)
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
    /// Times in Unix milliseconds, as kept; a `sent_ms` of 0 is none.
    pub(crate) fn new(
        service: Service,
        status: Status,
        interval: Duration,
        sent_ms: u64,
        heard_ms: u64,
    ) -> Self {
        Instance {
            service,
            status,
            interval,
            sent_ms: AtomicU64::new(sent_ms),
            heard_ms: AtomicU64::new(heard_ms),
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

    /// Times as [`new`](Self::new) takes them.
    pub(crate) fn touch(&self, sent_ms: u64, heard_ms: u64) {
        self.heard_ms.store(heard_ms, Ordering::Relaxed);
        if sent_ms != 0 {
            self.sent_ms.store(sent_ms, Ordering::Relaxed);
        }
    }

    /// Same service and status: a refresh, not a change.
    pub(crate) fn same_as(&self, service: &Service, status: Status) -> bool {
        self.status == status && self.service == *service
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Instances per chunk of a snapshot (see [`Chunks`]).
const CHUNK: usize = 32;

type Chunk = Arc<Vec<Arc<Instance>>>;

/// The instances of one service: a shared, immutable snapshot of the cache,
/// returned without copying.
///
/// Index it, iterate it, or take a [`Vec`] with [`to_vec`](Self::to_vec):
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use pubsub_registry::{MemoryBus, Registry, Service};
///
/// let bus = MemoryBus::new();
/// let registry = Registry::builder().memory(&bus).build().await?;
/// registry.register(Service::new("api", "10.0.0.1:80")).await?;
/// let all = registry.get_services("api").await?;
/// assert_eq!(all.len(), 1);
/// assert_eq!(all[0].address(), "10.0.0.1:80");
/// for instance in &all {
///     println!("{} {}", instance.address(), instance.status);
/// }
/// let owned = all.to_vec();
/// # assert_eq!(owned.len(), 1);
/// # registry.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Instances(pub(crate) Arc<Chunks>);

/// A name's instances in chunks of [`CHUNK`], shared between successive
/// snapshots: a change copies the list of chunks and the one chunk it
/// touches, so a batch that changes a name with 100,000 instances costs
/// about 3,200 pointer copies, not 100,000. Every chunk but the last is
/// full, which keeps indexing a division. 32 is measured: 64 makes each
/// batch over many small names copy more (a name's last chunk, half full
/// on average), 16 makes a name with many instances copy a longer list.
#[derive(Clone, Default)]
pub(crate) struct Chunks {
    chunks: Vec<Chunk>,
    len: usize,
}

impl Chunks {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&Arc<Instance>> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    #[inline]
    pub(crate) fn iter(&self) -> Iter<'_> {
        Iter {
            chunks: self.chunks.iter(),
            current: [].iter(),
            left: self.len,
        }
    }

    /// Appends `instance`; returns its position.
    pub(crate) fn push(&mut self, instance: Arc<Instance>) -> usize {
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => Arc::make_mut(last).push(instance),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(instance);
                self.chunks.push(Arc::new(chunk));
            }
        }
        self.len += 1;
        self.len - 1
    }

    /// Replaces the instance at `pos`.
    pub(crate) fn set(&mut self, pos: usize, instance: Arc<Instance>) {
        if let Some(slot) = self
            .chunks
            .get_mut(pos / CHUNK)
            .and_then(|c| Arc::make_mut(c).get_mut(pos % CHUNK))
        {
            *slot = instance;
        }
    }

    /// Removes the instance at `pos` by moving the last one into its place;
    /// returns the one moved, whose position is now `pos`.
    pub(crate) fn swap_remove(&mut self, pos: usize) -> Option<Arc<Instance>> {
        if pos >= self.len {
            return None;
        }
        let last_chunk = self.chunks.last_mut()?;
        let last = Arc::make_mut(last_chunk).pop()?;
        if last_chunk.is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        if pos == self.len {
            return None;
        }
        self.set(pos, last.clone());
        Some(last)
    }

    #[cfg(test)]
    pub(crate) fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
}

impl FromIterator<Arc<Instance>> for Chunks {
    fn from_iter<I: IntoIterator<Item = Arc<Instance>>>(iter: I) -> Self {
        let mut c = Chunks::default();
        for i in iter {
            c.push(i);
        }
        c
    }
}

impl Instances {
    /// Number of instances.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The instance at `i`, if there are that many.
    #[inline]
    pub fn get(&self, i: usize) -> Option<&Arc<Instance>> {
        self.0.get(i)
    }

    /// The first instance, if any.
    #[inline]
    pub fn first(&self) -> Option<&Arc<Instance>> {
        self.0.get(0)
    }

    /// The instances in order.
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        self.0.iter()
    }

    /// A vector of the instances (each shared, not copied).
    pub fn to_vec(&self) -> Vec<Arc<Instance>> {
        self.iter().cloned().collect()
    }

    /// Whether both are the same snapshot of the cache: nothing changed
    /// between the two lookups that returned them.
    pub fn ptr_eq(&self, other: &Instances) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Index<usize> for Instances {
    type Output = Arc<Instance>;

    fn index(&self, i: usize) -> &Arc<Instance> {
        &self.0[i]
    }
}

impl std::ops::Index<usize> for Chunks {
    type Output = Arc<Instance>;

    fn index(&self, i: usize) -> &Arc<Instance> {
        match self.get(i) {
            Some(instance) => instance,
            None => panic!("index {i} out of range for {} instances", self.len),
        }
    }
}

impl fmt::Debug for Instances {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for &'a Instances {
    type Item = &'a Arc<Instance>;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<Arc<Instance>>> for Instances {
    fn from(v: Vec<Arc<Instance>>) -> Self {
        v.into_iter().collect()
    }
}

impl FromIterator<Arc<Instance>> for Instances {
    fn from_iter<I: IntoIterator<Item = Arc<Instance>>>(iter: I) -> Self {
        Instances(Arc::new(iter.into_iter().collect()))
    }
}

/// An iterator over [`Instances`].
#[derive(Clone, Debug)]
pub struct Iter<'a> {
    chunks: std::slice::Iter<'a, Chunk>,
    current: std::slice::Iter<'a, Arc<Instance>>,
    left: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Arc<Instance>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(i) = self.current.next() {
                self.left -= 1;
                return Some(i);
            }
            self.current = self.chunks.next()?.iter();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keeps_keys_sorted_and_the_last_duplicate() {
        let kv: Kv = [("b", "1"), ("a", "2"), ("b", "3")].into();
        assert_eq!(kv.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
        let mut kv = kv;
        assert_eq!(kv.insert("a", "4").as_deref(), Some("2"));
        assert_eq!(kv.insert("c", "5"), None);
        assert_eq!(kv.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(kv.remove("b").as_deref(), Some("3"));
        assert!(!kv.contains_key("b") && kv.len() == 2);
        assert_eq!(format!("{kv:?}"), r#"{"a": "4", "c": "5"}"#);
    }

    #[test]
    fn kv_is_a_json_object_of_strings() {
        let kv: Kv = serde_json::from_str(r#"{"z":"1","a":"2","z":"3"}"#).unwrap();
        assert_eq!(kv.iter().collect::<Vec<_>>(), [("a", "2"), ("z", "3")]);
        assert_eq!(serde_json::to_string(&kv).unwrap(), r#"{"a":"2","z":"3"}"#);
        assert!(serde_json::from_str::<Kv>(r#"{"a":1}"#).is_err());
        assert!(serde_json::from_str::<Kv>(r#"["a"]"#).is_err());
    }

    fn instance(i: usize) -> Arc<Instance> {
        let s = Service::new("api", format!("h:{i}"));
        let interval = Duration::from_secs(1);
        Arc::new(Instance::new(
            s,
            Status::Passing,
            interval,
            0,
            unix_ms(SystemTime::now()),
        ))
    }

    #[test]
    fn instances_over_several_chunks_read_as_one_sequence() {
        let all: Vec<Arc<Instance>> = (0..CHUNK * 2 + 5).map(instance).collect();
        let instances: Instances = all.clone().into();
        assert_eq!(instances.len(), all.len());
        assert_eq!(instances.0.chunks().len(), 3);
        assert_eq!(instances.iter().len(), all.len());
        assert!(instances.iter().zip(&all).all(|(a, b)| Arc::ptr_eq(a, b)));
        assert!(Arc::ptr_eq(&instances[CHUNK + 1], &all[CHUNK + 1]));
        assert!(Arc::ptr_eq(instances.first().unwrap(), &all[0]));
        assert!(instances.get(all.len()).is_none());
        assert_eq!(instances.to_vec().len(), all.len());
        assert!(instances.ptr_eq(&instances.clone()));
        assert!(!instances.ptr_eq(&all.into()));
        assert!(Instances::default().is_empty());
    }

    #[test]
    fn swap_remove_keeps_every_chunk_but_the_last_full() {
        let mut c = Chunks::default();
        for i in 0..CHUNK + 1 {
            assert_eq!(c.push(instance(i)), i);
        }
        // The last moves into the hole; the emptied last chunk goes.
        let moved = c.swap_remove(3).unwrap();
        assert_eq!(moved.address(), format!("h:{CHUNK}"));
        assert_eq!(c.chunks().len(), 1);
        assert_eq!(c[3].address(), format!("h:{CHUNK}"));
        // Removing the last one moves nothing; out of range removes nothing.
        assert!(c.swap_remove(c.len() - 1).is_none());
        assert!(c.swap_remove(c.len()).is_none());
        assert_eq!(c.len(), CHUNK - 1);
        assert!(c.chunks().iter().all(|chunk| chunk.len() <= CHUNK));
    }

    #[test]
    fn short_fields_are_stored_inline() {
        let svc = Service::new("billing", "10.0.0.7:8080").with_url("http://10.0.0.7:8080/");
        assert!(!svc.name.is_heap_allocated());
        assert!(!svc.address.is_heap_allocated());
        assert!(!svc.url.is_heap_allocated());
    }
}
