//! A cached lookup allocates nothing: counted by a global allocator that
//! tallies every allocation made on the measuring thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use futures_util::FutureExt;
use futures_util::StreamExt;
use pubsub_registry::{Filter, Lookup, MemoryBus, Registry, Service};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread-local may already be gone while a thread ends.
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn cached_lookups_do_not_allocate() {
    let bus = MemoryBus::new();
    let server = Registry::builder().memory(&bus).build().await.unwrap();
    let client = Registry::builder().memory(&bus).build().await.unwrap();
    client.observe("svc").await.unwrap();
    let mut events = client.events();
    for i in 0..10 {
        server
            .register(Service::new("svc", format!("10.0.0.{i}:80")))
            .await
            .unwrap();
        events.next().await.unwrap().unwrap();
    }
    let round_robin = Lookup::new().filter(Filter::round_robin());
    let passing = [Filter::passing()];
    // Warm up: thread-local slots of the lock-free snapshots are set up on
    // first use.
    for _ in 0..10 {
        client.get_service("svc").now_or_never().unwrap().unwrap();
        client
            .get_service_with("svc", &round_robin)
            .now_or_never()
            .unwrap()
            .unwrap();
        client.get_services("svc").now_or_never().unwrap().unwrap();
    }

    let before = allocations();
    for _ in 0..10_000 {
        let one = client.get_service("svc").now_or_never().unwrap().unwrap();
        let next = client
            .get_service_with("svc", &round_robin)
            .now_or_never()
            .unwrap()
            .unwrap();
        let all = client.get_services("svc").now_or_never().unwrap().unwrap();
        let cached = client.cached_service("svc", &passing).unwrap();
        let port = client.with_cached_service("svc", &[], |i| i.service.port());
        assert_eq!(port, Some(Some(80)));
        assert_eq!(all.len(), 10);
        std::hint::black_box((one, next, all, cached));
    }
    assert_eq!(
        allocations() - before,
        0,
        "allocations on the cached lookup path"
    );

    // The counter does count: a lookup that copies (a filtered get_services)
    // allocates.
    let before = allocations();
    let filtered = Lookup::new().filter(Filter::passing());
    client
        .get_services_with("svc", &filtered)
        .now_or_never()
        .unwrap()
        .unwrap();
    assert!(allocations() > before);
}
