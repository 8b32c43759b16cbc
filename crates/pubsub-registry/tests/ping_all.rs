//! The "ping all" extension: one message makes every instance registered by
//! a registry of this crate announce itself, and it disturbs no observer.

mod common;

use common::{eventually, Env};
use pubsub_registry::{Service, Status};

async fn an_observer_fills_at_once_after_ping_all(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    a.register(Service::new("alpha", "10.0.0.1:1"))
        .await
        .unwrap();
    a.register(Service::new("beta.gamma", "10.0.0.2:2"))
        .await
        .unwrap();
    b.register(Service::new("delta", "10.0.0.3:3"))
        .await
        .unwrap();
    b.set_service_status(&Service::new("delta", "10.0.0.3:3"), Status::Warning)
        .await
        .unwrap();
    assert!(a
        .subscribers()
        .await
        .contains(&"registry.pingall".to_string()));

    // Started after every announcement: without ping all it would see
    // nothing before the next heartbeat, 20 s away.
    let late = env.registry().await;
    late.observe_all().await.unwrap();
    late.ping_all().await.unwrap();
    eventually("every instance announced", || async {
        late.observed_service_names() == ["alpha", "beta.gamma", "delta"]
    })
    .await;
    let delta = late.cached_service("delta", &[]).unwrap();
    assert_eq!(delta.status, Status::Warning);
    // Every registry here observes `<main>.>` or answers pings: none took
    // the extension's message for a malformed one.
    for r in [&a, &b, &late] {
        assert_eq!(r.stats().rejected, 0);
    }
    late.close().await.unwrap();
    assert!(late.ping_all().await.is_err(), "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    an_observer_fills_at_once_after_ping_all(Env::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats() {
    an_observer_fills_at_once_after_ping_all(Env::nats().await).await;
}
