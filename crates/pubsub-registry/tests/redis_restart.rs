//! Redis keeps nothing for a subscriber that is away, and a restarted
//! `redis-server` knows no subscription at all: these tests kill it, start
//! it again on the same port, and check that the registries put everything
//! back by themselves.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, SystemTime};

use common::{eventually, expect_events, next_event, DEADLINE, FIND};
use futures_util::StreamExt;
use pubsub_registry::transport::{Topic, Transport};
use pubsub_registry::{Error, EventKind, RedisTransport, Registry, Service};
use registry_harness::RedisServer;
use tokio::time::Instant;

/// Longer than any test here: whatever arrives again after the restart was
/// sent by the reconnection logic, not by a heartbeat.
const NO_HEARTBEAT: Duration = Duration::from_secs(120);

async fn start_redis() -> RedisServer {
    tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn restart(server: &mut RedisServer) {
    // Blocks for the few milliseconds the server takes to answer PING; the
    // other worker keeps the registries running meanwhile.
    tokio::task::block_in_place(|| server.restart()).unwrap_or_else(|e| panic!("{e}"));
}

async fn registry(url: &str) -> Registry {
    Registry::builder()
        .redis_url(url)
        .timeout(FIND)
        .register_interval(NO_HEARTBEAT)
        .build()
        .await
        .expect("build registry")
}

fn svc(name: &str, addr: &str) -> Service {
    Service::new(name, addr).with_url(format!("http://{addr}/"))
}

/// Waits until the registry's transport has noticed that Redis is gone.
async fn until_offline(registry: &Registry) {
    eventually("the registry notices Redis is gone", || async {
        registry.transport().flush().await.is_err()
    })
    .await;
}

/// Waits until the registry's transport is connected again (its
/// subscriptions are in place by then).
async fn until_online(transport: &dyn Transport) {
    eventually("the link to Redis is back", || async {
        transport.flush().await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_is_discoverable_again_after_redis_restarts() {
    let mut server = start_redis().await;
    let url = server.url();
    // Two registries with their own connections stand for two processes:
    // one registers, the other observes.
    let registrar = registry(&url).await;
    let observer = registry(&url).await;
    let everything = registry(&url).await;
    everything.observe_all().await.unwrap();
    for name in ["alpha", "beta.gamma"] {
        observer.observe(name).await.unwrap();
    }
    let mut events = observer.events();
    let mut all_events = everything.events();
    let before = [
        svc("alpha", "10.0.0.1:1"),
        svc("alpha", "10.0.0.2:2"),
        svc("beta.gamma", "10.0.0.3:3"),
    ];
    for s in &before {
        registrar.register(s.clone()).await.unwrap();
    }
    let registered: Vec<(EventKind, &str)> = before
        .iter()
        .map(|s| (EventKind::Registered, s.address.as_str()))
        .collect();
    expect_events(&mut events, &registered).await;
    expect_events(&mut all_events, &registered).await;

    server.stop();
    for r in [&registrar, &observer, &everything] {
        until_offline(r).await;
    }
    let outage = SystemTime::now();

    // While Redis is away nothing hangs: lookups answer from the cache,
    // registrations are kept, publishing fails at once with a typed error.
    let away = tokio::time::timeout(DEADLINE, async {
        assert_eq!(
            observer.get_services("alpha").await.unwrap().len(),
            2,
            "answered from the cache"
        );
        let late = svc("late", "10.0.0.4:4");
        registrar
            .register(late)
            .await
            .expect("kept while Redis is away");
        // May say that Redis is away; the subscription is kept either way
        // and made once Redis is back.
        let observed = observer.observe("late").await;
        assert!(
            matches!(observed, Ok(()) | Err(Error::Transport { .. })),
            "{observed:?}"
        );
        let started = Instant::now();
        let refused = registrar
            .transport()
            .publish("registry.x.y".into(), None, Default::default())
            .await;
        assert!(
            matches!(refused, Err(Error::Transport { .. })),
            "{refused:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
        // A lookup that misses the cache cannot ping: it fails, it does not
        // wait for Redis.
        assert!(observer.get_service("nobody").await.is_err());
    })
    .await;
    assert!(away.is_ok(), "a call hung while Redis was away");
    assert_eq!(registrar.registered_services().len(), 4);

    restart(&mut server);
    let back = Instant::now();

    // The observer hears every instance again (the registrar announces at
    // once on reconnection, and the observer pings the names it follows),
    // including the one registered during the outage.
    next_event(&mut events, EventKind::Registered, "10.0.0.4:4").await;
    eventually(
        "every instance is heard again after the restart",
        || async {
            ["alpha", "beta.gamma", "late"].iter().all(|name| {
                observer
                    .cached_instances()
                    .iter()
                    .filter(|i| i.name() == *name)
                    .all(|i| i.last_heard() > outage)
            }) && observer.cached_instances().len() == 4
        },
    )
    .await;
    eprintln!(
        "cache whole again {:?} after redis-server answered PING",
        back.elapsed()
    );

    // A newcomer finds everything, the late one included.
    let newcomer = registry(&url).await;
    for name in ["alpha", "beta.gamma", "late"] {
        newcomer.get_service(name).await.unwrap();
    }
    eventually("the newcomer caches every instance", || async {
        newcomer.cached_instances().len() == 4
    })
    .await;
    // The observe-all subscription is back too: the registry that follows
    // everything sees what is registered now, dotted names included.
    until_online(everything.transport().as_ref()).await;
    registrar
        .register(svc("after.the.storm", "10.0.0.5:5"))
        .await
        .unwrap();
    let ev = next_event(&mut all_events, EventKind::Registered, "10.0.0.5:5").await;
    assert_eq!(ev.instance.name(), "after.the.storm");
    assert_eq!(
        everything.get_service("late").await.unwrap().address(),
        "10.0.0.4:4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_restart_at_the_transport_level() {
    let mut server = start_redis().await;
    let url = server.url();
    let raw = RedisTransport::connect(&url).await.unwrap();
    let mut reconnects = raw.reconnects().expect("redis reports reconnections");
    let mut before = raw.subscribe(Topic::Pattern("t.*.x".into())).await.unwrap();
    let publisher = RedisTransport::connect(&url).await.unwrap();

    server.stop();
    eventually("the transport notices", || async { !raw.is_connected() }).await;
    // Neither call waits for Redis.
    let started = Instant::now();
    let mut during = raw
        .subscribe(Topic::Subject("t.exact".into()))
        .await
        .expect("recorded while Redis is away");
    assert!(matches!(
        raw.publish("t.a.x".into(), None, Default::default()).await,
        Err(Error::Transport { .. })
    ));
    assert!(matches!(raw.flush().await, Err(Error::Transport { .. })));
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast");

    restart(&mut server);
    tokio::time::timeout(DEADLINE, reconnects.changed())
        .await
        .expect("a reconnection is reported")
        .unwrap();
    // Reported only once the subscriptions are back: a message published
    // now reaches both, the one made during the outage included.
    until_online(&publisher).await;
    publisher
        .publish("t.a.x".into(), None, "one".into())
        .await
        .unwrap();
    publisher
        .publish("t.exact".into(), None, "two".into())
        .await
        .unwrap();
    let got = tokio::time::timeout(DEADLINE, before.next()).await.unwrap();
    assert_eq!(got.unwrap().payload, "one");
    let got = tokio::time::timeout(DEADLINE, during.next()).await.unwrap();
    assert_eq!(got.unwrap().payload, "two");
    assert!(raw.is_connected());
}
