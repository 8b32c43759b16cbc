//! What reading an event costs a subscriber: `EventStream::next` on events
//! already sent (a burst's case: the stream never has to wait). The cache
//! takes the announcements in before the clock starts.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::StreamExt;
use pubsub_registry::{MemoryBus, Registry, Service};

fn events(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("events");
    g.bench_function("take_sent", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let n = usize::try_from(iters).unwrap();
                let bus = MemoryBus::new();
                let server = Registry::builder().memory(&bus).build().await.unwrap();
                let observer = Registry::builder()
                    .memory(&bus)
                    .event_capacity(n + 1)
                    .build()
                    .await
                    .unwrap();
                observer.observe("bench").await.unwrap();
                let mut events = observer.events();
                for i in 0..iters {
                    let address = format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255);
                    server
                        .register(Service::new("bench", address))
                        .await
                        .unwrap();
                }
                while observer.stats().instances < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let start = Instant::now();
                for _ in 0..n {
                    black_box(events.next().await.unwrap().unwrap());
                }
                let took = start.elapsed();
                server.close().await.unwrap();
                observer.close().await.unwrap();
                took
            })
        })
    });
    g.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
