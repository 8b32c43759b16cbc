//! The Consul-compatible HTTP API, over the in-memory bus and a real TCP
//! listener: every endpoint and field, blocking queries, and a Consul client
//! written by others reading it.
#![cfg(feature = "http")]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pubsub_registry::http::{router, HttpConfig};
use pubsub_registry::{MemoryBus, Registry, Service, Status};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long a test waits for something that should happen.
const DEADLINE: Duration = Duration::from_secs(10);

struct Api {
    bus: MemoryBus,
    /// The registry behind the HTTP API, kept alive with it.
    _observer: Registry,
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

struct Answer {
    status: u16,
    index: u64,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Api {
    async fn start() -> Api {
        Self::start_with(HttpConfig::new(), |b| b).await
    }

    async fn start_with(
        config: HttpConfig,
        builder: impl FnOnce(pubsub_registry::RegistryBuilder) -> pubsub_registry::RegistryBuilder,
    ) -> Api {
        let bus = MemoryBus::new();
        let observer = builder(Registry::builder().memory(&bus).host_name("observer-host"))
            .build()
            .await
            .unwrap();
        let base = serve(&observer, config).await;
        Api {
            bus,
            _observer: observer,
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A registry on the same bus, as another process would have.
    async fn peer(&self) -> Registry {
        Registry::builder()
            .memory(&self.bus)
            .host_name("host-a")
            .build()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Answer {
        fetch(&self.client, &self.base, path).await
    }

    /// GETs `path` until `cond` holds on the body; fails after [`DEADLINE`].
    async fn get_until(&self, path: &str, cond: impl Fn(&Value) -> bool) -> Answer {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let a = self.get(path).await;
            if cond(&a.body) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} never matched; last: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Serves the API over `registry` on a free port; returns its base URL.
async fn serve(registry: &Registry, config: HttpConfig) -> String {
    let app = router(registry.clone(), config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

async fn fetch(client: &Client<HttpConnector, Empty<Bytes>>, base: &str, path: &str) -> Answer {
    let uri: axum::http::Uri = format!("{base}{path}").parse().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.get(uri))
        .await
        .unwrap_or_else(|_| panic!("GET {path} did not answer"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let index = headers
        .get("x-consul-index")
        .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
    Answer {
        status,
        index,
        headers,
        body,
    }
}

fn web(address: &str) -> Service {
    Service::new("web", address)
        .with_url(format!("http://{address}/"))
        .with_version("1.4.2")
        .with_kv("tags", "http, primary,,")
        .with_kv("zone", "eu-1")
        .with_kv("node-meta.rack", "r7")
}

fn len(v: &Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_self_names_the_datacenter_and_node() {
    let api = Api::start().await;
    let a = api.get("/v1/agent/self").await;
    assert_eq!(a.status, 200);
    assert!(a.index > 0);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["x-consul-knownleader"], "true");
    assert_eq!(a.headers["x-consul-lastcontact"], "0");
    let top = a.body.as_object().expect("an object");
    assert!(top.contains_key("Config") && top.contains_key("Member"));
    for (key, value) in top {
        assert!(value.is_object(), "{key} is not an object: {value}");
    }
    assert_eq!(a.body["Config"]["Datacenter"], "dc1");
    assert_eq!(a.body["Config"]["NodeName"], "observer-host");

    let api = Api::start_with(
        HttpConfig::new().datacenter("eu-west").node_name("edge-1"),
        |b| b,
    )
    .await;
    let a = api.get("/v1/agent/self").await;
    assert_eq!(a.body["Config"]["Datacenter"], "eu-west");
    assert_eq!(a.body["Config"]["NodeName"], "edge-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_services_maps_names_to_tags() {
    let api = Api::start().await;
    let a = api.get("/v1/catalog/services").await;
    assert_eq!((a.status, a.body.clone()), (200, json!({})));
    assert!(a.index > 0);

    let peer = api.peer().await;
    peer.register(web("10.0.0.7:8080")).await.unwrap();
    peer.register(web("10.0.0.8:8080").with_kv("tags", "canary"))
        .await
        .unwrap();
    let db = Service::new("billing.db", "10.0.0.9:5432");
    peer.register(db.clone()).await.unwrap();
    let a = api
        .get_until("/v1/catalog/services", |b| {
            b.as_object().unwrap().len() == 2 && len(&b["web"]) == 3
        })
        .await;
    assert_eq!(
        a.body,
        json!({"billing.db": [], "web": ["canary", "http", "primary"]})
    );

    let filtered = api.get("/v1/catalog/services?node-meta=rack:r7").await;
    assert_eq!(filtered.body, json!({"web": ["canary", "http", "primary"]}));

    peer.unregister(&db).await.unwrap();
    let after = api
        .get_until("/v1/catalog/services", |b| b.get("billing.db").is_none())
        .await;
    assert!(after.index > a.index, "{} > {}", after.index, a.index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_service_entries_carry_every_consul_field() {
    let api = Api::start().await;
    let peer = api.peer().await;
    peer.register(web("10.0.0.7:8080")).await.unwrap();
    let a = api
        .get_until("/v1/catalog/service/web", |b| len(b) == 1)
        .await;
    assert_eq!(a.status, 200);
    assert!(a.index > 1);
    let e = &a.body[0];
    assert_eq!(e["Node"], "host-a");
    assert_eq!(e["Address"], "10.0.0.7");
    assert_eq!(e["Datacenter"], "dc1");
    assert_eq!(e["ID"].as_str().unwrap().len(), 36);
    assert_eq!(e["ServiceID"], "web-10.0.0.7:8080");
    assert_eq!(e["ServiceName"], "web");
    assert_eq!(e["ServiceAddress"], "10.0.0.7");
    assert_eq!(e["ServicePort"], json!(8080));
    assert!(e["ServicePort"].is_u64());
    assert_eq!(e["ServiceTags"], json!(["http", "primary"]));
    assert_eq!(
        e["ServiceMeta"],
        json!({"tags": "http, primary,,", "zone": "eu-1", "node-meta.rack": "r7"})
    );
    assert_eq!(e["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(e["NodeMeta"], json!({"host": "host-a", "rack": "r7"}));

    // An IPv6 address loses its brackets; a unix socket has no port.
    peer.register(Service::new("web", "[::1]:9090").with_kv("tags", "v6"))
        .await
        .unwrap();
    peer.register(Service::new("sock", "/tmp/sock.sock"))
        .await
        .unwrap();
    let a = api
        .get_until("/v1/catalog/service/web?tag=v6", |b| len(b) == 1)
        .await;
    assert_eq!(a.body[0]["ServiceAddress"], "::1");
    assert_eq!(a.body[0]["ServicePort"], 9090);
    let a = api
        .get_until("/v1/catalog/service/sock", |b| len(b) == 1)
        .await;
    assert_eq!(a.body[0]["ServiceAddress"], "/tmp/sock.sock");
    assert_eq!(a.body[0]["ServicePort"], 0);

    let a = api
        .get("/v1/catalog/service/web?tag=http&tag=primary")
        .await;
    assert_eq!(len(&a.body), 1);
    let a = api.get("/v1/catalog/service/web?node-meta=rack:r7").await;
    assert_eq!(len(&a.body), 1);
    let a = api.get("/v1/catalog/service/web?node-meta=rack:r8").await;
    assert_eq!(len(&a.body), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_entries_report_status_as_a_check() {
    let api = Api::start().await;
    let peer = api.peer().await;
    let a = web("10.0.0.7:8080");
    let b = web("10.0.0.8:8080").with_kv("tags", "http");
    peer.register(a.clone()).await.unwrap();
    peer.register(b.clone()).await.unwrap();
    peer.set_service_status(&b, Status::Warning).await.unwrap();
    let all = api
        .get_until("/v1/health/service/web", |body| {
            len(body) == 2 && body[1]["Checks"][0]["Status"] == "warning"
        })
        .await;
    assert_eq!(all.status, 200);
    let e = &all.body[0];
    let node = e["Node"].as_object().unwrap();
    assert_eq!(node["Node"], "host-a");
    assert_eq!(node["Address"], "10.0.0.7");
    assert_eq!(node["Datacenter"], "dc1");
    assert_eq!(node["Meta"], json!({"host": "host-a", "rack": "r7"}));
    let svc = e["Service"].as_object().unwrap();
    assert_eq!(svc["ID"], "web-10.0.0.7:8080");
    assert_eq!(svc["Service"], "web");
    assert_eq!(svc["Address"], "10.0.0.7");
    assert_eq!(svc["Port"], json!(8080));
    assert_eq!(svc["Tags"], json!(["http", "primary"]));
    assert_eq!(svc["Meta"]["zone"], "eu-1");
    let checks = e["Checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0]["CheckID"], "service:web-10.0.0.7:8080");
    assert_eq!(checks[0]["Name"], "Service 'web' check");
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(checks[0]["ServiceID"], "web-10.0.0.7:8080");
    assert_eq!(checks[0]["ServiceName"], "web");
    assert_eq!(all.body[1]["Checks"][0]["Status"], "warning");

    let passing = api.get("/v1/health/service/web?passing").await;
    assert_eq!(len(&passing.body), 1);
    assert_eq!(passing.body[0]["Service"]["Address"], "10.0.0.7");
    assert_eq!(
        len(&api.get("/v1/health/service/web?passing=true").await.body),
        1
    );
    assert_eq!(
        len(&api.get("/v1/health/service/web?passing=false").await.body),
        2
    );
    assert_eq!(
        api.get("/v1/health/service/web?passing=maybe").await.status,
        400
    );

    let tagged = api.get("/v1/health/service/web?tag=http").await;
    assert_eq!(len(&tagged.body), 2);
    let tagged = api.get("/v1/health/service/web?tag=http&tag=primary").await;
    assert_eq!(len(&tagged.body), 1);
    let meta = api
        .get("/v1/health/service/web?node-meta=host:host-a")
        .await;
    assert_eq!(len(&meta.body), 2);
    let meta = api
        .get("/v1/health/service/web?node-meta=host:elsewhere")
        .await;
    assert_eq!(len(&meta.body), 0);

    // Critical shows up as critical, and the index moves with it.
    peer.set_service_status(&a, Status::Critical).await.unwrap();
    let after = api
        .get_until("/v1/health/service/web", |body| {
            body[0]["Checks"][0]["Status"] == "critical"
        })
        .await;
    assert!(after.index > all.index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_answer_an_empty_list() {
    let api = Api::start().await;
    for path in [
        "/v1/catalog/service/nobody",
        "/v1/health/service/nobody",
        "/v1/health/service/not%20a%20valid%20name",
        "/v1/catalog/service/a.b.c",
    ] {
        let a = api.get(path).await;
        assert_eq!((a.status, a.body), (200, json!([])), "{path}");
        assert!(a.index > 0, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_answer_like_consul() {
    let api = Api::start().await;
    assert_eq!(api.get("/v1/catalog/services?index=x").await.status, 400);
    assert_eq!(
        api.get("/v1/catalog/services?index=1&wait=soon")
            .await
            .status,
        400
    );
    assert_eq!(
        api.get("/v1/health/service/web?filter=Service.Port==80")
            .await
            .status,
        400
    );
    let a = api.get("/v1/catalog/services?dc=elsewhere").await;
    assert_eq!(a.status, 500);
    assert_eq!(api.get("/v1/catalog/services?dc=dc1").await.status, 200);
    // Options that change nothing here are accepted.
    assert_eq!(
        api.get("/v1/catalog/services?stale&consistent&cached")
            .await
            .status,
        200
    );
}

/// Starts a blocking GET, checks it is still held, runs `change`, and
/// checks the GET then answers at once.
async fn blocks_until_change(
    api: &Api,
    path_without_index: &str,
    change: impl std::future::Future<Output = ()>,
) -> (Answer, Answer) {
    let before = api.get(path_without_index).await;
    let sep = if path_without_index.contains('?') {
        '&'
    } else {
        '?'
    };
    let path = format!("{path_without_index}{sep}index={}&wait=60s", before.index);
    let mut pending = {
        let (client, base, path) = (api.client.clone(), api.base.clone(), path.clone());
        tokio::spawn(async move { fetch(&client, &base, &path).await })
    };
    // A blocking query has nothing to answer yet: it must still be held.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending)
            .await
            .is_err(),
        "{path} answered before anything changed"
    );
    let changed = Instant::now();
    change.await;
    let after = tokio::time::timeout(DEADLINE, pending)
        .await
        .unwrap_or_else(|_| panic!("{path} still held after the change"))
        .unwrap();
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "{path} took {:?} to answer",
        changed.elapsed()
    );
    assert!(after.index > before.index, "{path}: index did not grow");
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_return_as_soon_as_a_service_registers() {
    let api = Api::start().await;
    let peer = api.peer().await;

    let (_, after) = blocks_until_change(&api, "/v1/health/service/web", async {
        peer.register(web("10.0.0.7:8080")).await.unwrap();
    })
    .await;
    assert_eq!(len(&after.body), 1);

    let (_, after) = blocks_until_change(&api, "/v1/catalog/services", async {
        peer.register(Service::new("late", "10.0.0.1:1"))
            .await
            .unwrap();
    })
    .await;
    assert!(after.body.get("late").is_some());

    let (_, after) = blocks_until_change(&api, "/v1/catalog/service/web?tag=http", async {
        peer.register(web("10.0.0.8:8080")).await.unwrap();
    })
    .await;
    assert_eq!(len(&after.body), 2);

    let (_, after) = blocks_until_change(&api, "/v1/health/service/web", async {
        peer.unregister(&web("10.0.0.8:8080")).await.unwrap();
    })
    .await;
    assert_eq!(len(&after.body), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_time_out_at_wait_with_the_same_index() {
    let api = Api::start().await;
    let peer = api.peer().await;
    peer.register(web("10.0.0.7:8080")).await.unwrap();
    api.get_until("/v1/catalog/service/web", |b| len(b) == 1)
        .await;
    for path in [
        "/v1/agent/self",
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/health/service/web",
        "/v1/health/service/nobody",
    ] {
        let first = api.get(path).await;
        let started = Instant::now();
        let held = api
            .get(&format!("{path}?index={}&wait=200ms", first.index))
            .await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{path}: {took:?}");
        assert!(took < Duration::from_secs(5), "{path}: {took:?}");
        assert_eq!(held.status, 200, "{path}");
        assert_eq!(held.index, first.index, "{path}");
        assert_eq!(held.body, first.body, "{path}");
    }

    // An index the server never reached (it restarted) answers at once.
    let started = Instant::now();
    let a = api.get("/v1/catalog/services?index=999999&wait=30s").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(a.index < 999_999);
    // index=0 never blocks.
    let started = Instant::now();
    api.get("/v1/catalog/services?index=0&wait=30s").await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_instances_leave_the_catalog_and_move_the_index() {
    use pubsub_registry::transport::Transport;

    let api = Api::start().await;
    // A peer that announces once and falls silent, without unregistering.
    let payload = pubsub_registry::protocol::encode_announcement(
        &Service::new("mute", "10.0.0.2:2").with_host("host-m"),
        Status::Passing,
        std::time::SystemTime::now(),
        Duration::from_millis(400),
    );
    api.bus
        .publish("registry.register.mute".into(), None, payload.into())
        .await
        .unwrap();
    let seen = api
        .get_until("/v1/health/service/mute", |b| len(b) == 1)
        .await;
    let services = api.get("/v1/catalog/services").await;
    assert!(services.body.get("mute").is_some());
    let gone = api
        .get_until("/v1/health/service/mute", |b| len(b) == 0)
        .await;
    assert!(gone.index > seen.index);
    let services_after = api.get("/v1/catalog/services").await;
    assert!(services_after.body.get("mute").is_none());
    assert!(services_after.index > services.index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_follower_rebuilds_from_the_cache() {
    // One event of room: registering many services at once makes the
    // follower miss some, and it must still show all of them.
    let api = Api::start_with(HttpConfig::new(), |b| b.event_capacity(1)).await;
    let peer = api.peer().await;
    for n in 0..50 {
        peer.register(Service::new(format!("svc{n}"), "10.0.0.1:1"))
            .await
            .unwrap();
    }
    let a = api
        .get_until("/v1/catalog/services", |b| {
            b.as_object().unwrap().len() == 50
        })
        .await;
    let one = api.get("/v1/health/service/svc49").await;
    assert_eq!(len(&one.body), 1);
    assert!(one.index > 1 && a.index > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_client_reads_the_catalog() {
    let api = Api::start().await;
    let peer = api.peer().await;
    peer.register(web("10.0.0.7:8080")).await.unwrap();
    peer.register(web("10.0.0.8:8081")).await.unwrap();
    peer.set_service_status(&web("10.0.0.8:8081"), Status::Critical)
        .await
        .unwrap();
    peer.register(Service::new("db", "10.0.0.9:5432"))
        .await
        .unwrap();
    api.get_until("/v1/health/service/web", |b| {
        len(b) == 2 && b[1]["Checks"][0]["Status"] == "critical"
    })
    .await;
    api.get_until("/v1/catalog/services", |b| b.get("db").is_some())
        .await;

    let consul = rs_consul::Consul::new(rs_consul::Config {
        address: api.base.clone(),
        token: None,
        ..Default::default()
    });
    let names = consul
        .get_all_registered_service_names(None)
        .await
        .expect("catalog services");
    let mut got = names.response.clone();
    got.sort();
    assert_eq!(got, ["db", "web"]);
    assert!(names.index > 0);

    let nodes = consul
        .get_service_nodes(
            rs_consul::GetServiceNodesRequest {
                service: "web",
                passing: false,
                ..Default::default()
            },
            None,
        )
        .await
        .expect("health service");
    let found: BTreeMap<String, (String, u16, Vec<String>)> = nodes
        .response
        .iter()
        .map(|n| {
            (
                n.service.id.clone(),
                (
                    n.service.address.clone(),
                    n.service.port,
                    n.service.tags.clone(),
                ),
            )
        })
        .collect();
    assert_eq!(found.len(), 2);
    assert_eq!(
        found["web-10.0.0.7:8080"],
        (
            "10.0.0.7".to_string(),
            8080,
            vec!["http".into(), "primary".into()]
        )
    );
    assert_eq!(nodes.response[0].node.node, "host-a");
    assert_eq!(nodes.response[0].node.datacenter, "dc1");

    // Its own shortcut asks for passing instances only.
    let healthy = consul
        .get_service_addresses_and_ports("web", None)
        .await
        .expect("addresses");
    assert_eq!(healthy, [("10.0.0.7".to_string(), 8080)]);
    assert!(consul
        .get_service_addresses_and_ports("nobody", None)
        .await
        .unwrap()
        .is_empty());

    // A blocking query through the client returns when the service changes.
    let index = nodes.index;
    let waiter = tokio::spawn(async move {
        consul
            .get_service_nodes(
                rs_consul::GetServiceNodesRequest {
                    service: "web",
                    ..Default::default()
                },
                Some(rs_consul::QueryOptions {
                    index: Some(index),
                    wait: Some(Duration::from_secs(60)),
                    timeout: Some(Duration::from_secs(90)),
                    ..Default::default()
                }),
            )
            .await
    });
    peer.set_service_status(&web("10.0.0.8:8081"), Status::Passing)
        .await
        .unwrap();
    let changed = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the blocking query answered")
        .unwrap()
        .expect("health service");
    assert!(changed.index > index);
    assert_eq!(changed.response.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_late_shows_running_services_at_once() {
    let api = Api::start().await;
    let peer = api.peer().await;
    peer.register(web("10.0.0.7:8080")).await.unwrap();
    api.get_until("/v1/health/service/web", |b| len(b) == 1)
        .await;

    // A new router, long after the announcement and 20 s before the next
    // heartbeat: its "ping all" brings the instance in.
    let late = Registry::builder().memory(&api.bus).build().await.unwrap();
    let late_api = Api {
        bus: api.bus.clone(),
        base: serve(&late, HttpConfig::new()).await,
        _observer: late,
        client: api.client.clone(),
    };
    let a = late_api
        .get_until("/v1/catalog/services", |b| b.get("web").is_some())
        .await;
    assert_eq!(a.body, json!({"web": ["http", "primary"]}));
}
