//! Cached lookups: what a `get_service` on a name already in the cache
//! costs, alone and from two threads at once.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pubsub_registry::{Filter, Lookup, MemoryBus, Registry, Service};
use tokio_stream::StreamExt;

/// A registry whose cache holds `n` instances of `svc`.
fn registry_with(n: usize) -> (tokio::runtime::Runtime, Registry) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let registry = rt.block_on(async {
        let bus = MemoryBus::new();
        let server = Registry::builder().memory(&bus).build().await.unwrap();
        let client = Registry::builder().memory(&bus).build().await.unwrap();
        client.observe("svc").await.unwrap();
        let mut events = client.events();
        for i in 0..n {
            server
                .register(Service::new("svc", format!("10.0.0.{i}:80")))
                .await
                .unwrap();
            events.next().await.unwrap().unwrap();
        }
        std::mem::forget(server);
        client
    });
    (rt, registry)
}

fn lookups(c: &mut Criterion) {
    let (_rt1, one) = registry_with(1);
    let (_rt10, ten) = registry_with(10);
    let rr = Lookup::new().filter(Filter::round_robin());

    let mut g = c.benchmark_group("cached");
    g.bench_function("get_service/1", |b| {
        b.iter(|| black_box(ready(one.get_service(black_box("svc"))).unwrap()))
    });
    g.bench_function("get_service/10/round_robin", |b| {
        b.iter(|| black_box(ready(ten.get_service_with(black_box("svc"), &rr)).unwrap()))
    });
    g.bench_function("get_services/10", |b| {
        b.iter(|| black_box(ready(ten.get_services(black_box("svc"))).unwrap()))
    });
    g.bench_function("cached_service/1", |b| {
        b.iter(|| black_box(one.cached_service(black_box("svc"), &[])))
    });
    // Two threads look up the same name at once; the time is per lookup on
    // each thread, to set beside the one-thread figures.
    g.bench_function("get_service/1/two_threads", |b| {
        b.iter_custom(|iters| {
            two_threads(&one, iters, |r| {
                black_box(ready(r.get_service(black_box("svc"))).unwrap());
            })
        })
    });
    g.bench_function("with_cached_service/1", |b| {
        b.iter(|| black_box(one.with_cached_service(black_box("svc"), &[], |i| i.service.port())))
    });
    g.bench_function("with_cached_service/1/two_threads", |b| {
        b.iter_custom(|iters| {
            two_threads(&one, iters, |r| {
                black_box(r.with_cached_service(black_box("svc"), &[], |i| i.service.port()));
            })
        })
    });
    g.finish();
}

/// Polls a lookup once, as `.await` does in an async fn: a cached lookup is
/// ready at the first poll.
#[inline]
fn ready<F: Future>(lookup: F) -> F::Output {
    match pin!(lookup).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(found) => found,
        Poll::Pending => panic!("not in the cache"),
    }
}

/// Runs `lookup` `iters` times on each of two threads at once; the slower
/// thread's time.
fn two_threads(registry: &Registry, iters: u64, lookup: fn(&Registry)) -> Duration {
    let run = |r: Registry| {
        std::thread::spawn(move || {
            let start = Instant::now();
            for _ in 0..iters {
                lookup(&r);
            }
            start.elapsed()
        })
    };
    let (a, b) = (run(registry.clone()), run(registry.clone()));
    a.join().unwrap().max(b.join().unwrap())
}

criterion_group!(benches, lookups);
criterion_main!(benches);
