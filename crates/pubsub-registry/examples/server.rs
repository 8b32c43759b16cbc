//! A service, as in the Go package's README: takes a free port in
//! 10000-10010, registers `myservice` and serves HTTP on it until Ctrl-C or
//! SIGTERM, then unregisters before exiting.
//!
//!     NATS_URL=nats://127.0.0.1:4222 cargo run --example server
//!     NATS_URL=nats://127.0.0.1:4222 cargo run --example client

mod common;

use pubsub_registry::{net, Registry, Service};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let registry = Registry::builder().nats_url(&url).build().await?;

    let address = net::free_local_addr_in_range(10000, 10010)?;
    let listener = TcpListener::bind(&address).await?;
    let service = Service::new("myservice", &address).with_url(format!("http://{address}/"));
    registry.register(service).await?;
    println!("myservice listening on http://{address}/ (registered on {url}); Ctrl-C to stop");

    tokio::select! {
        _ = common::serve(listener, format!("hello from myservice at {address}")) => {}
        _ = common::shutdown_signal() => {}
    }
    // Observers see `Unregistered` now, not `Expired` 30 s later.
    registry.close().await?;
    println!("unregistered myservice");
    Ok(())
}
