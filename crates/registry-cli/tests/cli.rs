//! The `registry` command against a private nats-server (and redis-server):
//! exit statuses, output, and a `register` sidecar that is found, watched
//! and unregistered on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;
use registry_harness::{free_port, NatsServer, RedisServer};
use serde_json::Value;

/// How long a test waits for something that should happen.
const DEADLINE: Duration = Duration::from_secs(15);

/// Variables that would point the command somewhere else than the test's
/// broker.
const ENV: &[&str] = &[
    "NATS_URL",
    "REDIS_URL",
    "NATS_CREDS",
    "NATS_TOKEN",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_CA",
    "NATS_CERT",
    "NATS_KEY",
    "REGISTRY_MAIN_TOPIC",
    "REGISTRY_TIMEOUT",
    "REGISTRY_DATACENTER",
    "NO_COLOR",
];

/// `registry --nats <url> <args>`, in a clean environment.
fn registry(url: &str) -> Command {
    let mut cmd = Command::cargo_bin("registry").unwrap();
    for var in ENV {
        cmd.env_remove(var);
    }
    if url.starts_with("redis") {
        cmd.args(["--redis", url]);
    } else {
        cmd.args(["--nats", url]);
    }
    cmd
}

/// The same command as a child process, for the ones that run until told
/// to stop.
fn spawn(url: &str, args: &[&str]) -> Running {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("registry"));
    for var in ENV {
        cmd.env_remove(var);
    }
    let flag = if url.starts_with("redis") {
        "--redis"
    } else {
        "--nats"
    };
    let mut child = cmd
        .args([flag, url])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn registry");
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    Running {
        child,
        stdout,
        stderr,
    }
}

struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Running {
    /// Waits for a line of `stream` that contains `needle`; returns it and
    /// the lines before it.
    fn expect_line(
        which: &str,
        stream: &mpsc::Receiver<String>,
        needle: &str,
    ) -> (String, Vec<String>) {
        let deadline = Instant::now() + DEADLINE;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stream.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return (line, before),
                Ok(line) => before.push(line),
                Err(e) => panic!("no {which} line with {needle:?} ({e}); saw {before:#?}"),
            }
        }
    }

    fn stdout_line(&self, needle: &str) -> (String, Vec<String>) {
        Self::expect_line("stdout", &self.stdout, needle)
    }

    fn stderr_line(&self, needle: &str) -> String {
        Self::expect_line("stderr", &self.stderr, needle).0
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after SIGTERM");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn nats() -> NatsServer {
    NatsServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `get NAME --json` until it finds the service; returns the JSON.
fn wait_found(url: &str, name: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = registry(url)
            .args(["--timeout", "300ms", "get", name, "--json"])
            .output()
            .unwrap();
        match out.status.code() {
            Some(0) => return serde_json::from_slice(&out.stdout).unwrap(),
            Some(1) => {}
            other => panic!(
                "get {name}: status {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
        assert!(Instant::now() < deadline, "{name} never found");
    }
}

#[test]
fn a_connection_error_is_one_line_and_exit_status_2() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    for args in [
        &["get", "web"][..],
        &["ls"],
        &["watch"],
        &["serve", "--http", "127.0.0.1:0"],
    ] {
        registry(&url)
            .args(args)
            .assert()
            .code(2)
            .stdout("")
            .stderr(format!(
                "registry: cannot connect to NATS at {url}: connection refused\n"
            ));
    }
}

#[test]
fn usage_errors_exit_with_status_2() {
    let server = nats();
    let url = server.url();
    registry(&url)
        .arg("get")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("<NAME>"));
    registry(&url)
        .args(["get", "bad*name"])
        .assert()
        .code(2)
        .stderr(predicate::str::starts_with(
            "registry: invalid service name",
        ));
    registry(&url)
        .args(["register", "--name", "x"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--address"));
    registry(&url)
        .args([
            "register",
            "--name",
            "x",
            "--address",
            "a:1",
            "--kv",
            "novalue",
        ])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("KEY=VALUE"));
    registry(&url)
        .args([
            "register",
            "--name",
            "x",
            "--address",
            "a:1",
            "--status",
            "sick",
        ])
        .assert()
        .code(2);
    registry(&url)
        .args(["--password", "secret", "ls"])
        .assert()
        .code(2)
        .stderr("registry: --password needs --user\n");
    for flag in ["--creds", "--tls-ca", "--tls-cert", "--tls-key"] {
        let mut cmd = registry(&url);
        cmd.args([flag, "/nonexistent/file"]);
        if flag == "--tls-cert" {
            cmd.args(["--tls-key", "/nonexistent/file"]);
        }
        if flag == "--tls-key" {
            cmd.args(["--tls-cert", "/nonexistent/file"]);
        }
        cmd.arg("ls").assert().code(2).stderr(format!(
            "registry: cannot use {} /nonexistent/file: No such file or directory\n",
            if flag == "--tls-key" {
                "--tls-cert"
            } else {
                flag
            }
        ));
    }
    registry(&url)
        .args([
            "--tls-cert",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
            "ls",
        ])
        .assert()
        .code(2)
        .stderr("registry: --tls-cert and --tls-key go together\n");
    registry(&url).arg("--version").assert().code(0);
}

#[test]
fn get_a_service_nobody_registered_exits_with_status_1() {
    let server = nats();
    registry(&server.url())
        .args(["--timeout", "200ms", "get", "nobody"])
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicate::str::starts_with(
            "registry: service \"nobody\" not found",
        ));
}

#[test]
fn a_registered_sidecar_is_found_listed_watched_and_unregistered_on_sigterm() {
    let server = nats();
    let url = server.url();
    let watch = spawn(&url, &["watch"]);
    watch.stderr_line("watching every service");

    let mut sidecar = spawn(
        &url,
        &[
            "register",
            "--name",
            "web",
            "--address",
            "127.0.0.1:9999",
            "--url",
            "http://127.0.0.1:9999/",
            "--version",
            "1.2.3",
            "--kv",
            "tags=http,primary",
            "--kv",
            "zone=eu-1",
            "--host",
            "host-a",
        ],
    );
    sidecar.stderr_line("registered web at 127.0.0.1:9999");

    let found = wait_found(&url, "web");
    let i = &found[0];
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(i["name"], "web");
    assert_eq!(i["address"], "127.0.0.1:9999");
    assert_eq!(i["url"], "http://127.0.0.1:9999/");
    assert_eq!(i["version"], "1.2.3");
    assert_eq!(i["host"], "host-a");
    assert_eq!(i["status"], "passing");
    assert_eq!(i["kv"]["zone"], "eu-1");
    assert!(i["last_heard"].as_str().unwrap().ends_with('Z'));

    registry(&url)
        .args(["get", "web", "--one"])
        .assert()
        .code(0)
        .stdout("127.0.0.1:9999\n");
    registry(&url).args(["get", "web"]).assert().code(0).stdout(
        predicate::str::contains("SERVICE").and(predicate::str::contains("127.0.0.1:9999")),
    );

    // `ls` starts long after the announcement; "ping all" brings it in
    // without waiting for the 20 s heartbeat.
    let out = registry(&url)
        .args(["ls", "--json", "--wait", "500ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["web"][0]["address"], "127.0.0.1:9999", "{listed}");
    assert_eq!(listed.as_object().unwrap().len(), 1, "{listed}");
    registry(&url)
        .args(["ls", "--wait", "500ms"])
        .assert()
        .code(0)
        .stdout(predicate::str::contains("web").and(predicate::str::contains("1.2.3")));

    // A second sidecar, announced warning: registered, then status-changed.
    let mut warning = spawn(
        &url,
        &[
            "register",
            "--name",
            "web",
            "--address",
            "127.0.0.1:9998",
            "--status",
            "warning",
        ],
    );
    warning.stderr_line("registered web at 127.0.0.1:9998");

    let status = sidecar.terminate();
    assert!(status.success(), "register exited with {status}");
    sidecar.stderr_line("unregistered web at 127.0.0.1:9999");
    assert!(warning.terminate().success());

    let (line, before) = watch.stdout_line("unregistered web 127.0.0.1:9999");
    let mut seen = before.clone();
    seen.push(line.clone());
    let (line2, before2) = watch.stdout_line("unregistered web 127.0.0.1:9998");
    seen.extend(before2);
    seen.push(line2);
    let has = |needle: &str| seen.iter().any(|l| l.contains(needle));
    assert!(has(" registered web 127.0.0.1:9999"), "{seen:#?}");
    assert!(has(" registered web 127.0.0.1:9998"), "{seen:#?}");
    assert!(
        has(" status-changed web 127.0.0.1:9998") && has("status=passing->warning"),
        "{seen:#?}"
    );
    assert!(!has("expired"), "{seen:#?}");
    // Piped, so plain text; each line starts with an RFC 3339 timestamp.
    for l in &seen {
        assert!(!l.contains('\x1b'), "colour codes in a pipe: {l:?}");
        let stamp = l.split(' ').next().unwrap();
        assert!(
            stamp.len() == 24 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{l:?}"
        );
    }
    assert!(line.contains("host=host-a") && line.contains("version=1.2.3"));

    registry(&url)
        .args(["--timeout", "200ms", "get", "web"])
        .assert()
        .code(1);
    let mut watch = watch;
    assert!(watch.terminate().success());
}

#[test]
fn watch_json_follows_one_name() {
    let server = nats();
    let url = server.url();
    let watch = spawn(&url, &["watch", "api", "--json"]);
    watch.stderr_line("watching \"api\"");
    let mut other = spawn(&url, &["register", "--name", "other", "--address", "h:1"]);
    other.stderr_line("registered other");
    let mut api = spawn(&url, &["register", "--name", "api", "--address", "h:2"]);
    api.stderr_line("registered api");
    assert!(api.terminate().success());
    let (first, before) = watch.stdout_line("\"registered\"");
    assert!(before.is_empty(), "{before:?}");
    let (second, before) = watch.stdout_line("\"unregistered\"");
    assert!(before.is_empty(), "{before:?}");
    for line in [&first, &second] {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["instance"]["name"], "api", "{line}");
        assert_eq!(v["instance"]["address"], "h:2", "{line}");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
    assert!(other.terminate().success());
}

/// A bare HTTP/1.1 GET: status line and body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn serve_answers_consul_clients_and_stops_on_sigterm() {
    let server = nats();
    let url = server.url();
    let mut sidecar = spawn(
        &url,
        &[
            "register",
            "--name",
            "web",
            "--address",
            "10.1.2.3:8080",
            "--kv",
            "tags=http",
        ],
    );
    sidecar.stderr_line("registered web");
    let mut serve = spawn(
        &url,
        &["serve", "--http", "127.0.0.1:0", "--datacenter", "test-dc"],
    );
    let line = serve.stderr_line("serving the Consul API on http://");
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();

    let (status, body) = http_get(&addr, "/v1/agent/self");
    assert!(status.contains("200"), "{status}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Config"]["Datacenter"], "test-dc");

    // Started after the announcement: "ping all" fills the catalog at once.
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        let (status, body) = http_get(&addr, "/v1/health/service/web");
        assert!(status.contains("200"), "{status}");
        if body != "[]" {
            break body;
        }
        assert!(Instant::now() < deadline, "web never showed up");
        thread::sleep(Duration::from_millis(20));
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["Service"]["Port"], 8080);
    assert_eq!(v[0]["Service"]["Tags"][0], "http");
    assert_eq!(v[0]["Node"]["Datacenter"], "test-dc");
    let (_, services) = http_get(&addr, "/v1/catalog/services");
    assert_eq!(services, r#"{"web":["http"]}"#);

    assert!(serve.terminate().success());
    assert!(sidecar.terminate().success());
}

#[test]
fn the_same_commands_work_over_redis() {
    let server = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let mut sidecar = spawn(&url, &["register", "--name", "cache", "--address", "h:6"]);
    sidecar.stderr_line("registered cache");
    let found = wait_found(&url, "cache");
    assert_eq!(found[0]["address"], "h:6");
    let out = registry(&url)
        .args(["ls", "--json", "--wait", "500ms"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["cache"][0]["address"], "h:6", "{listed}");
    assert!(sidecar.terminate().success());
    registry(&url)
        .args(["--creds", "/nonexistent", "ls"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--creds is for NATS"));
    let closed = format!("redis://127.0.0.1:{}", free_port());
    registry(&closed)
        .args(["get", "cache"])
        .assert()
        .code(2)
        .stderr(format!(
            "registry: cannot connect to Redis at {closed}: connection refused\n"
        ));
}
