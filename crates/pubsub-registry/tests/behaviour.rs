//! The behaviour suite: every test here runs against every transport.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, expect_events, next_event, Env, DEADLINE};
use futures_util::StreamExt;
use pubsub_registry::protocol::{self, Kind};
use pubsub_registry::transport::Topic;
use pubsub_registry::{Error, EventKind, Filter, Lookup, ObserveFilter, Registry, Service, Status};

/// Runs each listed test once per transport.
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        for_transport!(memory: $($test),*);
        for_transport!(nats: $($test),*);
        #[cfg(feature = "redis")]
        for_transport!(redis: $($test),*);
    };
}

macro_rules! for_transport {
    ($env:ident: $($test:ident),*) => {
        mod $env {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Env::$env().await).await
                }
            )*
        }
    };
}

suite!(
    registries_find_each_other,
    lookups_hit_the_cache_after_the_first,
    unregister_removes_at_once_and_raises_the_event,
    unregistered_service_no_longer_answers_pings,
    silent_publisher_expires,
    status_changes_reach_observers,
    filters,
    get_services_shares_the_snapshot,
    observe_filters,
    main_topics_are_separate,
    close_unregisters_everything,
    dotted_names,
    rejected_names_send_nothing,
    foreign_announcements_are_understood,
    hostile_messages_are_counted_and_ignored,
    a_flood_of_hostile_messages_changes_nothing,
    a_repeated_subject_is_checked_like_a_new_one,
    dropping_the_last_handle_unregisters,
    no_wait_and_timeouts,
    lookups_leave_the_name_followed_however_they_end,
    callback_and_streams,
    slow_subscriber_is_told_what_it_missed,
    default_instance,
);

fn svc(name: &str, addr: &str) -> Service {
    Service::new(name, addr)
        .with_url(format!("http://{addr}/"))
        .with_version("1.0.0")
}

async fn registries_find_each_other(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    a.register(svc("alpha", "10.0.0.1:1")).await.unwrap();
    b.register(svc("beta", "10.0.0.2:2")).await.unwrap();

    let found = b.get_service("alpha").await.unwrap();
    assert_eq!(found.address(), "10.0.0.1:1");
    assert_eq!(found.service.url, "http://10.0.0.1:1/");
    assert_eq!(
        found.service.host,
        a.host_name(),
        "host filled in on register"
    );
    assert_eq!(found.status, Status::Passing);
    assert!(found.last_heard() <= std::time::SystemTime::now());
    assert!(found.sent_at().is_some());
    assert_eq!(a.get_service("beta").await.unwrap().address(), "10.0.0.2:2");
    assert_eq!(
        a.registered_services(),
        vec![(a.registered_services()[0].0.clone(), Status::Passing)]
    );
    assert_eq!(a.registered_services()[0].0.name, "alpha");
}

async fn lookups_hit_the_cache_after_the_first(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    a.register(svc("cached", "10.0.0.1:1")).await.unwrap();

    let raw = env.raw().await;
    let main = b.main_topic().to_string();
    let mut pings = env
        .watch(&raw, Topic::Pattern(format!("{main}.ping.>")))
        .await;

    assert!(b.cached_service("cached", &[]).is_none());
    b.get_service("cached").await.unwrap();
    assert!(
        b.cached_service("cached", &[]).is_some(),
        "in the cache now"
    );
    for _ in 0..100 {
        b.get_service("cached").await.unwrap();
        b.get_services("cached").await.unwrap();
    }
    // A marker sent on b's own connection arrives after every ping b sent.
    b.transport()
        .publish(
            protocol::subject(&main, Kind::Ping, "marker").into(),
            None,
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout(DEADLINE, pings.next())
            .await
            .unwrap()
            .unwrap();
        if m.subject.ends_with(".marker") {
            break;
        }
        seen.push(m);
    }
    assert_eq!(seen.len(), 1, "one ping for 201 lookups");
    assert_eq!(
        seen[0].subject,
        protocol::subject(&main, Kind::Ping, "cached")
    );
    if env.carries_replies() {
        assert_eq!(
            seen[0].reply.as_deref(),
            Some(protocol::subject(&main, Kind::Register, "cached").as_str()),
            "pings carry the register subject as reply, for the Java port"
        );
    }
}

async fn unregister_removes_at_once_and_raises_the_event(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    b.observe("gone").await.unwrap();
    let mut events = b.events_for("gone");
    let handle = a.register(svc("gone", "10.0.0.1:1")).await.unwrap();
    next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;

    handle.unregister().await.unwrap();
    let ev = next_event(&mut events, EventKind::Unregistered, "10.0.0.1:1").await;
    assert_eq!(ev.instance.name(), "gone");
    assert!(b.cached_service("gone", &[]).is_none());
    assert!(a.registered_services().is_empty());
    assert!(matches!(
        a.unregister(&svc("gone", "10.0.0.1:1")).await,
        Err(Error::NotRegistered { .. })
    ));
}

async fn unregistered_service_no_longer_answers_pings(env: Env) {
    let a = env.registry().await;
    let s = svc("quiet", "10.0.0.1:1");
    a.register(s.clone()).await.unwrap();
    a.unregister(&s).await.unwrap();
    assert!(!a.subscribers().await.iter().any(|s| s.contains(".ping.")));

    let b = env
        .builder()
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    assert!(matches!(
        b.get_service("quiet").await,
        Err(Error::NotFound { .. })
    ));
}

async fn silent_publisher_expires(env: Env) {
    let alive = env
        .builder()
        .register_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let observer = env.registry().await;
    observer.observe("mortal").await.unwrap();
    let mut events = observer.events_for("mortal");

    alive.register(svc("mortal", "10.0.0.1:1")).await.unwrap();
    next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;

    // A peer that announces once, promising 100 ms, then crashes.
    let raw = env.raw().await;
    let payload = r#"{"name":"mortal","add":"10.0.0.9:9","t":{"Registered":1,"Duration":100}}"#;
    env.publish(&raw, "registry.register.mortal", payload).await;
    let born = next_event(&mut events, EventKind::Registered, "10.0.0.9:9").await;
    let died = next_event(&mut events, EventKind::Expired, "10.0.0.9:9").await;
    assert!(
        died.instance.last_heard() >= born.instance.last_heard(),
        "expired as last heard"
    );
    assert!(observer
        .get_services_with("mortal", &Lookup::new().no_wait())
        .await
        .unwrap()
        .iter()
        .all(|i| i.address() != "10.0.0.9:9"));
    // The sender's clock said 1970: expiry counted from reception instead.
    assert_eq!(died.instance.interval, Duration::from_millis(100));

    // The heartbeating one outlived the crashed one's due time (150 ms after
    // it was heard): it was refreshed, not expired.
    let survivor = observer
        .cached_service("mortal", &[])
        .expect("still cached");
    assert_eq!(survivor.address(), "10.0.0.1:1");
}

async fn status_changes_reach_observers(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    let s = svc("moody", "10.0.0.1:1");
    a.register(s.clone()).await.unwrap();
    b.get_service("moody").await.unwrap();
    let mut events = b.events_for("moody");

    a.set_service_status(&s, Status::Warning).await.unwrap();
    let ev = next_event(
        &mut events,
        EventKind::StatusChanged {
            previous: Status::Passing,
        },
        "10.0.0.1:1",
    )
    .await;
    assert_eq!(ev.instance.status, Status::Warning);
    assert_eq!(
        b.cached_service("moody", &[]).unwrap().status,
        Status::Warning
    );
    assert_eq!(a.registered_services()[0].1, Status::Warning);

    a.set_service_status(&s, Status::Critical).await.unwrap();
    next_event(
        &mut events,
        EventKind::StatusChanged {
            previous: Status::Warning,
        },
        "10.0.0.1:1",
    )
    .await;
    assert!(matches!(
        a.set_service_status(&svc("moody", "10.0.0.1:2"), Status::Passing)
            .await,
        Err(Error::NotRegistered { .. })
    ));
}

async fn filters(env: Env) {
    let a = env.registry().await;
    let b = env.builder().host_name("host-b").build().await.unwrap();
    b.observe("pool").await.unwrap();
    let mut events = b.events_for("pool");
    let s1 = svc("pool", "10.0.0.1:1").with_host("host-a");
    let s2 = svc("pool", "10.0.0.2:2")
        .with_host("host-b")
        .with_kv("zone", "eu");
    let s3 = svc("pool", "10.0.0.3:3").with_host("host-b");
    for s in [&s1, &s2, &s3] {
        a.register(s.clone()).await.unwrap();
        next_event(&mut events, EventKind::Registered, &s.address).await;
    }
    a.set_service_status(&s3, Status::Critical).await.unwrap();
    next_event(
        &mut events,
        EventKind::StatusChanged {
            previous: Status::Passing,
        },
        &s3.address,
    )
    .await;

    let addrs = |instances: pubsub_registry::Instances| {
        let mut v: Vec<String> = instances.iter().map(|i| i.address().to_string()).collect();
        v.sort();
        v
    };
    let with = |f: Filter| Lookup::new().filter(f);
    assert_eq!(addrs(b.get_services("pool").await.unwrap()).len(), 3);
    assert_eq!(
        addrs(
            b.get_services_with("pool", &with(Filter::passing()))
                .await
                .unwrap()
        ),
        ["10.0.0.1:1", "10.0.0.2:2"]
    );
    assert_eq!(
        addrs(
            b.get_services_with("pool", &with(Filter::same_host()))
                .await
                .unwrap()
        ),
        ["10.0.0.2:2", "10.0.0.3:3"]
    );
    let both = Lookup::new()
        .filter(Filter::same_host())
        .filter(Filter::passing());
    assert_eq!(
        addrs(b.get_services_with("pool", &both).await.unwrap()),
        ["10.0.0.2:2"]
    );
    let eu = with(Filter::from_fn(|i| {
        i.service.kv.get("zone").is_some_and(|z| z == "eu")
    }));
    assert_eq!(
        b.get_service_with("pool", &eu).await.unwrap().address(),
        "10.0.0.2:2"
    );

    // Round-robin cycles through every matching instance, one per lookup.
    let rr = with(Filter::round_robin());
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..6 {
        seen.push(
            b.get_service_with("pool", &rr)
                .await
                .unwrap()
                .address()
                .to_string(),
        );
    }
    assert_eq!(seen[..3], seen[3..], "a fixed cycle");
    let mut cycle = seen[..3].to_vec();
    cycle.sort();
    assert_eq!(cycle, ["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"]);
    assert_eq!(b.get_services_with("pool", &rr).await.unwrap().len(), 1);

    // Builder filters apply to every lookup; a miss waits, then not found.
    let c = env
        .builder()
        .host_name("host-c")
        .filter(Filter::same_host())
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    assert!(matches!(
        c.get_service("pool").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        c.get_services_with("pool", &Lookup::new().no_wait())
            .await
            .map(|i| i.len())
            .ok(),
        None
    );
}

async fn get_services_shares_the_snapshot(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    b.observe("shared").await.unwrap();
    let mut events = b.events_for("shared");
    for i in 0..10 {
        let addr = format!("10.0.0.{i}:1");
        a.register(svc("shared", &addr)).await.unwrap();
        next_event(&mut events, EventKind::Registered, &addr).await;
    }
    let one = b.get_services("shared").await.unwrap();
    let two = b.get_services("shared").await.unwrap();
    assert_eq!(one.len(), 10);
    assert!(one.ptr_eq(&two), "same snapshot, not a copy");
    assert!(Arc::ptr_eq(
        &one[0],
        &b.cached_service("shared", &[]).unwrap()
    ));
}

async fn observe_filters(env: Env) {
    let a = env.registry().await;
    let b = env
        .builder()
        .host_name("host-b")
        .observe_filter(ObserveFilter::same_host())
        .observe_filter(ObserveFilter::from_fn(|s| s.version != "0.0.0"))
        .build()
        .await
        .unwrap();
    b.observe("picky").await.unwrap();
    let mut events = b.events_for("picky");
    a.register(svc("picky", "10.0.0.1:1").with_host("host-a"))
        .await
        .unwrap();
    a.register(
        svc("picky", "10.0.0.2:2")
            .with_host("host-b")
            .with_version("0.0.0"),
    )
    .await
    .unwrap();
    a.register(svc("picky", "10.0.0.3:3").with_host("host-b"))
        .await
        .unwrap();
    // Same connection, same order: the two refused ones arrived first.
    next_event(&mut events, EventKind::Registered, "10.0.0.3:3").await;
    let cached = b.get_services("picky").await.unwrap();
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0].address(), "10.0.0.3:3");
    assert!(b.stats().filtered >= 2);
}

async fn main_topics_are_separate(env: Env) {
    let a = env.builder().main_topic("tenant-a").build().await.unwrap();
    let b = env
        .builder()
        .main_topic("tenant-b")
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let c = env.builder().main_topic("tenant-a").build().await.unwrap();
    a.register(svc("mine", "10.0.0.1:1")).await.unwrap();
    assert_eq!(c.get_service("mine").await.unwrap().address(), "10.0.0.1:1");
    assert!(matches!(
        b.get_service("mine").await,
        Err(Error::NotFound { .. })
    ));
    assert!(a
        .subscribers()
        .await
        .iter()
        .all(|s| s.starts_with("tenant-a.")));
    assert!(matches!(
        env.builder().main_topic("bad.*").build().await,
        Err(Error::InvalidName(_))
    ));
}

async fn close_unregisters_everything(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    b.observe_all().await.unwrap();
    let mut events = b.events();
    a.register(svc("one", "10.0.0.1:1")).await.unwrap();
    a.register(svc("two", "10.0.0.2:2")).await.unwrap();
    expect_events(
        &mut events,
        &[
            (EventKind::Registered, "10.0.0.1:1"),
            (EventKind::Registered, "10.0.0.2:2"),
        ],
    )
    .await;

    a.close().await.unwrap();
    expect_events(
        &mut events,
        &[
            (EventKind::Unregistered, "10.0.0.1:1"),
            (EventKind::Unregistered, "10.0.0.2:2"),
        ],
    )
    .await;
    assert!(b.cached_instances().is_empty());
    assert!(a.is_closed());
    assert!(matches!(a.get_service("one").await, Err(Error::Closed)));
    assert!(matches!(
        a.register(svc("x", "h:1")).await,
        Err(Error::Closed)
    ));
    assert!(matches!(a.observe("x").await, Err(Error::Closed)));
    a.close().await.unwrap();
}

async fn dotted_names(env: Env) {
    let a = env.registry().await;
    let all = env.registry().await;
    let plain = env.registry().await;
    all.observe_all().await.unwrap();
    plain.observe("billing").await.unwrap();
    let mut all_events = all.events();
    let mut plain_events = plain.events();

    a.register(svc("billing.invoices", "10.0.0.1:1"))
        .await
        .unwrap();
    a.register(svc("billing", "10.0.0.2:2")).await.unwrap();
    let ev = next_event(&mut all_events, EventKind::Registered, "10.0.0.1:1").await;
    assert_eq!(ev.instance.name(), "billing.invoices");
    // One subscription: wire order holds across names too.
    next_event(&mut all_events, EventKind::Registered, "10.0.0.2:2").await;
    // "billing" arrived after "billing.invoices" on the same connection: an
    // observer of "billing" alone never saw the dotted one.
    let first = tokio::time::timeout(DEADLINE, plain_events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.instance.name(), "billing");
    assert_eq!(plain.observed_service_names(), ["billing"]);
    assert_eq!(
        all.observed_service_names(),
        ["billing", "billing.invoices"]
    );

    let c = env.registry().await;
    assert_eq!(
        c.get_service("billing.invoices").await.unwrap().address(),
        "10.0.0.1:1"
    );
    assert_eq!(
        all.subscribers().await,
        ["registry.register.>", "registry.unregister.>"]
    );
    assert_eq!(
        plain.subscribers().await,
        ["registry.register.billing", "registry.unregister.billing"]
    );
    let star = env.registry().await;
    star.observe("*").await.unwrap();
    assert_eq!(
        star.subscribers().await,
        all.subscribers().await,
        "Go's \"*\""
    );
}

async fn rejected_names_send_nothing(env: Env) {
    let a = env.registry().await;
    let raw = env.raw().await;
    let mut wire = env.watch(&raw, Topic::Pattern("registry.>".into())).await;

    for bad in ["", "a.*", "a.>", "a b", ".a", "a.", "a..b", "tab\there"] {
        assert!(
            matches!(
                a.register(svc(bad, "h:1")).await,
                Err(Error::InvalidName(_))
            ),
            "register {bad:?}"
        );
        assert!(
            matches!(a.get_service(bad).await, Err(Error::InvalidName(_))),
            "get {bad:?}"
        );
        assert!(
            matches!(a.observe(bad).await, Err(Error::InvalidName(_))),
            "observe {bad:?}"
        );
    }
    let e = a.register(svc("ok", "")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidService { .. }));
    assert!(e.to_string().contains("address is empty"), "{e}");
    let e = a.get_service("a b").await.unwrap_err();
    assert!(e.to_string().contains("whitespace"), "{e}");

    // A marker on a's own connection: nothing a sent came before it.
    a.transport()
        .publish("registry.marker.x".into(), None, Default::default())
        .await
        .unwrap();
    let first = tokio::time::timeout(DEADLINE, wire.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.subject, "registry.marker.x");
}

async fn foreign_announcements_are_understood(env: Env) {
    let b = env.registry().await;
    b.observe_all().await.unwrap();
    let mut events = b.events();
    let raw = env.raw().await;
    // As the Go package and the Java port write them.
    env.publish(
        &raw,
        "registry.register.wiredemo",
        r#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","h":"vm","kv":{"zone":"a"},"t":{"Registered":1795535104541,"Duration":20000},"status":"warning"}"#,
    )
    .await;
    env.publish(
        &raw,
        "registry.register.javademo",
        r#"{"name":"javademo","net":"tcp","url":"http://127.0.0.1:9090/","h":"jhost","add":"127.0.0.1:9090","t":{"registered":1795535104541,"duration":2000}}"#,
    )
    .await;
    let go = next_event(&mut events, EventKind::Registered, "127.0.0.1:8081").await;
    assert_eq!(go.instance.status, Status::Warning);
    assert_eq!(go.instance.service.kv["zone"], "a");
    assert_eq!(go.instance.service.version, "1.2.3");
    assert_eq!(go.instance.interval, Duration::from_secs(20));
    let java = next_event(&mut events, EventKind::Registered, "127.0.0.1:9090").await;
    assert_eq!(java.instance.interval, Duration::from_secs(2));
    assert_eq!(java.instance.service.host, "jhost");

    // A Go peer unregisters with the bare service.
    env.publish(
        &raw,
        "registry.unregister.wiredemo",
        r#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","kv":{"zone":"a"}}"#,
    )
    .await;
    next_event(&mut events, EventKind::Unregistered, "127.0.0.1:8081").await;

    // What we send is in the Go shape.
    let mut wire = env
        .watch(&raw, Topic::Subject("registry.register.ours".into()))
        .await;
    let a = env.registry().await;
    let s = svc("ours", "10.0.0.1:1");
    a.register(s.clone()).await.unwrap();
    let m = tokio::time::timeout(DEADLINE, wire.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["name"], "ours");
    assert_eq!(v["add"], "10.0.0.1:1");
    assert_eq!(v["t"]["Duration"], 20000);
    assert!(v["t"]["Registered"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(v.get("status").is_none(), "passing is omitted");
    assert!(v.get("kv").is_none(), "empty kv omitted");
    a.set_service_status(&s, Status::Critical).await.unwrap();
    let m = tokio::time::timeout(DEADLINE, wire.next())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["status"], "critical");
}

/// An observer of everything that caches one instance, `victim` at
/// 10.0.0.1:1, published raw; and the raw connection, for what comes next.
async fn observer_of_a_victim(
    env: &Env,
) -> (
    Registry,
    pubsub_registry::EventStream,
    Arc<dyn pubsub_registry::transport::Transport>,
) {
    let b = env.registry().await;
    b.observe_all().await.unwrap();
    let mut events = b.events();
    let raw = env.raw().await;
    // An hour's interval: a flood over Redis (a round trip per message)
    // can outlast the default 20 s x 1.5 on a loaded machine, and the
    // victim must not expire while it is attacked: expiry is tested
    // elsewhere.
    env.publish(
        &raw,
        "registry.register.victim",
        r#"{"name":"victim","add":"10.0.0.1:1","t":{"Duration":3600000}}"#,
    )
    .await;
    next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;
    (b, events, raw)
}

async fn hostile_messages_are_counted_and_ignored(env: Env) {
    let (b, _events, raw) = observer_of_a_victim(&env).await;

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let big = format!(
        r#"{{"name":"victim","add":"10.0.0.1:1","v":"{}"}}"#,
        "x".repeat(1_000_000)
    );
    let hostile: Vec<(&str, String)> = vec![
        ("registry.register.victim", "not json".into()),
        (
            "registry.register.victim",
            r#"{"name":"victim","add":7}"#.into(),
        ),
        ("registry.register.victim", r#"{"add":"10.0.0.1:1"}"#.into()),
        (
            "registry.register.victim",
            r#"{"name":"","add":"10.0.0.1:1"}"#.into(),
        ),
        (
            "registry.register.victim",
            r#"{"name":"other","add":"10.0.0.1:1","status":"critical"}"#.into(),
        ),
        (
            "registry.register.victim",
            format!(r#"{{"name":"victim","add":"10.0.0.1:1","status":"critical","x":{deep}}}"#),
        ),
        (
            "registry.register.victim",
            r#"{"name":"victim","status":"critical"}"#.into(),
        ),
        ("registry.register.victim", String::new()),
        (
            "registry.register.victim",
            r#"{"name":"victim","add":"10.0.0.1:1","kv":{"a":{"b":1}}}"#.into(),
        ),
        ("registry.register.victim", big),
        (
            "registry.unregister.victim",
            r#"{"name":"other","add":"10.0.0.1:1"}"#.into(),
        ),
        ("registry.unregister.victim", "{".into()),
    ];
    let before = b.stats().rejected;
    for (subject, payload) in &hostile {
        env.publish(&raw, subject, payload).await;
    }
    // Invalid UTF-8 inside a string.
    env.publish(
        &raw,
        "registry.register.victim",
        b"{\"name\":\"victim\",\"add\":\"10.0.0.1:1\",\"v\":\"\xff\"}",
    )
    .await;
    let expected = before + hostile.len() as u64 + 1;
    eventually("every hostile message counted", || async {
        b.stats().rejected >= expected
    })
    .await;
    assert_eq!(b.stats().rejected, expected);
    let cached = b.get_services("victim").await.unwrap();
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0].status, Status::Passing, "the cache is untouched");
    assert_eq!(cached[0].service.version, "");
}

async fn no_wait_and_timeouts(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    a.register(svc("later", "10.0.0.1:1")).await.unwrap();
    let e = b
        .get_service_with("later", &Lookup::new().no_wait())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { waited, .. } if waited.is_zero()));
    assert!(
        b.subscribers().await.is_empty(),
        "no_wait neither observes nor pings"
    );

    let e = b
        .get_service_with("nobody", &Lookup::new().timeout(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { waited, .. } if waited == Duration::from_millis(50)));
    assert!(e.to_string().contains("nobody"));
    assert_eq!(
        b.get_service("later").await.unwrap().address(),
        "10.0.0.1:1"
    );
    // A ping nobody serves is not answered with anything b could mistake
    // for a malformed announcement (NATS's "no responders" status).
    assert_eq!(b.stats().rejected, 0);
}

/// The lookup that subscribes to a name reads the answer to its ping
/// itself when it runs in a task, and hands the name's messages to a
/// listener task when it ends. Found, timed out or cancelled, the cache
/// follows the name afterwards, and a lookup waiting alongside it is
/// answered too. Run from a task and from the test's own thread (which
/// hands over before the ping).
async fn lookups_leave_the_name_followed_however_they_end(env: Env) {
    let a = env.registry().await;
    let b = env.registry().await;
    for (round, in_task) in [(0, true), (1, false)] {
        let names = ["timed-out", "cancelled", "found"].map(|n| format!("{n}-{round}"));
        a.register(svc(&names[2], "10.0.0.1:1")).await.unwrap();
        let lookups = {
            let (b, names) = (b.clone(), names.clone());
            async move {
                let short = Lookup::new().timeout(Duration::from_millis(20));
                assert!(b.get_service_with(&names[0], &short).await.is_err());
                let cancelled =
                    tokio::time::timeout(Duration::from_millis(20), b.get_service(&names[1])).await;
                assert!(cancelled.is_err(), "nothing answers {}", names[1]);
                let (x, y) = tokio::join!(b.get_service(&names[2]), b.get_service(&names[2]));
                assert_eq!(x.unwrap().address(), "10.0.0.1:1");
                assert_eq!(y.unwrap().address(), "10.0.0.1:1");
            }
        };
        if in_task {
            tokio::spawn(lookups).await.unwrap();
        } else {
            lookups.await;
        }
        for name in &names {
            a.register(svc(name, "10.0.0.2:2")).await.unwrap();
        }
        for name in &names {
            let what = format!("{name}'s new instance in the cache (round {round}), unasked");
            eventually(&what, || async {
                let now = b.get_services_with(name, &Lookup::new().no_wait()).await;
                now.is_ok_and(|found| found.iter().any(|i| i.address() == "10.0.0.2:2"))
            })
            .await;
        }
    }
    assert_eq!(b.stats().rejected, 0);
}

async fn callback_and_streams(env: Env) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let b = env
        .builder()
        .on_event(move |e| {
            log.lock()
                .unwrap()
                .push((e.kind, e.instance.address().to_string()))
        })
        .build()
        .await
        .unwrap();
    b.observe("watched").await.unwrap();
    b.observe("other").await.unwrap();
    let mut all = b.events();
    let mut only = b.events_for("other");
    let a = env.registry().await;
    let s = svc("watched", "10.0.0.1:1");
    a.register(s.clone()).await.unwrap();
    a.register(svc("other", "10.0.0.2:2")).await.unwrap();
    a.unregister(&s).await.unwrap();
    expect_events(
        &mut all,
        &[
            (EventKind::Unregistered, "10.0.0.1:1"),
            (EventKind::Registered, "10.0.0.2:2"),
        ],
    )
    .await;
    let first = tokio::time::timeout(DEADLINE, only.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.instance.name(),
        "other",
        "per-name stream skips other names"
    );
    let seen = seen.lock().unwrap().clone();
    let watched: Vec<_> = seen.iter().filter(|(_, a)| a == "10.0.0.1:1").collect();
    assert_eq!(
        watched,
        [
            &(EventKind::Registered, "10.0.0.1:1".to_string()),
            &(EventKind::Unregistered, "10.0.0.1:1".to_string())
        ]
    );
}

async fn slow_subscriber_is_told_what_it_missed(env: Env) {
    let b = env.builder().event_capacity(4).build().await.unwrap();
    b.observe("many").await.unwrap();
    let mut slow = b.events();
    let mut fast = b.events();
    let a = env.registry().await;
    for i in 0..10 {
        a.register(svc("many", &format!("10.0.0.{i}:1")))
            .await
            .unwrap();
        // The fast one keeps up, whatever the slow one does.
        next_event(&mut fast, EventKind::Registered, &format!("10.0.0.{i}:1")).await;
    }
    let first = slow.next().await.unwrap();
    assert_eq!(first.unwrap_err(), pubsub_registry::Lagged(6));
    let next = slow.next().await.unwrap().unwrap();
    assert_eq!(
        next.instance.address(),
        "10.0.0.6:1",
        "then the newest four"
    );
}

/// The default instance is process-wide: tests of it take turns.
static DEFAULT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn default_instance(env: Env) {
    let _turn = DEFAULT_LOCK.lock().await;
    assert!(matches!(pubsub_registry::default(), Err(Error::NoDefault)));
    assert!(matches!(
        pubsub_registry::get_service("x").await,
        Err(Error::NoDefault)
    ));
    assert!(matches!(
        pubsub_registry::close().await,
        Err(Error::NoDefault)
    ));

    let env = Arc::new(env);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let env = env.clone();
            tokio::spawn(async move { pubsub_registry::set_default(env.builder()).await.unwrap() })
        })
        .collect();
    let mut made: Vec<Registry> = Vec::new();
    for t in tasks {
        made.push(t.await.unwrap());
    }
    assert!(
        made.iter().all(|r| r.ptr_eq(&made[0])),
        "exactly one default"
    );
    assert!(pubsub_registry::default().unwrap().ptr_eq(&made[0]));
    drop(made);

    let s = svc("by-default", "10.0.0.1:1");
    pubsub_registry::register(s.clone()).await.unwrap();
    pubsub_registry::observe("by-default").await.unwrap();
    pubsub_registry::observe_all().await.unwrap();
    assert_eq!(
        pubsub_registry::get_service("by-default")
            .await
            .unwrap()
            .address(),
        "10.0.0.1:1"
    );
    assert_eq!(
        pubsub_registry::get_services("by-default")
            .await
            .unwrap()
            .len(),
        1
    );
    pubsub_registry::set_service_status(&s, Status::Warning)
        .await
        .unwrap();
    pubsub_registry::unregister(&s).await.unwrap();
    pubsub_registry::close().await.unwrap();
    assert!(matches!(pubsub_registry::default(), Err(Error::NoDefault)));

    // A new one can be set after close.
    let again = pubsub_registry::set_default(env.builder()).await.unwrap();
    assert!(pubsub_registry::default().unwrap().ptr_eq(&again));
    pubsub_registry::close().await.unwrap();
}

async fn a_flood_of_hostile_messages_changes_nothing(env: Env) {
    let (b, mut events, raw) = observer_of_a_victim(&env).await;
    b.register(svc("pinged", "10.0.0.5:5")).await.unwrap();
    next_event(&mut events, EventKind::Registered, "10.0.0.5:5").await;
    let kinds = [
        ("registry.register.victim", "{"),
        ("registry.register.victim", r#"{"name":"victim","add":1}"#),
        (
            "registry.unregister.victim",
            r#"{"name":"intruder","add":"10.0.0.1:1"}"#,
        ),
        ("registry.register.victim", r#"{"name":"victim"}"#),
        ("registry.ping.pinged", r#"{"name":"pinged"}"#),
    ];
    let before = b.stats().rejected;
    let total: u64 = 100_000;
    let chunk = 10_000;
    for sent in (0..total).step_by(chunk) {
        for i in 0..chunk as u64 {
            let (subject, payload) = kinds[((sent + i) % kinds.len() as u64) as usize];
            raw.publish(subject.into(), None, payload.as_bytes().to_vec().into())
                .await
                .unwrap();
        }
        raw.flush().await.unwrap();
        // Let the registry drain each chunk: a broker drops for a subscriber
        // that falls too far behind, which is not what this test is about.
        let expected = before + sent + chunk as u64;
        eventually("the chunk is counted", || async {
            b.stats().rejected >= expected
        })
        .await;
    }
    assert_eq!(b.stats().rejected, before + total);
    assert_eq!(
        b.stats().pings_answered,
        0,
        "pings with a payload are not pings"
    );
    let victim = b.get_services("victim").await.unwrap();
    assert_eq!(victim.len(), 1);
    assert_eq!(victim[0].status, Status::Passing);
    assert_eq!(
        b.cached_instances().len(),
        2,
        "victim and pinged, nothing else"
    );
    // Still fully working.
    let c = env.registry().await;
    assert_eq!(
        c.get_service("pinged").await.unwrap().address(),
        "10.0.0.5:5"
    );
}

/// Each message's subject is checked as if it were the first, whatever came
/// before it on the same subject or on a bad one (a listener remembers the
/// last well-formed subject).
async fn a_repeated_subject_is_checked_like_a_new_one(env: Env) {
    let observer = env.registry().await;
    observer.observe_all().await.unwrap();
    let raw = env.raw().await;
    let announce = |subject: String, name: String, address: &'static str| {
        let payload = protocol::encode_announcement(
            &Service::new(name, address),
            Status::Passing,
            std::time::SystemTime::now(),
            Duration::from_secs(20),
        );
        let (env, raw) = (&env, &raw);
        async move { env.publish(raw, &subject, payload).await }
    };
    let settled = |instances: usize, rejected: u64| {
        let observer = &observer;
        eventually(
            "the announcement is taken or rejected",
            move || async move {
                let stats = observer.stats();
                (stats.instances, stats.rejected) == (instances, rejected)
            },
        )
    };
    let subject = |name: &str| format!("registry.register.{name}");
    // Too long for a name, though any broker carries it as a subject.
    let bad = "a".repeat(protocol::MAX_NAME_LEN + 1);
    announce(subject("a"), "a".into(), "a:1").await;
    settled(1, 0).await;
    // A bad name right after a good one.
    announce(subject(&bad), bad.clone(), "a:2").await;
    settled(1, 1).await;
    announce(subject("a"), "a".into(), "a:3").await;
    settled(2, 1).await;
    // The subject just taken, with a payload of another name.
    announce(subject("a"), "b".into(), "b:1").await;
    settled(2, 2).await;
    // Another good subject is taken apart for its own name.
    announce(subject("b"), "b".into(), "b:1").await;
    settled(3, 2).await;
    assert_eq!(observer.get_services("b").await.unwrap().len(), 1);
    assert_eq!(observer.get_services("a").await.unwrap().len(), 2);
}

async fn dropping_the_last_handle_unregisters(env: Env) {
    let observer = env.registry().await;
    observer.observe("dropped").await.unwrap();
    let mut events = observer.events_for("dropped");
    let a = env.registry().await;
    let second_handle = a.clone();
    let registration = a.register(svc("dropped", "10.0.0.1:1")).await.unwrap();
    next_event(&mut events, EventKind::Registered, "10.0.0.1:1").await;
    drop(a);
    drop(registration); // a registration does not keep the registry alive
    assert!(!second_handle.is_closed());
    drop(second_handle);
    let ev = next_event(&mut events, EventKind::Unregistered, "10.0.0.1:1").await;
    assert_eq!(ev.instance.name(), "dropped");
}
