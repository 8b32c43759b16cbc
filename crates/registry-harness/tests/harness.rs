//! These tests run the real brokers: they check what the rest of the
//! workspace relies on (fresh port, ready when `start` returns, crash and
//! restart on the same port, routed cluster).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use registry_harness::{free_port, HarnessError, NatsCluster, NatsServer, RedisServer};

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

fn nats_info_line(port: u16) -> String {
    let mut line = String::new();
    BufReader::new(connect(port).expect("connect to nats"))
        .read_line(&mut line)
        .expect("read INFO");
    line
}

fn redis_ping(port: u16) -> String {
    let mut stream = connect(port).expect("connect to redis");
    stream.write_all(b"PING\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

fn routez_num_routes(monitor_port: u16) -> usize {
    let mut stream = connect(monitor_port).expect("connect to monitor");
    stream
        .write_all(b"GET /routez HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let at = response.find("\"num_routes\"").expect("num_routes field");
    response[at..]
        .split(':')
        .nth(1)
        .and_then(|v| {
            v.trim()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .expect("num_routes value")
}

#[test]
fn nats_crash_and_restart_on_same_port() {
    let mut nats = NatsServer::start().expect("start nats");
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats.is_running());
    assert!(nats_info_line(port).starts_with("INFO {"));

    nats.stop();
    nats.stop(); // idempotent
    assert!(!nats.is_running());
    assert!(
        connect(port).is_err(),
        "port {port} still accepts after stop"
    );

    nats.restart().unwrap_or_else(|e| panic!("restart: {e}"));
    assert_eq!(nats.port(), port);
    assert!(nats.is_running());
    assert!(nats_info_line(port).starts_with("INFO {"));
    assert!(!nats.log().is_empty());
}

#[test]
fn nats_graceful_stop_and_restart_while_running() {
    let mut nats = NatsServer::start().expect("start nats");
    let port = nats.port();
    // restart() must also work from the running state.
    nats.restart().expect("restart running server");
    assert!(nats_info_line(port).starts_with("INFO {"));

    nats.stop_graceful();
    assert!(!nats.is_running());
    assert!(connect(port).is_err());
    nats.stop_graceful(); // idempotent
}

#[test]
fn redis_crash_and_restart_on_same_port() {
    let mut redis = RedisServer::start().expect("start redis");
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert!(redis.is_running());
    assert!(redis_ping(port).starts_with("+PONG"));

    redis.stop();
    redis.stop();
    assert!(!redis.is_running());
    assert!(
        connect(port).is_err(),
        "port {port} still accepts after stop"
    );

    redis.restart().unwrap_or_else(|e| panic!("restart: {e}"));
    assert_eq!(redis.port(), port);
    assert!(redis_ping(port).starts_with("+PONG"));
    assert!(
        redis.log().contains("Ready to accept connections"),
        "{}",
        redis.log()
    );
}

#[test]
fn redis_graceful_stop() {
    let mut redis = RedisServer::start().expect("start redis");
    let port = redis.port();
    redis.stop_graceful();
    assert!(!redis.is_running());
    assert!(connect(port).is_err());
    redis.stop_graceful();
}

#[test]
fn nats_cluster_routes_survive_node_restart() {
    let mut cluster = NatsCluster::start(3).unwrap_or_else(|e| panic!("cluster: {e}"));
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(urls.iter().collect::<BTreeSet<_>>().len(), 3);
    for (i, url) in urls.iter().enumerate() {
        assert_eq!(&cluster.url(i), url);
        let monitor = cluster.node(i).monitor_port().expect("monitor port");
        assert_eq!(routez_num_routes(monitor), 2, "node {i} routes");
    }

    cluster.node(0).stop();
    for i in 1..3 {
        let port = cluster.node(i).port();
        assert!(nats_info_line(port).starts_with("INFO {"), "node {i}");
    }
    // Only running nodes count: nodes 1 and 2 are still routed to each other.
    cluster.wait_routes(Duration::from_secs(15)).unwrap();

    cluster
        .node(0)
        .restart()
        .unwrap_or_else(|e| panic!("restart node 0: {e}"));
    cluster
        .wait_routes(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("routes after restart: {e}"));
    let monitor = cluster.node(0).monitor_port().unwrap();
    assert_eq!(routez_num_routes(monitor), 2);
}

#[test]
fn cluster_needs_two_nodes() {
    assert!(matches!(
        NatsCluster::start(1),
        Err(HarnessError::ClusterTooSmall { nodes: 1 })
    ));
}

#[test]
fn parallel_starts_get_distinct_ports() {
    let nats = thread::spawn(NatsServer::start);
    let redis = thread::spawn(RedisServer::start);
    let other_nats = NatsServer::start().expect("start nats");
    let nats = nats.join().unwrap().expect("start nats in thread");
    let redis = redis.join().unwrap().expect("start redis in thread");
    let ports: BTreeSet<u16> = [nats.port(), other_nats.port(), redis.port()].into();
    assert_eq!(ports.len(), 3, "{ports:?}");
    assert!(nats_info_line(nats.port()).starts_with("INFO {"));
    assert!(nats_info_line(other_nats.port()).starts_with("INFO {"));
}

#[test]
fn free_port_never_repeats() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let unique: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(unique.len(), ports.len());
}

#[test]
fn binary_not_found_message_names_debian_package() {
    let err = HarnessError::BinaryNotFound {
        binary: "redis-server",
        package: "redis-server",
        env: "REDIS_SERVER_BIN",
    };
    assert_eq!(
        err.to_string(),
        "redis-server not found on PATH or in /usr/sbin: install the Debian package \
         `redis-server` (apt-get install redis-server) or set REDIS_SERVER_BIN"
    );
}
