//! The load tool: measures the registry against the raw broker, in one run.
//!
//!     cargo run --release -p pubsub-registry --example load -- [SCENARIO] [--count N] [--url URL]
//!
//!     cargo run --release -p pubsub-registry --example load -- apart --runs 120
//!
//! Scenarios (all by default): `propagation` (its bursts in one process
//! also available alone as `burst`, their observer side as
//! `observer-burst`, and the whole again with sender and reader in two
//! processes as `apart`), `cold` (and `cold-task`, the same from a worker
//! task), `ingest`, `memory`,
//! `idle`, `heartbeat`; `redis` (with `--features redis`) measures
//! propagation over Redis. Without `--url` a private `nats-server` is started
//! on a free loopback port. Every figure is printed next to the raw
//! async-nats (or redis) baseline measured the same way in the same run.
//! `--runs N` runs the scenarios N times, each on a `nats-server` of its
//! own, and ends with a summary of every ratio over the runs: a burst's
//! ratio moves by a third from one run to the next on two vCPUs, so a
//! single run says little.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use pubsub_registry::transport::Transport;
use pubsub_registry::{NatsTransport, Registry, Service};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    scenarios: Vec<String>,
    count: Option<usize>,
    url: Option<String>,
    role: Option<String>,
    names: usize,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        scenarios: Vec::new(),
        count: None,
        url: None,
        role: None,
        names: 1000,
        runs: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--count" => a.count = it.next().and_then(|v| v.parse().ok()),
            "--url" => a.url = it.next(),
            "--role" => a.role = it.next(),
            "--names" => a.names = it.next().and_then(|v| v.parse().ok()).unwrap_or(1000),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(1).max(1),
            "--bench" => {}
            other if !other.starts_with('-') => a.scenarios.push(other.to_string()),
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(2);
            }
        }
    }
    a
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = args();
    if let Some(role) = &args.role {
        return child(role, &args).await;
    }
    let all = [
        "propagation",
        "cold",
        "ingest",
        "memory",
        "idle",
        "heartbeat",
    ];
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    println!("machine: {} cores, {}", num_cores(), cpu_model());
    for run in 0..args.runs {
        if args.runs > 1 {
            println!("run {} of {}", run + 1, args.runs);
        }
        run_once(&args, &scenarios).await?;
    }
    if args.runs > 1 {
        summarize(args.runs);
    }
    Ok(())
}

/// The scenarios once, on a private `nats-server` unless `--url` names one.
async fn run_once(args: &Args, scenarios: &[String]) -> Result<(), Error> {
    let _server;
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            let s = registry_harness::NatsServer::start()?;
            let u = s.url();
            _server = s;
            u
        }
    };
    for s in scenarios {
        match s.as_str() {
            "propagation" => propagation(&url, args.count.unwrap_or(2000)).await?,
            "cold" => cold(&url, args.count.unwrap_or(1000), "cold lookup").await?,
            // The same from a task on the runtime's workers, as a service's
            // request handler would look up: no wake-up of the main thread.
            "cold-task" => {
                let (url, n) = (url.clone(), args.count.unwrap_or(1000));
                tokio::spawn(async move { cold(&url, n, "cold lookup, in a task").await }).await??
            }
            "burst" => burst(&url, args.count.unwrap_or(2000)).await?,
            "observer-burst" => observer_burst(&url, args.count.unwrap_or(2000)).await?,
            "apart" => apart(&url, args.count.unwrap_or(2000)).await?,
            "ingest" => {
                for n in [1_000, 10_000, args.count.unwrap_or(100_000)] {
                    ingest(&url, n, args.names).await?;
                }
            }
            "memory" | "idle" => observer_process(&url, args.count.unwrap_or(100_000), s).await?,
            "heartbeat" => heartbeat(&url, args.count.unwrap_or(10_000)).await?,
            #[cfg(feature = "redis")]
            "redis" => redis::propagation(args.count.unwrap_or(2000)).await?,
            other => return Err(format!("unknown scenario {other}").into()),
        }
    }
    Ok(())
}

/// Every ratio [`report`] printed: what, and its p50 and p99 ratios.
static RATIOS: std::sync::Mutex<Vec<(String, [f64; 2])>> = std::sync::Mutex::new(Vec::new());

/// Each figure's ratios over the runs: min / quartiles / max, the share
/// within the target, and an interval for the median (the median of 2,000
/// resamples of the runs, drawn with a fixed seed, so the same runs always
/// give the same interval).
fn summarize(runs: usize) {
    let ratios = RATIOS.lock().unwrap();
    let mut names: Vec<&str> = Vec::new();
    for (what, ..) in ratios.iter() {
        if !names.contains(&what.as_str()) {
            names.push(what);
        }
    }
    println!("summary over {runs} runs (ratio registry / raw; min / q1 / median / q3 / max; 95% interval of the median; runs within 1.3x):");
    for what in names {
        for (i, label) in ["p50", "p99"].into_iter().enumerate() {
            let mut v: Vec<f64> = ratios
                .iter()
                .filter(|(w, _)| w == what)
                .map(|(_, r)| r[i])
                .collect();
            v.sort_by(f64::total_cmp);
            let (lo, hi) = median_interval(&v);
            let within = v.iter().filter(|&&x| x <= 1.3).count();
            println!(
                "  {what}, {label}: {:.2} / {:.2} / {:.2} / {:.2} / {:.2}x; the median's 95% interval {lo:.2} to {hi:.2}x; {within} of {} within 1.3x",
                v[0],
                quantile(&v, 0.25),
                quantile(&v, 0.5),
                quantile(&v, 0.75),
                v[v.len() - 1],
                v.len()
            );
        }
    }
}

/// The `q` quantile of sorted `v`, between neighbours.
fn quantile(v: &[f64], q: f64) -> f64 {
    let at = (v.len() - 1) as f64 * q;
    let (i, f) = (at.floor() as usize, at.fract());
    v[i] + (v[(i + 1).min(v.len() - 1)] - v[i]) * f
}

/// A 95% bootstrap interval for the median of `v`.
fn median_interval(v: &[f64]) -> (f64, f64) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift64: enough to resample runs.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| {
            let mut r: Vec<f64> = (0..v.len())
                .map(|_| v[(next() % v.len() as u64) as usize])
                .collect();
            r.sort_by(f64::total_cmp);
            quantile(&r, 0.5)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (medians[50], medians[1949])
}

/// Returns once the server has processed this connection's subscriptions:
/// `flush` only empties the socket, so a burst could beat the SUB. A
/// request nobody serves is answered by the server itself, after them.
async fn settled(client: &async_nats::Client) {
    let _ = client.request("_LOAD_BARRIER", Bytes::new()).await;
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, ours: &mut [Duration], raw: &mut [Duration]) {
    let (o50, o99, r50, r99) = (
        pct(ours, 0.5),
        pct(ours, 0.99),
        pct(raw, 0.5),
        pct(raw, 0.99),
    );
    let (p50, p99) = (
        o50.as_secs_f64() / r50.as_secs_f64(),
        o99.as_secs_f64() / r99.as_secs_f64(),
    );
    println!(
        "{what}: registry p50 {o50:?} p99 {o99:?} | raw p50 {r50:?} p99 {r99:?} | ratio p50 {p50:.2}x p99 {p99:.2}x (n={})",
        ours.len()
    );
    RATIOS.lock().unwrap().push((what.to_string(), [p50, p99]));
}

/// A raw client whose subscriptions buffer as deep as the registry's
/// (async-nats drops what does not fit; 65,536 by default).
async fn raw_client(url: &str) -> Result<async_nats::Client, Error> {
    Ok(async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 18)
        .connect(url)
        .await?)
}

/// Longest wait for a burst to arrive before counting what was lost.
const ARRIVAL_DEADLINE: Duration = Duration::from_secs(30);

/// Longest wait for the registry to give back a burst's memory.
const RELEASE_DEADLINE: Duration = Duration::from_secs(10);

async fn nats(url: &str) -> Result<Arc<NatsTransport>, Error> {
    Ok(Arc::new(NatsTransport::connect(url).await?))
}

/// From `register` in one process to the `Registered` event in another,
/// against raw publish-to-subscriber, both one at a time (paced) and all at
/// once (burst). Paced samples alternate raw and registry, one of each per
/// round, so a slow spell of the VM falls on both alike.
async fn propagation(url: &str, n: usize) -> Result<(), Error> {
    let payload = raw_payload(PACED);
    {
        let publisher = async_nats::connect(url).await?;
        let subscriber = raw_client(url).await?;
        let subject = baseline_subject(PACED);
        let mut sub = subscriber.subscribe(subject.clone()).await?;
        settled(&subscriber).await;
        let raw_once = async || {
            let s = Instant::now();
            publisher.publish(subject.clone(), payload.clone()).await?;
            sub.next().await.ok_or("raw subscription ended")?;
            Ok(s.elapsed())
        };
        let (mut ours, mut raw) = paced(|| Registry::builder().nats_url(url), n, raw_once).await?;
        report("propagation paced", &mut ours, &mut raw);
    }
    burst(url, n).await?;
    apart(url, n).await
}

/// A paced raw baseline's payload: an announcement of `name`, as the
/// registry sends it.
fn raw_payload(name: &str) -> Bytes {
    encoded_announcements(name, 1, burst_address).remove(0)
}

/// The subject a raw baseline sends `name`'s announcements on: the
/// registry's, under another main topic of the same length that no registry
/// follows. With the registry's own payloads, the raw side carries the
/// registry's bytes: a longer subject and payload cost the broker and both
/// clients more per message (until the nineteenth session the raw side
/// sent about a quarter fewer bytes a message).
fn baseline_subject(name: &str) -> String {
    format!("baseline.register.{name}")
}

/// The registry's paced name in one process.
const PACED: &str = "prop-paced";

/// The address of the `i`th instance of a burst in one process.
fn burst_address(i: usize) -> String {
    format!("10.0.{}.{}:80", i / 256, i % 256)
}

/// The burst half of [`propagation`] in one process, on its own for
/// profiling.
async fn burst(url: &str, n: usize) -> Result<(), Error> {
    // Burst: the latency of each message is its arrival, timestamped by a
    // reader task of its own, minus its own send time. A burst lasts a few
    // milliseconds, which one descheduling of the VM can double: rounds
    // alternate raw and registry, and all rounds' samples are pooled.
    let publisher = async_nats::connect(url).await?;
    let subscriber = raw_client(url).await?;
    // The registries' connections, kept from round to round like the raw
    // clients (see `registry_burst`).
    let sending: Arc<dyn Transport> = nats(url).await?;
    let observing: Arc<dyn Transport> = nats(url).await?;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for round in 0..BURST_ROUNDS {
        let name = format!("prop-burst-{round}");
        let payloads = encoded_announcements(&name, n, burst_address);
        raw.extend(raw_burst(&publisher, &subscriber, baseline_subject(&name), payloads).await?);
        ours.extend(registry_burst(on(&sending), on(&observing), &name, n).await?);
    }
    report("propagation burst", &mut ours, &mut raw);
    observer_burst(url, n).await
}

/// Bursts are measured this many times, alternating raw and registry.
const BURST_ROUNDS: usize = 5;

/// One raw burst: `payloads` published on `subject` at once; each one's
/// latency is its arrival at a reader task of its own minus its send time.
async fn raw_burst(
    publisher: &async_nats::Client,
    subscriber: &async_nats::Client,
    subject: String,
    payloads: Vec<Bytes>,
) -> Result<Vec<Duration>, Error> {
    let sub = subscriber.subscribe(subject.clone()).await?;
    settled(subscriber).await;
    let reader = arrivals::<_, Instant>(sub, payloads.len());
    let sent = send_all::<Instant>(publisher, &subject, payloads).await?;
    let arrived = reader.await??;
    Ok(arrived
        .iter()
        .zip(&sent)
        .map(|(a, s)| a.since(*s))
        .collect())
}

/// Publishes `payloads` on `subject` in one go; returns each one's send time.
///
/// As a registry publishes: each payload moved into its publish (the first
/// clone of a `Bytes` made from a `Vec` allocates), and the subject made
/// once and shared.
async fn send_all<T: Stamp>(
    publisher: &async_nats::Client,
    subject: &str,
    payloads: Vec<Bytes>,
) -> Result<Vec<T>, Error> {
    let subject = async_nats::Subject::from(subject);
    let mut sent = Vec::with_capacity(payloads.len());
    for p in payloads {
        sent.push(T::now());
        publisher.publish(subject.clone(), p).await?;
    }
    publisher.flush().await?;
    Ok(sent)
}

/// Registers `services` in one go; returns each one's send time.
async fn register_all<T: Stamp>(
    server: &Registry,
    services: Vec<Service>,
) -> Result<Vec<T>, Error> {
    let mut sent = Vec::with_capacity(services.len());
    for svc in services {
        sent.push(T::now());
        server.register(svc).await?;
    }
    Ok(sent)
}

/// A timestamp: [`Instant`] within a process, [`Wall`] across processes.
trait Stamp: Copy + Send + 'static {
    fn now() -> Self;
    /// The time from `sent` to `self`.
    fn since(self, sent: Self) -> Duration;
}

impl Stamp for Instant {
    fn now() -> Self {
        Instant::now()
    }
    fn since(self, sent: Self) -> Duration {
        self - sent
    }
}

/// Nanoseconds of the wall clock: the one clock two processes read alike
/// (`Instant` cannot cross a process boundary). A burst lasts milliseconds,
/// over which a slewing clock drifts by at most a microsecond or two.
#[derive(Clone, Copy)]
struct Wall(u64);

impl Stamp for Wall {
    fn now() -> Self {
        Wall(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        )
    }
    fn since(self, sent: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(sent.0))
    }
}

/// The observer side of a burst alone: one raw connection publishes `n`
/// announcements at once, as fast as it can, to a raw subscriber and then to
/// a registry observer. Each arrival is timestamped as it is read, by a task
/// of its own (the publisher does not read), so the figure is the latency of
/// delivery (raw) against delivery, decoding, caching and the event (ours),
/// for the same sender and sending rate.
async fn observer_burst(url: &str, n: usize) -> Result<(), Error> {
    let publisher = async_nats::connect(url).await?;
    let address = |i: usize| format!("10.1.{}.{}:80", i / 256, i % 256);
    let subscriber = raw_client(url).await?;
    // Kept from round to round, like the raw subscriber (see `registry_burst`).
    let observing: Arc<dyn Transport> = nats(url).await?;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for round in 0..BURST_ROUNDS {
        let name = format!("prop-observer-{round}");
        // Each side its own payloads, so that both drop theirs alike.
        let payloads = encoded_announcements(&name, n, address);
        let subject = baseline_subject(&name);
        raw.extend(raw_burst(&publisher, &subscriber, subject, payloads).await?);

        let observer = on(&observing).event_capacity(n * 2).build().await?;
        observer.observe(&name).await?;
        // Built before sending: the raw side does nothing but read while
        // its burst is in flight, and neither may this process's other tasks.
        let index: HashMap<String, usize> = (0..n).map(|i| (address(i), i)).collect();
        let subject = format!("registry.register.{name}");
        let reader = event_arrivals::<Instant>(observer.events_for(&name), n);
        let payloads = encoded_announcements(&name, n, address);
        let sent = send_all::<Instant>(&publisher, &subject, payloads).await?;
        ours.extend(reader.await??.into_iter().map(|(a, t)| t - sent[index[&a]]));
        observer.close().await?;
    }
    report(
        "propagation burst, observer side (same raw sender)",
        &mut ours,
        &mut raw,
    );
    Ok(())
}

/// Propagation again with the sender and the reader in two processes, as
/// issue 5 words the target ("from `register` in one process to the event
/// in another"): this process sends, a child reads, and all times are read
/// off the wall clock, which both share. Paced first (one raw message then
/// one registration, each read before the next is sent), then bursts: each
/// round a raw burst, a registry burst, and the raw sender's announcements
/// to a registry observer, in that order on both sides.
async fn apart(url: &str, n: usize) -> Result<(), Error> {
    let (mut child, mut lines) = spawn_role("reader", url, n)?;
    let publisher = async_nats::connect(url).await?;
    let raw_payload = raw_payload(APART_PACED);
    let index: HashMap<String, usize> = (0..n).map(|i| (apart_address(i), i)).collect();
    let latencies = |arrived: Vec<(String, Wall)>, sent: &[Wall]| -> Result<Vec<Duration>, Error> {
        arrived
            .into_iter()
            .map(|(key, at)| {
                let i = index
                    .get(&key)
                    .ok_or_else(|| format!("unknown arrival {key}"))?;
                Ok(at.since(sent[*i]))
            })
            .collect()
    };

    let (mut raw, mut ours) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // One connection for every registry this side builds, as for the raw
    // publisher (see `registry_burst`).
    let sending: Arc<dyn Transport> = nats(url).await?;
    let server = on(&sending).build().await?;
    let name = APART_PACED;
    expect_line(&mut lines, "ready").await?;
    // The first registration of a name also subscribes to its pings.
    server.register(Service::new(name, "warm:1")).await?;
    expect_line(&mut lines, "warm").await?;
    for i in 0..n {
        let sent = Wall::now();
        publisher
            .publish(baseline_subject(APART_PACED), raw_payload.clone())
            .await?;
        raw.push(read_at(&mut lines).await?.since(sent));
        let sent = Wall::now();
        server
            .register(Service::new(name, apart_address(i)))
            .await?;
        ours.push(read_at(&mut lines).await?.since(sent));
    }
    server.close().await?;
    report("propagation paced, two processes", &mut ours, &mut raw);

    let (mut raw, mut ours, mut observer_side) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..BURST_ROUNDS {
        let (name, observed) = apart_names(round);
        let raw_payloads = encoded_announcements(&name, n, apart_address);
        expect_line(&mut lines, "ready").await?;
        let sent = send_all::<Wall>(&publisher, &baseline_subject(&name), raw_payloads).await?;
        raw.extend(latencies(read_arrived(&mut lines).await?, &sent)?);

        let server = on(&sending).build().await?;
        expect_line(&mut lines, "ready").await?;
        server.register(Service::new(&name, "warm:1")).await?;
        expect_line(&mut lines, "warm").await?;
        let services: Vec<Service> = (0..n)
            .map(|i| Service::new(&name, apart_address(i)))
            .collect();
        let sent = register_all::<Wall>(&server, services).await?;
        ours.extend(latencies(read_arrived(&mut lines).await?, &sent)?);
        server.close().await?;

        let payloads = encoded_announcements(&observed, n, apart_address);
        expect_line(&mut lines, "ready").await?;
        let sent = send_all::<Wall>(
            &publisher,
            &format!("registry.register.{observed}"),
            payloads,
        )
        .await?;
        observer_side.extend(latencies(read_arrived(&mut lines).await?, &sent)?);
    }
    child.wait().await?;
    report("propagation burst, two processes", &mut ours, &mut raw);
    report(
        "propagation burst, two processes, observer side (same raw sender)",
        &mut observer_side,
        &mut raw,
    );
    Ok(())
}

/// The reading side of [`apart`], in the child, step for step with it.
/// Says `ready` when subscribed and `warm` once it has the sender's first
/// registration; prints each paced arrival's time on a line of its own, and
/// each burst's arrivals on one line.
async fn reader(url: &str, n: usize) -> Result<(), Error> {
    let raw = raw_client(url).await?;
    // One connection for every observer, as for the raw subscriptions.
    let observing: Arc<dyn Transport> = nats(url).await?;
    let observer = || on(&observing).event_capacity(n * 2).build();

    let mut sub = raw.subscribe(baseline_subject(APART_PACED)).await?;
    settled(&raw).await;
    let registry = observer().await?;
    let name = APART_PACED;
    registry.observe(name).await?;
    let mut events = registry.events_for(name);
    println!("ready");
    wait_for_warm(&mut events).await?;
    println!("warm");
    for _ in 0..n {
        tokio::time::timeout(ARRIVAL_DEADLINE, sub.next())
            .await?
            .ok_or("raw subscription ended")?;
        println!("at {}", Wall::now().0);
        tokio::time::timeout(ARRIVAL_DEADLINE, events.next())
            .await?
            .ok_or("events ended")??;
        println!("at {}", Wall::now().0);
    }
    registry.close().await?;

    for round in 0..BURST_ROUNDS {
        let (name, observed) = apart_names(round);
        let sub = raw.subscribe(baseline_subject(&name)).await?;
        settled(&raw).await;
        println!("ready");
        let at = arrivals::<_, Wall>(sub, n).await??;
        // Raw messages are all alike: each is named by its place, as one
        // connection's messages arrive in the order they were sent.
        print_arrived(
            at.into_iter()
                .enumerate()
                .map(|(i, t)| (apart_address(i), t)),
        );

        let registry = observer().await?;
        registry.observe(&name).await?;
        let mut events = registry.events_for(&name);
        println!("ready");
        wait_for_warm(&mut events).await?;
        println!("warm");
        print_arrived(event_arrivals::<Wall>(events, n).await??);
        registry.close().await?;

        let registry = observer().await?;
        registry.observe(&observed).await?;
        let events = registry.events_for(&observed);
        println!("ready");
        print_arrived(event_arrivals::<Wall>(events, n).await??);
        registry.close().await?;
    }
    Ok(())
}

/// Reads events until the sender's first registration, `warm:1`.
async fn wait_for_warm(events: &mut pubsub_registry::EventStream) -> Result<(), Error> {
    loop {
        let event = tokio::time::timeout(ARRIVAL_DEADLINE, events.next())
            .await?
            .ok_or("events ended")??;
        if event.instance.address() == "warm:1" {
            return Ok(());
        }
    }
}

/// The registry's paced name across processes.
const APART_PACED: &str = "apart-paced";

/// A round's names across processes: the registry's burst (whose
/// announcements the raw baseline sends too, under `baseline_subject`) and
/// the raw sender's announcements to an observer. Of one length, so that
/// all three bursts carry the same bytes.
fn apart_names(round: usize) -> (String, String) {
    (format!("apart-r{round}"), format!("apart-o{round}"))
}

/// The address of the `i`th instance sent across processes.
fn apart_address(i: usize) -> String {
    format!("10.2.{}.{}:80", i / 256, i % 256)
}

/// One line: `arrived` then `key=nanoseconds` for each arrival.
fn print_arrived(arrived: impl IntoIterator<Item = (String, Wall)>) {
    let mut line = String::from("arrived");
    for (key, at) in arrived {
        line.push_str(&format!(" {key}={}", at.0));
    }
    println!("{line}");
}

/// Reads a line written by [`print_arrived`].
async fn read_arrived(lines: &mut ChildLines) -> Result<Vec<(String, Wall)>, Error> {
    let line = lines.next_line().await?.ok_or("the reader ended")?;
    let rest = line
        .strip_prefix("arrived")
        .ok_or_else(|| format!("the reader said {line}"))?;
    rest.split_whitespace()
        .map(|pair| {
            let (key, at) = pair.rsplit_once('=').ok_or("a malformed arrival")?;
            Ok((key.to_string(), Wall(at.parse()?)))
        })
        .collect()
}

/// Reads a paced arrival's time from the child.
async fn read_at(lines: &mut ChildLines) -> Result<Wall, Error> {
    let line = lines.next_line().await?.ok_or("the reader ended")?;
    let at = line
        .strip_prefix("at ")
        .ok_or_else(|| format!("the reader said {line}"))?;
    Ok(Wall(at.parse()?))
}

/// Waits for the child to say `what`.
async fn expect_line(lines: &mut ChildLines, what: &str) -> Result<(), Error> {
    match lines.next_line().await? {
        Some(line) if line == what => Ok(()),
        Some(line) => Err(format!("the reader said {line}, not {what}").into()),
        None => Err("the reader ended".into()),
    }
}

/// `n` announcements of `name` as a registry sends them (its host name
/// filled in), the `i`th from `address(i)`: what a raw sender publishes to a
/// registry observer, and what the raw baselines publish.
fn encoded_announcements(name: &str, n: usize, address: impl Fn(usize) -> String) -> Vec<Bytes> {
    // The host name a registry fills in by default.
    let host = gethostname::gethostname();
    let host = host.to_string_lossy();
    (0..n)
        .map(|i| {
            Bytes::from(pubsub_registry::protocol::encode_announcement(
                &Service::new(name, address(i)).with_host(&*host),
                pubsub_registry::Status::Passing,
                std::time::SystemTime::now(),
                Duration::from_secs(20),
            ))
        })
        .collect()
}

/// `n` rounds of one raw message (`raw_once` times it) and one registration
/// from one registry to the `Registered` event on another (both built by
/// `builder`), each timed on its own. Returns (registry, raw).
async fn paced(
    builder: impl Fn() -> pubsub_registry::RegistryBuilder,
    n: usize,
    mut raw_once: impl AsyncFnMut() -> Result<Duration, Error>,
) -> Result<(Vec<Duration>, Vec<Duration>), Error> {
    let server = builder().build().await?;
    let observer = builder().build().await?;
    let name = PACED;
    observer.observe(name).await?;
    let mut events = observer.events_for(name);
    // The first registration of a name also subscribes to its pings.
    server.register(Service::new(name, "warm:1")).await?;
    events.next().await;
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        raw.push(raw_once().await?);
        let s = Instant::now();
        server
            .register(Service::new(name, burst_address(i)))
            .await?;
        events.next().await.ok_or("events ended")??;
        ours.push(s.elapsed());
    }
    server.close().await?;
    observer.close().await?;
    Ok((ours, raw))
}

/// A registry builder over `transport`: a new registry on a connection
/// that is already there.
fn on(transport: &Arc<dyn Transport>) -> pubsub_registry::RegistryBuilder {
    Registry::builder().transport(transport.clone())
}

/// From `register` on one registry (built by `sending`) to the
/// `Registered` event on another (built by `observing`), `n` registrations
/// of `name` at once.
///
/// The registries are new each round, but for NATS their connections are
/// not: the caller keeps them from round to round, as the raw baseline
/// keeps its clients. A connection's first burst meets the broker's
/// receive window at its starting size. With a new connection each round,
/// about one round in fourteen stopped at a full window, and the rest of
/// that burst arrived 40 or 200 ms late: Linux's minimum delayed-ACK and
/// retransmission times (eighteenth session, BENCHMARKS.md section 2).
async fn registry_burst(
    sending: pubsub_registry::RegistryBuilder,
    observing: pubsub_registry::RegistryBuilder,
    name: &str,
    n: usize,
) -> Result<Vec<Duration>, Error> {
    let server = sending.build().await?;
    let observer = observing.event_capacity(n * 2).build().await?;
    observer.observe(name).await?;
    let mut events = observer.events_for(name);
    // The first registration of a name also subscribes to its pings.
    server.register(Service::new(name, "warm:1")).await?;
    events.next().await;
    let mut ours = Vec::with_capacity(n);
    // Each event is timestamped as it arrives, by a reader task of its own,
    // as for the raw baseline: the sending loop never delays it.
    let reader = event_arrivals::<Instant>(events, n);
    let services: Vec<Service> = (0..n)
        .map(|i| Service::new(name, burst_address(i)))
        .collect();
    // Built before the burst, like `services`: nothing but the burst may
    // take CPU while it is in flight, as on the raw side.
    let index: HashMap<String, usize> = (0..n).map(|i| (burst_address(i), i)).collect();
    let started = Instant::now();
    let sent = register_all::<Instant>(&server, services).await?;
    let registering = started.elapsed();
    for (address, at) in reader.await?? {
        if let Some(&i) = index.get(&address) {
            ours.push(at - sent[i]);
        }
    }
    println!(
        "  ({n} register calls took {registering:?}; all events {:?} after the first call)",
        started.elapsed()
    );
    server.close().await?;
    observer.close().await?;
    Ok(ours)
}

/// A client with an empty cache finding a service that answers pings,
/// against a raw request/reply round trip. Samples alternate raw and
/// registry, one of each per round.
async fn cold(url: &str, n: usize, what: &str) -> Result<(), Error> {
    let responder = async_nats::connect(url).await?;
    let mut requests = responder.subscribe("raw.cold").await?;
    settled(&responder).await;
    let answering = responder.clone();
    let _responding = Scoped(tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if let Some(reply) = m.reply {
                let _ = answering.publish(reply, m.payload).await;
            }
        }
    }));
    let requester = async_nats::connect(url).await?;

    // One name per lookup: each instance answers pings for a name once per
    // 50 ms at most, so lookups of one name in quick succession would
    // measure that window, not the round trip.
    let server = Registry::builder().nats_url(url).build().await?;
    for i in 0..n {
        server
            .register(Service::new(format!("cold-{i}"), "10.0.0.1:80"))
            .await?;
    }
    let shared: Arc<dyn Transport> = nats(url).await?;
    let (mut raw, mut ours) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let client = on(&shared).timeout(Duration::from_secs(5)).build().await?;
        // Both samples start from the same quiet point: what building and
        // closing set off is over.
        settled(&requester).await;
        shared.flush().await?;
        let s = Instant::now();
        requester
            .request("raw.cold", Bytes::from_static(b"{}"))
            .await?;
        raw.push(s.elapsed());

        let name = format!("cold-{i}");
        let s = Instant::now();
        client.get_service(&name).await?;
        ours.push(s.elapsed());
        client.close().await?;
    }
    report(what, &mut ours, &mut raw);
    server.close().await?;
    Ok(())
}

/// `n` announcements of distinct instances over 1,000 names, published by 4
/// connections as fast as they can, into one observer of everything.
async fn ingest(url: &str, n: usize, names: usize) -> Result<(), Error> {
    let payloads = announcements(n, names);
    let publishers: Vec<async_nats::Client> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(async_nats::connect(url).await?);
        }
        v
    };

    // Raw: a subscriber of everything counting what it receives.
    let subscriber = raw_client(url).await?;
    let mut sub = subscriber.subscribe("registry.register.>").await?;
    settled(&subscriber).await;
    let start = Instant::now();
    let last_publish = publish_all(&publishers, &payloads).await?;
    for got in 0..n {
        match tokio::time::timeout_at(last_publish + ARRIVAL_DEADLINE, sub.next()).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err("raw subscription ended".into()),
            Err(_) => return Err(format!("raw subscriber: {} of {n} lost", n - got).into()),
        }
    }
    let raw_done = start.elapsed();
    let raw_after = Instant::now() - last_publish;
    drop(sub);

    let observer = Registry::builder().nats_url(url).build().await?;
    observer.observe_all().await?;
    let start = Instant::now();
    let last_publish = publish_all(&publishers, &payloads).await?;
    while observer.stats().instances < n {
        if Instant::now() > last_publish + ARRIVAL_DEADLINE {
            let lost = n - observer.stats().instances;
            return Err(format!("registry: {lost} of {n} instances lost").into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let ours_done = start.elapsed();
    let ours_after = Instant::now() - last_publish;
    println!(
        "ingest {n} ({names} names): registry all visible {ours_done:?} after the first publish, {ours_after:?} after the last; {:.0} announcements/s, {:.2} us each \
         | raw subscriber {raw_done:?} / {raw_after:?}; {:.0}/s | ratio {:.2}x",
        n as f64 / ours_done.as_secs_f64(),
        ours_done.as_secs_f64() * 1e6 / n as f64,
        n as f64 / raw_done.as_secs_f64(),
        ours_done.as_secs_f64() / raw_done.as_secs_f64(),
    );
    observer.close().await?;
    Ok(())
}

/// Pre-encoded announcements of `n` instances over `names` names, as their
/// own registries would send them (20 s interval).
fn announcements(n: usize, names: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            let name = format!("svc-{}", i % names.max(1));
            let s = Service::new(
                &name,
                format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256),
            )
            .with_url(format!("http://10.0.0.1:{}/", 8000 + i % 1000))
            .with_version("1.2.3")
            .with_host("host-a")
            .with_kv("zone", "eu-1");
            let payload = pubsub_registry::protocol::encode_announcement(
                &s,
                pubsub_registry::Status::Passing,
                std::time::SystemTime::now(),
                Duration::from_secs(20),
            );
            (format!("registry.register.{name}"), Bytes::from(payload))
        })
        .collect()
}

async fn publish_all(
    publishers: &[async_nats::Client],
    payloads: &[(String, Bytes)],
) -> Result<Instant, Error> {
    let chunk = payloads.len().div_ceil(publishers.len());
    let tasks: Vec<_> = publishers
        .iter()
        .zip(payloads.chunks(chunk))
        .map(|(p, part)| {
            let p = p.clone();
            let part = part.to_vec();
            tokio::spawn(async move {
                for (subject, payload) in part {
                    p.publish(subject, payload).await?;
                }
                p.flush().await?;
                Ok::<_, Error>(Instant::now())
            })
        })
        .collect();
    let mut last = Instant::now();
    for t in tasks {
        last = last.max(t.await??);
    }
    Ok(last)
}

type ChildLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// This tool again, in a child process playing `role` against `url`: its
/// memory and CPU are then its own. Returns it and its output lines.
fn spawn_role(
    role: &str,
    url: &str,
    n: usize,
) -> Result<(tokio::process::Child, ChildLines), Error> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--role", role, "--url", url, "--count", &n.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    Ok((child, lines))
}

/// Runs an observer in a child process so that its memory and CPU are its
/// own: the child reports its resident memory once it holds `n` instances,
/// then its CPU use over 10 s with no traffic (their interval is 20 s).
async fn observer_process(url: &str, n: usize, what: &str) -> Result<(), Error> {
    let (mut child, mut lines) = spawn_role("observer", url, n)?;
    let ready = lines.next_line().await?.ok_or("child ended")?;
    if ready != "ready" {
        return Err(format!("child said {ready}").into());
    }
    let publishers = vec![async_nats::connect(url).await?];
    publish_all(&publishers, &announcements(n, 1000)).await?;
    while let Some(line) = lines.next_line().await? {
        if line.starts_with(what) {
            println!("{line}");
            break;
        }
    }
    let _ = child.kill().await;
    Ok(())
}

/// A task that ends with the scenario that spawned it, however that ends.
/// A responder or counter left running keeps its connection, and the next
/// scenario on the same server shares its subjects: the responder `cold`
/// left answered every raw request of a `cold-task` after it a second
/// time, which slowed that raw baseline by about a tenth.
struct Scoped(tokio::task::JoinHandle<()>);

impl Drop for Scoped {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads `n` items of `stream` in a task of its own, timestamping each as it
/// arrives: a sending loop elsewhere never delays the reading.
fn arrivals<S, T: Stamp>(mut stream: S, n: usize) -> tokio::task::JoinHandle<Result<Vec<T>, Error>>
where
    S: futures_util::Stream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut at = Vec::with_capacity(n);
        while at.len() < n {
            match tokio::time::timeout(ARRIVAL_DEADLINE, stream.next()).await {
                Ok(Some(_)) => at.push(T::now()),
                Ok(None) => return Err("stream ended".into()),
                Err(_) => return Err(format!("{} of {n} lost", n - at.len()).into()),
            }
        }
        Ok(at)
    })
}

/// Like [`arrivals`] for registry events: the address each event names and
/// when it arrived, so it can be matched with its own send time.
fn event_arrivals<T: Stamp>(
    mut events: pubsub_registry::EventStream,
    n: usize,
) -> tokio::task::JoinHandle<Result<Vec<(String, T)>, Error>> {
    tokio::spawn(async move {
        // The instance is kept as it arrives (a reference count) and its
        // address copied out after the last one: the timed loop does no
        // more than the raw reader's.
        let mut at = Vec::with_capacity(n);
        while at.len() < n {
            match tokio::time::timeout(ARRIVAL_DEADLINE, events.next()).await {
                Ok(Some(ev)) => at.push((ev?.instance, T::now())),
                Ok(None) => return Err("events ended".into()),
                Err(_) => return Err(format!("{} of {n} events lost", n - at.len()).into()),
            }
        }
        Ok(at
            .into_iter()
            .map(|(i, t)| (i.address().to_string(), t))
            .collect())
    })
}

/// A publisher with `n` registered instances and a 5 s interval: how its
/// heartbeats spread over the interval (messages per 100 ms on the broker)
/// and what they cost it in CPU.
async fn heartbeat(url: &str, n: usize) -> Result<(), Error> {
    let counter = async_nats::connect(url).await?;
    let mut sub = counter.subscribe("registry.register.>").await?;
    settled(&counter).await;
    let (mut child, mut lines) = spawn_role("publisher", url, n)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _counting = Scoped(tokio::spawn(async move {
        while sub.next().await.is_some() {
            let _ = tx.send(Instant::now());
        }
    }));
    let ready = lines.next_line().await?.ok_or("child ended")?;
    // Skip the n announcements made on registering: count heartbeats only.
    for _ in 0..n {
        rx.recv().await.ok_or("counter ended")?;
    }
    let start = Instant::now();
    let window = Duration::from_secs(10);
    let mut buckets = vec![0usize; 100];
    while start.elapsed() < window {
        match tokio::time::timeout_at(start + window, rx.recv()).await {
            Ok(Some(t)) => {
                let b = ((t - start).as_millis() / 100) as usize;
                if b < buckets.len() {
                    buckets[b] += 1;
                }
            }
            _ => break,
        }
    }
    let cpu = lines.next_line().await?.unwrap_or_default();
    let total: usize = buckets.iter().sum();
    let max = buckets.iter().max().copied().unwrap_or(0);
    println!(
        "heartbeat {n} instances, 5 s interval ({ready}): {total} heartbeats in 10 s, {:.0}/s on average, busiest 100 ms {max} ({:.0}/s) | {cpu}",
        total as f64 / 10.0,
        max as f64 * 10.0
    );
    let _ = child.kill().await;
    Ok(())
}

async fn child(role: &str, args: &Args) -> Result<(), Error> {
    let url = args.url.clone().ok_or("--url")?;
    let n = args.count.unwrap_or(100_000);
    match role {
        "reader" => reader(&url, n).await?,
        "observer" => {
            let rss_before = rss_kib();
            let observer = Registry::builder().nats_url(&url).build().await?;
            observer.observe_all().await?;
            println!("ready");
            while observer.stats().instances < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (rss, peak, arrived) = (rss_kib(), peak_rss_kib(), Instant::now());
            let during = observer.stats().memory_releases;
            // The registry gives back what the burst's queued messages
            // left in the allocator a quiet second after the backlog.
            while observer.stats().memory_releases == during && arrived.elapsed() < RELEASE_DEADLINE
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (released, after) = (rss_kib(), arrived.elapsed());
            // Everything glibc still holds that is not live, for the size
            // of the cache alone.
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
            let trimmed = rss_kib();
            println!(
                "memory {n} instances: observer process RSS {:.1} MiB on arrival (peak {:.1} MiB; {during} releases during the burst), {:.1} MiB {after:.1?} later ({} in all), {:.1} MiB after malloc_trim ({:.1} MiB before the registry): {:.0} bytes per instance",
                rss as f64 / 1024.0,
                peak as f64 / 1024.0,
                released as f64 / 1024.0,
                observer.stats().memory_releases,
                trimmed as f64 / 1024.0,
                rss_before as f64 / 1024.0,
                (trimmed - rss_before) as f64 * 1024.0 / n as f64
            );
            let (cpu0, t0) = (cpu_time(), Instant::now());
            tokio::time::sleep(Duration::from_secs(10)).await;
            let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
            println!(
                "idle {n} instances: {:?} CPU in {wall:?} = {:.3}% of one core",
                cpu,
                cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
            );
            println!("stats {:?}", observer.stats());
        }
        "publisher" => {
            let publisher = Registry::builder()
                .nats_url(&url)
                .register_interval(Duration::from_secs(5))
                .build()
                .await?;
            let start = Instant::now();
            for i in 0..n {
                publisher
                    .register(Service::new(
                        format!("svc-{}", i % 1000),
                        format!("10.9.{}.{}:80", i / 256, i % 256),
                    ))
                    .await?;
            }
            println!("registered in {:?}", start.elapsed());
            let (cpu0, t0) = (cpu_time(), Instant::now());
            tokio::time::sleep(Duration::from_secs(10)).await;
            let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
            println!(
                "publisher CPU {:?} in {wall:?} = {:.2}% of one core",
                cpu,
                cpu.as_secs_f64() * 100.0 / wall.as_secs_f64()
            );
        }
        other => return Err(format!("unknown role {other}").into()),
    }
    Ok(())
}

/// Resident memory now, in KiB.
fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// The most resident memory the process has had, in KiB.
fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;

    /// Register-to-event over Redis against raw PUBLISH to SUBSCRIBE.
    pub async fn propagation(n: usize) -> Result<(), Error> {
        let server = registry_harness::RedisServer::start()?;
        let url = server.url();
        let client = ::redis::Client::open(url.as_str())?;
        let builder = || Registry::builder().redis_url(&url);
        {
            let payload = raw_payload(PACED);
            let subject = baseline_subject(PACED);
            let mut publisher = client.get_multiplexed_async_connection().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&subject).await?;
            let mut messages = pubsub.into_on_message();
            let raw_once = async || {
                let s = Instant::now();
                let _: () = ::redis::cmd("PUBLISH")
                    .arg(&subject)
                    .arg(&payload[..])
                    .query_async(&mut publisher)
                    .await?;
                messages.next().await.ok_or("ended")?;
                Ok(s.elapsed())
            };
            let (mut ours, mut raw) = paced(builder, n, raw_once).await?;
            report("redis propagation paced", &mut ours, &mut raw);
        }

        let mut publisher = client.get_multiplexed_async_connection().await?;
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for round in 0..BURST_ROUNDS {
            let name = format!("prop-burst-{round}");
            let subject = baseline_subject(&name);
            let payloads = encoded_announcements(&name, n, burst_address);
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&subject).await?;
            // Arrivals timestamped by a reader task of their own.
            let reader = arrivals::<_, Instant>(pubsub.into_on_message(), n);
            let mut sent = Vec::with_capacity(n);
            for payload in &payloads {
                sent.push(Instant::now());
                let _: () = ::redis::cmd("PUBLISH")
                    .arg(&subject)
                    .arg(&payload[..])
                    .query_async(&mut publisher)
                    .await?;
            }
            let arrived = reader.await??;
            raw.extend(arrived.iter().zip(&sent).map(|(a, s)| *a - *s));
            ours.extend(registry_burst(builder(), builder(), &name, n).await?);
        }
        report("redis propagation burst", &mut ours, &mut raw);
        Ok(())
    }
}
