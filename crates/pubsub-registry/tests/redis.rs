//! What only the Redis transport has to get right: NATS-style patterns
//! mapped to Redis globs, the number of connections, connection errors.
//! Everything else runs in the behaviour suite, on Redis too.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::{next_event, Env, DEADLINE, FIND};
use futures_util::StreamExt;
use pubsub_registry::transport::{Topic, Transport};
use pubsub_registry::{Error, EventKind, RedisTransport, Registry, Service};

fn svc(name: &str, addr: &str) -> Service {
    Service::new(name, addr).with_url(format!("http://{addr}/"))
}

fn url(env: &Env) -> String {
    match &env.broker {
        common::Broker::Redis(server) => server.url(),
        _ => unreachable!("a Redis env"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_all_sees_dotted_names_from_a_foreign_peer() {
    let env = Env::redis().await;
    let all = env.registry().await;
    let billing = env.registry().await;
    all.observe_all().await.unwrap();
    billing.observe("billing").await.unwrap();
    let mut events = all.events();
    let mut billing_events = billing.events();

    // As the Go package publishes it on Redis: the channel is the subject.
    let raw = env.raw().await;
    env.publish(
        &raw,
        "registry.register.billing.invoices.eu",
        r#"{"name":"billing.invoices.eu","add":"10.0.0.1:1","t":{"Registered":1,"Duration":20000}}"#,
    )
    .await;
    env.publish(
        &raw,
        "registry.register.billing",
        r#"{"name":"billing","add":"10.0.0.2:2"}"#,
    )
    .await;
    let ev = next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;
    assert_eq!(ev.instance.name(), "billing.invoices.eu");
    next_event(&mut events, EventKind::Registered, "10.0.0.2:2").await;
    // The glob behind `registry.*.billing` also matches the dotted channel;
    // the observer of "billing" alone must still not see it.
    let first = tokio::time::timeout(DEADLINE, billing_events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.instance.name(), "billing");
    assert_eq!(billing.observed_service_names(), ["billing"]);
    assert_eq!(
        all.observed_service_names(),
        ["billing", "billing.invoices.eu"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_characters_in_names_are_literal() {
    let env = Env::redis().await;
    let a = env.registry().await;
    let b = env.registry().await;
    // Unescaped, `registry.*.svc[12]?` would be a glob matching `svc1x`.
    b.observe("svc[12]?").await.unwrap();
    let mut events = b.events();
    a.register(svc("svc1x", "10.0.0.1:1")).await.unwrap();
    a.register(svc(r"svc\1", "10.0.0.2:2")).await.unwrap();
    a.register(svc("svc[12]?", "10.0.0.3:3")).await.unwrap();
    // Same connection, same order: the others came first, and were not
    // delivered.
    let first = tokio::time::timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.instance.address(), "10.0.0.3:3");
    assert_eq!(b.observed_service_names(), ["svc[12]?"]);
    assert_eq!(b.stats().rejected, 0);
    assert_eq!(
        b.get_service(r"svc\1").await.unwrap().address(),
        "10.0.0.2:2"
    );
}

/// Clients connected to the server, as Redis counts them.
async fn clients(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    list.lines().filter(|l| !l.is_empty()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_uses_two_connections_whatever_it_observes() {
    let env = Env::redis().await;
    let client = redis::Client::open(url(&env)).unwrap();
    let mut probe = client.get_multiplexed_async_connection().await.unwrap();
    let baseline = clients(&mut probe).await;

    // Built from a client the caller already has.
    let registry = Registry::builder()
        .redis_client(client.clone())
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    assert_eq!(clients(&mut probe).await, baseline + 2);
    for i in 0..200 {
        registry.observe(&format!("name-{i}")).await.unwrap();
    }
    for i in 0..20 {
        registry
            .register(svc(&format!("mine-{i}"), &format!("10.0.0.{i}:1")))
            .await
            .unwrap();
    }
    registry.observe_all().await.unwrap();
    assert_eq!(clients(&mut probe).await, baseline + 2);

    // And it works: another registry, built from the URL, finds its services.
    let other = env.registry().await;
    assert_eq!(
        other.get_service("mine-7").await.unwrap().address(),
        "10.0.0.7:1"
    );
    assert!(registry
        .transport()
        .describe()
        .starts_with("redis://127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_name_the_url_without_the_password() {
    let port = registry_harness::free_port();
    let e = Registry::builder()
        .redis_url(format!("redis://127.0.0.1:{port}"))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("cannot connect to redis://127.0.0.1:{port}: ")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");

    let e = Registry::builder()
        .redis_url(format!("redis://app:hunter2@127.0.0.1:{port}/1"))
        .build()
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(
        msg.contains(&format!("redis://app:***@127.0.0.1:{port}/1")),
        "{msg}"
    );

    let e = Registry::builder()
        .redis_url("http://127.0.0.1:1")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_are_used() {
    let env = Env::redis().await;
    let admin = redis::Client::open(url(&env)).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let base = url(&env);
    let with_user = base.replacen("redis://", "redis://app:s3cret@", 1);
    let a = Registry::builder()
        .redis_url(&with_user)
        .timeout(FIND)
        .build()
        .await
        .unwrap();
    a.register(svc("authenticated", "10.0.0.1:1"))
        .await
        .unwrap();
    assert_eq!(
        env.registry()
            .await
            .get_service("authenticated")
            .await
            .unwrap()
            .address(),
        "10.0.0.1:1"
    );
    let wrong = base.replacen("redis://", "redis://app:nope@", 1);
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        Registry::builder().redis_url(&wrong).build(),
    )
    .await
    .expect("a refused login does not hang")
    .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(!e.to_string().contains("nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_keep_nats_semantics_and_share_subscriptions() {
    let env = Env::redis().await;
    let raw = RedisTransport::connect(&url(&env)).await.unwrap();
    let exact = raw.subscribe(Topic::Subject("t.a".into())).await.unwrap();
    let one = raw.subscribe(Topic::Pattern("t.*".into())).await.unwrap();
    // Same glob as `t.*` on Redis: one PSUBSCRIBE, two subscribers.
    let rest = raw.subscribe(Topic::Pattern("t.>".into())).await.unwrap();
    let publisher = env.raw().await;
    for subject in ["t.a", "t.a.b", "u.a", "t.end"] {
        env.publish(&publisher, subject, subject).await;
    }
    let received = |stream: pubsub_registry::transport::Messages| async move {
        let until_end = stream
            .map(|m| m.subject)
            .take_while(|s| std::future::ready(s != "t.end"));
        tokio::time::timeout(DEADLINE, until_end.collect::<Vec<_>>())
            .await
            .unwrap()
    };
    // `t.*` is one token: the glob also matches `t.a.b`, the transport
    // does not deliver it.
    assert_eq!(received(one).await, ["t.a"]);
    assert_eq!(received(rest).await, ["t.a", "t.a.b"]);
    drop(exact);

    // The last subscriber of a pattern leaving unsubscribes; a newcomer
    // subscribes again.
    let again = raw.subscribe(Topic::Pattern("t.>".into())).await.unwrap();
    env.publish(&publisher, "t.x", "x").await;
    env.publish(&publisher, "t.end", "").await;
    assert_eq!(received(again).await, ["t.x"]);
    assert_eq!(raw.dropped(), 0);
}
