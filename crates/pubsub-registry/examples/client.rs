//! A client, as in the Go package's README: observes `myservice`, looks it
//! up and calls it. Start `cargo run --example server` first.
//!
//!     NATS_URL=nats://127.0.0.1:4222 cargo run --example client

mod common;

use std::time::Duration;

use pubsub_registry::{Filter, Lookup, Registry};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let registry = Registry::builder()
        .nats_url(&url)
        .filter(Filter::passing())
        .build()
        .await?;

    // Optional: follow every change of myservice from now on.
    registry.observe("myservice").await?;

    let lookup = Lookup::new()
        .filter(Filter::round_robin())
        .timeout(Duration::from_secs(1));
    let instance = registry.get_service_with("myservice", &lookup).await?;
    println!(
        "found myservice at {} ({})",
        instance.address(),
        instance.service.url
    );
    println!("{}", common::get(instance.address()).await?);

    for i in registry.get_services("myservice").await?.iter() {
        println!(
            "instance {} on {}: {}",
            i.address(),
            i.service.host,
            i.status
        );
    }
    registry.close().await?;
    Ok(())
}
