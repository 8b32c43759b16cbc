//! A read-only, Consul-compatible HTTP API over the registry's cache, for
//! the tools that already read Consul's catalog (Prometheus `consul_sd`,
//! Traefik's Consul catalog provider, Consul API clients).
//!
//! Enabled by the `http` cargo feature (it pulls in axum). [`router`] returns
//! an [`axum::Router`] with these routes, to serve on its own or to merge
//! into an application's router:
//!
//! | route | answers |
//! |---|---|
//! | `GET /v1/agent/self` | `{"Config": {"Datacenter", "NodeName", ...}, "Member": {...}, ...}` |
//! | `GET /v1/catalog/services` | `{"<name>": [tags...]}` for every service with an instance |
//! | `GET /v1/catalog/service/<name>` | Consul `CatalogService` entries, one per instance |
//! | `GET /v1/health/service/<name>` | `{Node, Service, Checks}` entries, one per instance |
//!
//! How the registry's instances map onto Consul's model:
//!
//! - A Consul *node* is the instance's host (`h` on the wire); its address is
//!   the host part of the instance's address.
//! - `ServiceID` is `<name>-<address>`; `ServiceAddress` / `ServicePort` are
//!   the instance's address split at its last colon (port 0 when there is
//!   none, as for a unix socket).
//! - `ServiceMeta` is the service's kv, verbatim.
//! - Tags come from the kv key `tags`, a comma-separated list
//!   (`tags=http,primary`): blanks around commas and empty items are dropped.
//! - Node meta holds `host` (the host name) and every kv key
//!   `node-meta.<key>`, without the prefix (`node-meta.zone=eu-1` gives node
//!   meta `zone=eu-1`), for `?node-meta=zone:eu-1`.
//! - Each instance has one check, `service:<ServiceID>`, whose status is the
//!   instance's announced status (`passing`, `warning`, `critical`).
//!
//! Query parameters: `?tag=` (repeatable, all must match) and
//! `?node-meta=key:value` (repeatable) on the catalog and health endpoints,
//! `?passing` on `/v1/health/service`, `?dc=` (another datacenter answers
//! 500, as in Consul), and blocking queries everywhere: every response
//! carries `X-Consul-Index`; `?index=N&wait=D` holds the request until the
//! index moves past `N` or the wait runs out (default 5 minutes, at most 10;
//! `D` as in Consul: `100ms`, `10s`, `5m`). The index of
//! `/v1/catalog/services` moves when the set of names, their tags or their
//! node meta change; the index of one service moves whenever one of its
//! instances is registered, unregistered, expires or changes status. An
//! index lower than the current one (a restarted server) answers at once.
//! `?filter=` expressions are not supported and answer 400.
//!
//! Unknown services answer `200 []`, as Consul does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::Result;
use crate::event::{Event, EventKind, EventStream};
use crate::registry::Registry;
use crate::service::{Instance, Kv, Status};

/// How long a blocking query waits when it gives no `wait` (Consul's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest wait a blocking query may ask for (Consul's limit).
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// The kv key whose comma-separated value gives an instance's Consul tags.
pub const TAGS_KEY: &str = "tags";
/// The prefix of kv keys that become node meta (`node-meta.zone` → `zone`).
pub const NODE_META_PREFIX: &str = "node-meta.";

/// Settings of the HTTP API.
///
/// ```
/// use pubsub_registry::http::HttpConfig;
/// let config = HttpConfig::new().datacenter("eu-west").node_name("registry-1");
/// assert_eq!(config.datacenter, "eu-west");
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
#[must_use]
pub struct HttpConfig {
    /// The datacenter every entry is in, and that `?dc=` must name
    /// (default `dc1`).
    pub datacenter: String,
    /// The name of the agent in `/v1/agent/self` (default: the registry's
    /// host name).
    pub node_name: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            datacenter: "dc1".to_string(),
            node_name: None,
        }
    }
}

impl HttpConfig {
    /// Datacenter `dc1`, the registry's host name as node name.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the datacenter.
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = datacenter.into();
        self
    }

    /// Sets the agent's node name.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = Some(name.into());
        self
    }
}

/// The Consul-compatible routes over `registry`'s cache.
///
/// Makes the registry observe every service under its main topic
/// ([`Registry::observe_all`]) so the catalog is whole, and sends one
/// [`Registry::ping_all`] so that instances registered by this crate appear
/// at once; those of the Go package and the Java port, which do not answer
/// it, appear at their next heartbeat. Then follows the registry's [events](Registry::events) to move the indexes of
/// blocking queries, which return within milliseconds of a change. Call it
/// from within a Tokio runtime; the follower task stops when the router
/// (every clone of it) is dropped.
///
/// Errors: those of [`Registry::observe_all`] (a closed registry, a broker
/// refusing the subscription).
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use pubsub_registry::http::{router, HttpConfig};
/// use pubsub_registry::Registry;
///
/// let registry = Registry::builder().nats_url("nats://127.0.0.1:4222").build().await?;
/// let app = axum::Router::new()
///     .route("/healthz", axum::routing::get(|| async { "ok" }))
///     .merge(router(registry, HttpConfig::new()).await?);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8500").await?;
/// axum::serve(listener, app).await?;
/// # Ok(())
/// # }
/// ```
pub async fn router(registry: Registry, config: HttpConfig) -> Result<Router> {
    // Subscribed before the cache is read, so no change falls in between.
    let events = registry.events();
    registry.observe_all().await?;
    if let Err(e) = registry.ping_all().await {
        // The catalog still fills, at the heartbeats' pace.
        tracing::warn!(error = %e, "cannot ping all instances");
    }
    let node_name = config
        .node_name
        .clone()
        .unwrap_or_else(|| registry.host_name().to_string());
    let (clock, _) = watch::channel(0);
    let shared = Arc::new(Shared {
        registry,
        datacenter: config.datacenter,
        node_name,
        indexes: Mutex::new(Indexes::default()),
        clock,
        follower: Mutex::new(None),
    });
    shared.rebuild();
    let task = tokio::spawn(follow(Arc::downgrade(&shared), events));
    *lock(&shared.follower) = Some(task.abort_handle());
    let state = Api(Arc::new(Owner(shared)));
    Ok(Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{*name}", get(catalog_service))
        .route("/v1/health/service/{*name}", get(health_service))
        .with_state(state))
}

/// The router's state: dropping the last clone stops the follower.
#[derive(Clone)]
struct Api(Arc<Owner>);

struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.0.follower).take() {
            task.abort();
        }
    }
}

struct Shared {
    registry: Registry,
    datacenter: String,
    node_name: String,
    /// A std mutex: held only to copy or update, never across an await.
    indexes: Mutex<Indexes>,
    /// The latest index handed out; blocked requests wait for it to move.
    clock: watch::Sender<u64>,
    follower: Mutex<Option<AbortHandle>>,
}

/// What the endpoints show, and Consul-style indexes over it: one clock,
/// and the clock value at the last change of each thing an endpoint shows.
/// Kept together under one lock, so an answer's index always matches its
/// content. All indexes start at 1 so none is ever 0.
struct Indexes {
    clock: u64,
    services: u64,
    names: HashMap<String, u64>,
    /// Instances by name and address, kept from the events.
    instances: HashMap<String, HashMap<String, Arc<Instance>>>,
}

/// What `/v1/catalog/services` shows of an instance: its tags and node meta.
type Shown = (Vec<String>, BTreeMap<String, String>);

impl Default for Indexes {
    fn default() -> Self {
        Indexes {
            clock: 1,
            services: 1,
            names: HashMap::new(),
            instances: HashMap::new(),
        }
    }
}

impl Indexes {
    fn name(&self, name: &str) -> u64 {
        self.names.get(name).copied().unwrap_or(1)
    }

    fn shown(&self, name: &str) -> BTreeSet<Shown> {
        self.instances
            .get(name)
            .into_iter()
            .flat_map(|a| a.values())
            .map(|i| (tags(i), node_meta(i)))
            .collect()
    }

    /// The instances of `name`, by host then address, for stable output.
    fn instances_of(&self, name: &str) -> Vec<Arc<Instance>> {
        let mut v: Vec<Arc<Instance>> = self
            .instances
            .get(name)
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| {
            (&a.service.host, &a.service.address).cmp(&(&b.service.host, &b.service.address))
        });
        v
    }
}

async fn follow(shared: Weak<Shared>, mut events: EventStream) {
    while let Some(event) = events.next().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            Ok(event) => shared.changed(&event),
            // Missed events: which names changed is unknown, so everything
            // moves and the view is taken again from the cache.
            Err(lagged) => {
                tracing::debug!(%lagged, "http api fell behind the registry's events");
                shared.rebuild();
            }
        }
    }
}

impl Shared {
    /// Applies an event and moves the indexes it touches; costs the size of
    /// its name, not of the whole cache.
    fn changed(&self, event: &Event) {
        let i = &event.instance;
        let name = i.name();
        let now = {
            let mut ix = lock(&self.indexes);
            ix.clock += 1;
            let now = ix.clock;
            ix.names.insert(name.to_string(), now);
            let before = ix.shown(name);
            let addresses = ix.instances.entry(name.to_string()).or_default();
            match event.kind {
                EventKind::Unregistered | EventKind::Expired => {
                    addresses.remove(i.address());
                }
                _ => {
                    addresses.insert(i.address().to_string(), i.clone());
                }
            }
            if addresses.is_empty() {
                ix.instances.remove(name);
            }
            if ix.shown(name) != before {
                ix.services = now;
            }
            now
        };
        self.clock.send_replace(now);
    }

    /// Takes everything again from the cache and moves every index.
    fn rebuild(&self) {
        let mut by_name: HashMap<String, HashMap<String, Arc<Instance>>> = HashMap::new();
        for i in self.registry.cached_instances() {
            by_name
                .entry(i.name().to_string())
                .or_default()
                .insert(i.address().to_string(), i);
        }
        let now = {
            let mut ix = lock(&self.indexes);
            ix.clock += 1;
            let now = ix.clock;
            for index in ix.names.values_mut() {
                *index = now;
            }
            for name in by_name.keys() {
                ix.names.insert(name.clone(), now);
            }
            ix.instances = by_name;
            ix.services = now;
            now
        };
        self.clock.send_replace(now);
    }

    /// Holds a blocking query until `index` moves past the client's, or its
    /// wait runs out; then answers with what `read` takes, and the index,
    /// both under one lock.
    async fn block<T>(
        &self,
        q: &Params,
        index: impl Fn(&Indexes) -> u64,
        read: impl FnOnce(&Indexes) -> T,
    ) -> (u64, T) {
        let mut clock = self.clock.subscribe();
        if let Some(min) = q.index.filter(|&n| n > 0) {
            let deadline = Instant::now() + q.wait;
            // Lower than the client's: this is a restarted server, whose
            // answer the client must see at once to reset its index.
            while index(&lock(&self.indexes)) == min {
                tokio::select! {
                    changed = clock.changed() => {
                        if changed.is_err() {
                            break;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let ix = lock(&self.indexes);
        (index(&ix), read(&ix))
    }

    fn node(&self, i: &Instance) -> NodeInfo {
        let s = &i.service;
        let (host, port) = split_address(&s.address);
        let node = if s.host.is_empty() {
            host.to_string()
        } else {
            s.host.to_string()
        };
        let address = if port.is_some() && !host.is_empty() {
            host.to_string()
        } else {
            node.clone()
        };
        NodeInfo {
            id: node_id(&node),
            meta: node_meta(i),
            node,
            address,
            datacenter: self.datacenter.clone(),
        }
    }
}

/// A request's query parameters.
struct Params {
    index: Option<u64>,
    wait: Duration,
    tags: Vec<String>,
    node_meta: Vec<(String, String)>,
    passing: bool,
}

impl Params {
    /// Parses the query as Consul does; `Err` is the 400 (or 500) answer.
    fn parse(shared: &Shared, query: &[(String, String)]) -> Result<Params, (StatusCode, String)> {
        let mut p = Params {
            index: None,
            wait: DEFAULT_WAIT,
            tags: Vec::new(),
            node_meta: Vec::new(),
            passing: false,
        };
        for (key, value) in query {
            match key.as_str() {
                "index" => {
                    p.index = Some(
                        value
                            .parse()
                            .map_err(|_| bad_request(format!("Invalid index {value:?}")))?,
                    )
                }
                "wait" => {
                    p.wait = parse_wait(value)
                        .ok_or_else(|| bad_request(format!("Invalid wait time {value:?}")))?
                        .min(MAX_WAIT)
                }
                "tag" => p.tags.push(value.clone()),
                "node-meta" => {
                    let (k, v) = value.split_once(':').unwrap_or((value, ""));
                    p.node_meta.push((k.to_string(), v.to_string()));
                }
                // A bare `?passing` means true, as in Consul.
                "passing" => {
                    p.passing = match value.as_str() {
                        "" => true,
                        v => parse_bool(v).ok_or_else(|| {
                            bad_request(format!("Failed to parse passing: invalid value {v:?}"))
                        })?,
                    }
                }
                "dc" if !value.is_empty() && *value != shared.datacenter => {
                    return Err((
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "No path to datacenter".to_string(),
                    ))
                }
                "filter" if !value.is_empty() => {
                    return Err(bad_request(
                        "filter expressions are not supported by this registry".to_string(),
                    ))
                }
                // stale, consistent, cached, near, ns, partition...: they
                // change nothing for a registry that is its own leader.
                _ => {}
            }
        }
        Ok(p)
    }

    fn keeps(&self, i: &Instance) -> bool {
        if self.passing && i.status != Status::Passing {
            return false;
        }
        let tags = tags(i);
        if !self.tags.iter().all(|t| tags.contains(t)) {
            return false;
        }
        if self.node_meta.is_empty() {
            return true;
        }
        let meta = node_meta(i);
        self.node_meta
            .iter()
            .all(|(k, v)| meta.get(k).is_some_and(|m| m == v))
    }
}

fn bad_request(msg: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, msg)
}

fn parse_bool(v: &str) -> Option<bool> {
    // Go's strconv.ParseBool, which Consul uses.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A Go duration as Consul takes it for `wait`: `100ms`, `10s`, `5m`,
/// `1m30s`, `1.5s`; a bare `0` is zero.
fn parse_wait(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    // Anything past the limit is clamped anyway; this keeps from_secs_f64
    // away from overflow.
    Some(Duration::from_secs_f64(
        total.min(MAX_WAIT.as_secs_f64() * 2.0),
    ))
}

/// `host:port` split at the last colon, brackets of an IPv6 host removed;
/// no port when there is none.
fn split_address(address: &str) -> (&str, Option<u16>) {
    match address.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(port) => (
                host.strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host),
                Some(port),
            ),
            Err(_) => (address, None),
        },
        None => (address, None),
    }
}

fn tags(i: &Instance) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    if let Some(list) = i.service.kv.get(TAGS_KEY) {
        for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !tags.iter().any(|have| have == t) {
                tags.push(t.to_string());
            }
        }
    }
    tags
}

fn node_meta(i: &Instance) -> BTreeMap<String, String> {
    let mut meta: BTreeMap<String, String> = i
        .service
        .kv
        .iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix(NODE_META_PREFIX)?;
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect();
    meta.entry("host".to_string())
        .or_insert_with(|| i.service.host.to_string());
    meta
}

fn service_id(i: &Instance) -> String {
    format!("{}-{}", i.service.name, i.service.address)
}

/// A stable UUID-shaped node ID derived from the node name: Consul clients
/// expect one, and the same host must keep the same ID across restarts.
fn node_id(node: &str) -> String {
    fn fnv(seed: u64, data: &[u8]) -> u64 {
        data.iter().fold(seed, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }
    let a = fnv(0xcbf2_9ce4_8422_2325, node.as_bytes());
    let b = fnv(0x8422_2325_cbf2_9ce4, node.as_bytes());
    let mut id = String::with_capacity(36);
    let hex = format!("{a:016x}{b:016x}");
    for (n, c) in hex.chars().enumerate() {
        if matches!(n, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        id.push(c);
    }
    id
}

struct NodeInfo {
    id: String,
    node: String,
    address: String,
    datacenter: String,
    meta: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: u32,
    warning: u32,
}

const WEIGHTS: Weights = Weights {
    passing: 1,
    warning: 1,
};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogService {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    node_meta: BTreeMap<String, String>,
    service_kind: &'static str,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    service_address: String,
    service_port: u16,
    service_meta: Kv,
    service_weights: Weights,
    service_enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
    checks: Vec<HealthCheck>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(rename = "ID")]
    id: String,
    node: String,
    address: String,
    datacenter: String,
    tagged_addresses: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    meta: Kv,
    port: u16,
    weights: Weights,
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheck {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: String,
    output: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    #[serde(rename = "Type")]
    kind: &'static str,
    create_index: u64,
    modify_index: u64,
}

const X_CONSUL_INDEX: HeaderName = HeaderName::from_static("x-consul-index");
const X_CONSUL_KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
const X_CONSUL_LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");

/// A JSON answer with the headers Consul clients read: the Go client fails
/// a response without `X-Consul-LastContact`.
fn reply(index: u64, body: &impl Serialize) -> Response {
    let body = match serde_json::to_vec(body) {
        Ok(body) => body,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (X_CONSUL_INDEX, HeaderValue::from(index)),
            (X_CONSUL_KNOWN_LEADER, HeaderValue::from_static("true")),
            (X_CONSUL_LAST_CONTACT, HeaderValue::from_static("0")),
        ],
        body,
    )
        .into_response()
}

type RawQuery = Query<Vec<(String, String)>>;

async fn agent_self(State(api): State<Api>, Query(query): RawQuery) -> Response {
    let shared = &api.0 .0;
    let q = match Params::parse(shared, &query) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    // Nothing here ever changes: a blocking query just waits out its time.
    let (index, ()) = shared.block(&q, |_| 1, |_| ()).await;
    let body = serde_json::json!({
        "Config": {
            "Datacenter": shared.datacenter,
            "NodeName": shared.node_name,
            "NodeID": node_id(&shared.node_name),
            "Server": false,
            "Revision": "",
        },
        "Member": {
            "Name": shared.node_name,
            "Addr": "127.0.0.1",
            "Port": 0,
            "Tags": {"dc": shared.datacenter, "role": "node"},
            "Status": 1,
        },
        "Meta": {},
        "Stats": {},
        "DebugConfig": {},
        "Registry": {
            "Implementation": "pubsub-registry",
            "Version": env!("CARGO_PKG_VERSION"),
            "MainTopic": shared.registry.main_topic(),
        },
    });
    reply(index, &body)
}

async fn catalog_services(State(api): State<Api>, Query(query): RawQuery) -> Response {
    let shared = &api.0 .0;
    let q = match Params::parse(shared, &query) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let (index, services) = shared
        .block(
            &q,
            |ix| ix.services,
            |ix| {
                let mut services: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for (name, addresses) in &ix.instances {
                    for i in addresses.values().filter(|i| q.keeps(i)) {
                        services.entry(name.clone()).or_default().extend(tags(i));
                    }
                }
                services
            },
        )
        .await;
    reply(index, &services)
}

/// Parses a query on one service and answers it as a blocking query: its
/// index, and the instances its filters keep.
async fn one_service(
    shared: &Shared,
    name: &str,
    query: &[(String, String)],
) -> Result<(u64, Vec<Arc<Instance>>), (StatusCode, String)> {
    let q = Params::parse(shared, query)?;
    let (index, mut instances) = shared
        .block(&q, |ix| ix.name(name), |ix| ix.instances_of(name))
        .await;
    instances.retain(|i| q.keeps(i));
    Ok((index, instances))
}

async fn catalog_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(query): RawQuery,
) -> Response {
    let shared = &api.0 .0;
    let (index, instances) = match one_service(shared, &name, &query).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let entries: Vec<CatalogService> = instances
        .iter()
        .map(|i| {
            let node = shared.node(i);
            let (address, port) = split_address(&i.service.address);
            CatalogService {
                id: node.id,
                node: node.node,
                address: node.address,
                datacenter: node.datacenter,
                tagged_addresses: BTreeMap::new(),
                node_meta: node.meta,
                service_kind: "",
                service_id: service_id(i),
                service_name: i.service.name.to_string(),
                service_tags: tags(i),
                service_address: address.to_string(),
                service_port: port.unwrap_or(0),
                service_meta: i.service.kv.clone(),
                service_weights: WEIGHTS,
                service_enable_tag_override: false,
                create_index: index,
                modify_index: index,
            }
        })
        .collect();
    reply(index, &entries)
}

async fn health_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(query): RawQuery,
) -> Response {
    let shared = &api.0 .0;
    let (index, instances) = match one_service(shared, &name, &query).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let entries: Vec<HealthEntry> = instances
        .iter()
        .map(|i| {
            let node = shared.node(i);
            let (address, port) = split_address(&i.service.address);
            let id = service_id(i);
            let tags = tags(i);
            let mut output = format!("announced status {}", i.status);
            if !i.service.version.is_empty() {
                let _ = write!(output, ", version {}", i.service.version);
            }
            HealthEntry {
                checks: vec![HealthCheck {
                    node: node.node.clone(),
                    check_id: format!("service:{id}"),
                    name: format!("Service '{}' check", i.service.name),
                    status: i.status.as_str(),
                    notes: String::new(),
                    output,
                    service_id: id.clone(),
                    service_name: i.service.name.to_string(),
                    service_tags: tags.clone(),
                    kind: "ttl",
                    create_index: index,
                    modify_index: index,
                }],
                service: HealthService {
                    id,
                    service: i.service.name.to_string(),
                    tags,
                    address: address.to_string(),
                    meta: i.service.kv.clone(),
                    port: port.unwrap_or(0),
                    weights: WEIGHTS,
                    enable_tag_override: false,
                    create_index: index,
                    modify_index: index,
                },
                node: HealthNode {
                    id: node.id,
                    node: node.node,
                    address: node.address,
                    datacenter: node.datacenter,
                    tagged_addresses: BTreeMap::new(),
                    meta: node.meta,
                    create_index: index,
                    modify_index: index,
                },
            }
        })
        .collect();
    reply(index, &entries)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse_like_go_durations() {
        assert_eq!(parse_wait("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_wait("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_wait("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_wait("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_wait("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_wait("0"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "10x", "-1s", "1..2s"] {
            assert_eq!(parse_wait(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn addresses_split_at_the_last_colon() {
        assert_eq!(split_address("10.0.0.7:8080"), ("10.0.0.7", Some(8080)));
        assert_eq!(split_address("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_address("/tmp/a.sock"), ("/tmp/a.sock", None));
        assert_eq!(split_address("host:http"), ("host:http", None));
    }

    #[test]
    fn node_ids_are_stable_and_uuid_shaped() {
        let id = node_id("host-a");
        assert_eq!(id, node_id("host-a"));
        assert_ne!(id, node_id("host-b"));
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
    }
}
