//! What `register()` costs the caller, on the in-memory transport (no
//! network, no observer): validation, the registration's bookkeeping, its
//! heartbeat schedule, encoding and publishing the announcement. Next to it,
//! publishing an already-encoded announcement on the same bus: the floor.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use pubsub_registry::protocol::encode_announcement;
use pubsub_registry::transport::Transport;
use pubsub_registry::{MemoryBus, Registry, Service, Status};

fn register(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("register");
    g.bench_function("register", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // A registry of its own per sample, so registrations do not
                // pile up over the whole run.
                let bus = MemoryBus::new();
                let registry = Registry::builder().memory(&bus).build().await.unwrap();
                let services: Vec<Service> = (0..iters)
                    .map(|i| {
                        Service::new(
                            "bench",
                            format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255),
                        )
                    })
                    .collect();
                let start = Instant::now();
                for s in services {
                    black_box(registry.register(s).await.unwrap());
                }
                let took = start.elapsed();
                registry.close().await.unwrap();
                took
            })
        })
    });
    g.bench_function("publish_encoded", |b| {
        let bus = MemoryBus::new();
        let payload = Bytes::from(encode_announcement(
            &Service::new("bench", "10.0.0.1:80"),
            Status::Passing,
            SystemTime::now(),
            Duration::from_secs(20),
        ));
        b.iter(|| {
            rt.block_on(bus.publish("registry.register.bench".into(), None, payload.clone()))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, register);
criterion_main!(benches);
