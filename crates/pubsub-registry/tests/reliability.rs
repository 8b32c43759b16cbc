#![cfg(feature = "nats")]
//! Breaking things on purpose over NATS: server restarts, cluster failover,
//! ping storms, thousands of instances, crashes and shutdowns.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::{eventually, expect_events, next_event, DEADLINE, FIND};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use pubsub_registry::transport::{Messages, Subject, Topic, Transport};
use pubsub_registry::{Error, EventKind, EventStream, Lookup, NatsTransport, Registry, Service};
use registry_harness::{NatsCluster, NatsServer};
use tokio::time::Instant;

async fn nats_server() -> NatsServer {
    tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn svc(name: &str, addr: &str) -> Service {
    Service::new(name, addr)
}

/// Events already delivered, without waiting (and without tokio's
/// cooperative budget cutting the loop short).
fn drain(events: &mut EventStream) -> Vec<pubsub_registry::Event> {
    let mut out = Vec::new();
    while let Some(Some(ev)) = tokio::task::unconstrained(events.next()).now_or_never() {
        out.push(ev.expect("lagged"));
    }
    out
}

/// A transport that can be made to go silent at once, as a crashed process
/// does: no unregister, no more announcements.
struct Crashable {
    inner: Arc<dyn Transport>,
    dead: AtomicBool,
}

impl Transport for Crashable {
    fn publish(
        &self,
        s: Subject,
        r: Option<Subject>,
        p: Bytes,
    ) -> BoxFuture<'_, pubsub_registry::Result<()>> {
        if self.dead.load(Ordering::SeqCst) {
            return Box::pin(async { Ok(()) });
        }
        self.inner.publish(s, r, p)
    }
    fn subscribe(&self, topic: Topic) -> BoxFuture<'_, pubsub_registry::Result<Messages>> {
        self.inner.subscribe(topic)
    }
    fn flush(&self) -> BoxFuture<'_, pubsub_registry::Result<()>> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "crashable".into()
    }
}

/// A subject with a space or a line break in it would end the protocol
/// line early, and the rest would go to the server as another subject or
/// another command. The transport refuses it with an error, sends nothing,
/// and its connection goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_that_would_break_the_protocol_line_is_refused() {
    let server = nats_server().await;
    let url = server.url();
    // Everywhere the bad subjects would land, if anything went out: `a b`
    // is subject `a` with reply `b`, and a line break starts a command.
    let watcher = NatsTransport::connect(&url).await.unwrap();
    let mut watched = Vec::new();
    for pattern in ["a", "a\u{1}", "ok.>", "registry.>", "leaked"] {
        watched.push(
            watcher
                .subscribe(Topic::Pattern(pattern.into()))
                .await
                .unwrap(),
        );
    }
    let mut seen = futures_util::stream::select_all(watched);
    watcher.flush().await.unwrap();
    let nats = NatsTransport::connect(&url).await.unwrap();
    for bad in [
        "",
        "a b",
        "a\tb",
        "registry.ping.x\r\nPUB leaked 0",
        "a\u{1}",
    ] {
        let e = nats
            .publish(bad.into(), None, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Transport { op: "publish", .. }),
            "{bad:?}: {e}"
        );
        let e = nats
            .publish("ok.a".into(), Some(bad.into()), Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Transport { op: "publish", .. }),
            "{bad:?}: {e}"
        );
    }
    nats.publish("ok.after".into(), None, Bytes::from_static(b"y"))
        .await
        .unwrap();
    let first = tokio::time::timeout(DEADLINE, seen.next())
        .await
        .expect("the valid message arrives")
        .unwrap();
    assert_eq!(first.subject, "ok.after", "nothing else was sent before it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_announces_again_at_once() {
    let mut server = nats_server().await;
    let url = server.url();
    // The default 20 s heartbeat: anything seen again sooner was not a
    // heartbeat.
    let publisher = Registry::builder()
        .nats_url(&url)
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    let observer = Registry::builder()
        .nats_url(&url)
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    observer.observe("svc").await.unwrap();
    let mut events = observer.events_for("svc");
    publisher.register(svc("svc", "10.0.0.1:1")).await.unwrap();
    next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;

    tokio::task::block_in_place(|| server.stop());

    // While the server is away: the cache answers, a miss gives up at its
    // deadline, a registration is kept.
    assert_eq!(
        observer.get_service("svc").await.unwrap().address(),
        "10.0.0.1:1"
    );
    let started = Instant::now();
    let miss = observer
        .get_service_with("absent", &Lookup::new().timeout(Duration::from_millis(300)))
        .await;
    assert!(matches!(miss, Err(Error::NotFound { .. })), "{miss:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "hung past its deadline: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    publisher.register(svc("svc", "10.0.0.2:2")).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "register hung: {:?}",
        started.elapsed()
    );

    tokio::task::block_in_place(|| server.restart()).unwrap();
    let back = Instant::now();
    next_event(&mut events, EventKind::Registered, "10.0.0.2:2").await;
    let took = back.elapsed();
    println!("registered-while-down service seen {took:?} after the server accepted connections");
    assert!(
        took < Duration::from_secs(5),
        "not announced at once: {took:?}"
    );

    // A fresh client finds both.
    let fresh = Registry::builder()
        .nats_url(&url)
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    observer.get_service("svc").await.unwrap();
    eventually("both instances at a fresh client", || async {
        fresh
            .get_services("svc")
            .await
            .map(|i| i.len())
            .unwrap_or(0)
            == 2
    })
    .await;
    assert!(drain(&mut events)
        .iter()
        .all(|e| e.kind != EventKind::Expired));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_loses_nothing() {
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let urls = cluster.urls();
    let ordered = |first: usize| {
        let mut list = vec![urls[first].clone()];
        list.extend(
            urls.iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, u)| u.clone()),
        );
        list.join(",")
    };
    let options = || {
        async_nats::ConnectOptions::new()
            .retain_servers_order()
            .reconnect_delay_callback(|_| Duration::from_millis(50))
    };
    let interval = Duration::from_secs(1);
    let publisher = Registry::builder()
        .nats_options(ordered(0), options())
        .register_interval(interval)
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    let observer = Registry::builder()
        .nats_options(ordered(1), options())
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    observer.observe_all().await.unwrap();
    let mut events = observer.events();
    let addrs: Vec<String> = (0..20).map(|i| format!("10.0.1.{i}:1")).collect();
    for a in &addrs {
        publisher.register(svc("clustered", a)).await.unwrap();
    }
    let expected: Vec<(EventKind, &str)> = addrs
        .iter()
        .map(|a| (EventKind::Registered, a.as_str()))
        .collect();
    expect_events(&mut events, &expected).await;

    // Every cached instance heard from after `since` plus a due time: had the
    // failover taken longer than that, they would have expired.
    let heard_after = |since: SystemTime| {
        let observer = observer.clone();
        async move {
            let due = since + interval.mul_f64(1.5);
            let cached = observer.cached_instances();
            cached.len() == 20 && cached.iter().all(|i| i.last_heard() > due)
        }
    };

    // Node A, the publisher's, dies; then node B, the observer's.
    for (node, what) in [
        (0, "publisher failed over and kept announcing"),
        (1, "observer failed over and its cache is whole"),
    ] {
        let killed = SystemTime::now();
        tokio::task::block_in_place(|| cluster.node(node).stop());
        eventually(what, || heard_after(killed)).await;
        let seen = drain(&mut events);
        assert!(
            seen.iter().all(|e| e.kind != EventKind::Expired),
            "expired during failover of node {node}: {seen:?}"
        );
    }
    assert_eq!(observer.get_services("clustered").await.unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_storm_costs_each_instance_a_few_announcements() {
    let server = nats_server().await;
    let url = server.url();
    let raw: Arc<dyn Transport> = Arc::new(NatsTransport::connect(&url).await.unwrap());
    let mut wire = raw
        .subscribe(Topic::Pattern("registry.register.>".into()))
        .await
        .unwrap();
    raw.flush().await.unwrap();

    let publisher = Registry::builder().nats_url(&url).build().await.unwrap();
    publisher
        .register(svc("storm", "10.0.0.1:1"))
        .await
        .unwrap();

    // 1,000 cold clients over 20 connections.
    let mut connections: Vec<Arc<dyn Transport>> = Vec::new();
    for _ in 0..20 {
        connections.push(Arc::new(NatsTransport::connect(&url).await.unwrap()));
    }
    let mut clients = Vec::new();
    for i in 0..1000 {
        let client = Registry::builder()
            .transport(connections[i % 20].clone())
            .timeout(FIND)
            .build()
            .await
            .unwrap();
        clients.push(client);
    }
    let started = Instant::now();
    let lookups: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.get_service("storm").await })
        })
        .collect();
    for l in lookups {
        assert_eq!(
            l.await.unwrap().unwrap().address(),
            "10.0.0.1:1",
            "every pinger is served"
        );
    }
    let burst = started.elapsed();

    // A marker on the publisher's connection comes after all it announced.
    publisher
        .transport()
        .publish("registry.register.zz-marker".into(), None, Bytes::new())
        .await
        .unwrap();
    let mut announcements = 0;
    loop {
        let m = tokio::time::timeout(DEADLINE, wire.next())
            .await
            .unwrap()
            .unwrap();
        if m.subject.ends_with("zz-marker") {
            break;
        }
        announcements += 1;
    }
    let windows = (burst.as_millis() / 50) as usize + 1;
    println!(
        "1000 lookups in {burst:?}: {announcements} announcements ({} pings answered)",
        publisher.stats().pings_answered
    );
    // One on register, then at most one per 50 ms window of the burst, plus
    // one trailing answer.
    assert!(
        announcements <= 2 + windows,
        "{announcements} announcements in {windows} windows"
    );
    assert!(
        announcements < 100,
        "{announcements} announcements for 1000 pings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_instances_converge_then_a_crash_expires() {
    let server = nats_server().await;
    let url = server.url();
    let interval = Duration::from_secs(2);
    let observers: Vec<Registry> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            let o = Registry::builder()
                .nats_url(&url)
                .event_capacity(1 << 15)
                .build()
                .await
                .unwrap();
            o.observe_all().await.unwrap();
            v.push(o);
        }
        v
    };
    let mut crashed_events: Vec<EventStream> = observers.iter().map(|o| o.events()).collect();

    let mut expected = BTreeSet::new();
    let mut crashable = None;
    let mut publishers = Vec::new();
    for p in 0..10 {
        let nats: Arc<dyn Transport> = Arc::new(NatsTransport::connect(&url).await.unwrap());
        let transport = Arc::new(Crashable {
            inner: nats,
            dead: AtomicBool::new(false),
        });
        if p == 0 {
            crashable = Some(transport.clone());
        }
        let publisher = Registry::builder()
            .transport(transport)
            .register_interval(interval)
            .build()
            .await
            .unwrap();
        for i in 0..1000 {
            let name = format!("svc-{i}");
            let address = format!("10.{p}.{}.{}:80", i / 256, i % 256);
            publisher.register(svc(&name, &address)).await.unwrap();
            expected.insert((name, address));
        }
        publishers.push(publisher);
    }
    let set = |o: &Registry| -> BTreeSet<(String, String)> {
        o.cached_instances()
            .iter()
            .map(|i| (i.name().to_string(), i.address().to_string()))
            .collect()
    };
    for (n, o) in observers.iter().enumerate() {
        eventually(&format!("observer {n} holds 10,000 instances"), || async {
            o.stats().instances >= 10_000
        })
        .await;
        assert_eq!(
            set(o),
            expected,
            "observer {n}: nothing missing, nothing extra"
        );
        assert_eq!(o.observed_service_names().len(), 1000);
    }

    // Publisher 0 crashes: its 1,000 instances expire everywhere.
    crashable.unwrap().dead.store(true, Ordering::SeqCst);
    let survivors: BTreeSet<_> = expected
        .iter()
        .filter(|(_, a)| !a.starts_with("10.0."))
        .cloned()
        .collect();
    for (n, o) in observers.iter().enumerate() {
        eventually(
            &format!("observer {n} dropped the crashed instances"),
            || async { o.stats().instances == 9_000 },
        )
        .await;
        assert_eq!(set(o), survivors, "observer {n}");
        let expired: Vec<_> = drain(&mut crashed_events[n])
            .into_iter()
            .filter(|e| e.kind == EventKind::Expired)
            .collect();
        assert_eq!(
            expired.len(),
            1000,
            "observer {n}: one Expired per crashed instance"
        );
        assert!(expired
            .iter()
            .all(|e| e.instance.address().starts_with("10.0.")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_instances_expire_on_time_among_ten_thousand() {
    let server = nats_server().await;
    let url = server.url();
    let observer = Registry::builder()
        .nats_url(&url)
        .event_capacity(1 << 15)
        .build()
        .await
        .unwrap();
    observer.observe_all().await.unwrap();
    let raw = NatsTransport::connect(&url).await.unwrap();
    for i in 0..10_000 {
        let payload = format!(
            r#"{{"name":"long-{}","add":"10.1.{}.{}:1","t":{{"Duration":600000}}}}"#,
            i % 100,
            i / 256,
            i % 256
        );
        raw.publish(
            format!("registry.register.long-{}", i % 100).into(),
            None,
            payload.into(),
        )
        .await
        .unwrap();
    }
    eventually("10,000 tracked", || async {
        observer.stats().instances == 10_000
    })
    .await;

    let mut events = observer.events();
    for i in 0..100 {
        let payload = format!(r#"{{"name":"short","add":"10.2.0.{i}:1","t":{{"Duration":300}}}}"#);
        raw.publish("registry.register.short".into(), None, payload.into())
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
    let due = Duration::from_millis(450);
    let mut lateness = Vec::new();
    let mut expired = 0;
    while expired < 100 {
        let ev = tokio::time::timeout(DEADLINE, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ev.kind == EventKind::Expired {
            let lived = SystemTime::now()
                .duration_since(ev.instance.last_heard())
                .unwrap();
            // last_heard has millisecond resolution.
            assert!(
                lived + Duration::from_millis(1) >= due,
                "expired early: {lived:?}"
            );
            lateness.push(lived - due.min(lived));
            expired += 1;
        }
    }
    lateness.sort();
    println!(
        "expiry lateness p50 {:?} max {:?}",
        lateness[50], lateness[99]
    );
    assert_eq!(
        observer.stats().instances,
        10_000,
        "only the crashed ones went"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_example_unregisters() {
    let server = nats_server().await;
    let example = common::example("server");
    let observer = Registry::builder()
        .nats_url(server.url())
        .build()
        .await
        .unwrap();
    observer.observe("myservice").await.unwrap();
    let mut events = observer.events_for("myservice");
    let mut child = tokio::process::Command::new(&example)
        .env("NATS_URL", server.url())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ev = tokio::time::timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, EventKind::Registered);
    let address = ev.instance.address().to_string();

    let pid = child.id().unwrap() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let ev = next_event(&mut events, EventKind::Unregistered, &address).await;
    assert_eq!(ev.instance.name(), "myservice");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
