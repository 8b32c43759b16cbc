//! The quick start: a service registers, a client discovers it and calls it.
//!
//! Runs in one process over the in-memory transport, so no broker is needed:
//!
//!     cargo run --example quickstart
//!
//! With `NATS_URL` set (e.g. `nats://127.0.0.1:4222`) the same code runs over
//! NATS, and Go or Java peers on that server see the service too.

mod common;

use std::time::{Duration, Instant};

use pubsub_registry::{net, EventKind, MemoryBus, Registry, RegistryBuilder, Service};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = MemoryBus::new();
    let nats = std::env::var("NATS_URL").ok();
    let builder = || -> RegistryBuilder {
        match &nats {
            Some(url) => Registry::builder().nats_url(url.clone()),
            None => Registry::builder().memory(&bus),
        }
    };
    println!(
        "transport: {}",
        nats.as_deref()
            .unwrap_or("in-memory (set NATS_URL to use NATS)")
    );

    // The service side: take a free port, serve on it, announce it.
    let server = builder().build().await?;
    let address = net::free_local_addr_in_range(10000, 10010)?;
    let listener = TcpListener::bind(&address).await?;
    tokio::spawn(common::serve(listener, "hello from greeter".into()));
    server
        .register(
            Service::new("greeter", &address)
                .with_url(format!("http://{address}/"))
                .with_version("1.0.0")
                .with_kv("tags", "demo,http"),
        )
        .await?;
    println!("server: registered greeter at {address}");

    // The client side: a separate registry with an empty cache.
    let client = builder().build().await?;
    let started = Instant::now();
    let greeter = client.get_service("greeter").await?;
    println!(
        "client: found greeter at {} (v{}, {}, on {}) in {:?}: cache miss, ping, answer",
        greeter.address(),
        greeter.service.version,
        greeter.status,
        greeter.service.host,
        started.elapsed()
    );
    let body = common::get(greeter.address()).await?;
    println!("client: GET {} -> {body:?}", greeter.service.url);

    // Later lookups are answered from the local cache.
    let rounds = 1_000_000;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(client.cached_service("greeter", &[]));
    }
    println!(
        "client: {rounds} cached lookups, {:.0} ns each{}",
        started.elapsed().as_nanos() as f64 / rounds as f64,
        // A debug build is ten to twenty times slower here.
        if cfg!(debug_assertions) {
            " (a debug build: add --release for the real figure)"
        } else {
            ""
        }
    );

    // The client follows changes in real time.
    let mut events = client.events_for("greeter");
    server.close().await?;
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await?
        .ok_or("event stream ended")??;
    assert_eq!(event.kind, EventKind::Unregistered);
    println!(
        "client: greeter at {} {} (the server closed)",
        event.instance.address(),
        event.kind.as_str()
    );
    println!(
        "client: cache now holds {} greeter(s)",
        client
            .get_services_with("greeter", &pubsub_registry::Lookup::new().no_wait())
            .await
            .map_or(0, |i| i.len())
    );
    client.close().await?;
    Ok(())
}
