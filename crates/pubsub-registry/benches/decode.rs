//! What taking in one announcement costs before the cache: decoding the
//! Go-shaped JSON into a `Service`, and encoding one.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use pubsub_registry::protocol::{decode, encode_announcement};
use pubsub_registry::{Service, Status};

fn wire(c: &mut Criterion) {
    // The shape the Go package sends (../shared/protocol-vectors.jsonl).
    let payload = br#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","h":"vm","kv":{"zone":"a"},"t":{"Registered":1795535104541,"Duration":20000}}"#;
    let service = Service::new("wiredemo", "127.0.0.1:8081")
        .with_url("http://127.0.0.1:8081/api")
        .with_version("1.2.3")
        .with_host("vm")
        .with_kv("zone", "a");
    let sent = SystemTime::now();

    let mut g = c.benchmark_group("wire");
    g.bench_function("decode", |b| {
        b.iter(|| black_box(decode(black_box(payload), "wiredemo").unwrap()))
    });
    g.bench_function("encode", |b| {
        b.iter(|| {
            black_box(encode_announcement(
                black_box(&service),
                Status::Passing,
                sent,
                Duration::from_secs(20),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
