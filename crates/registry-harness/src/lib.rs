//! Private broker processes for tests.
//!
//! Tests must never depend on whatever `nats-server` or `redis-server` happens
//! to be listening on the machine's default ports: those may be absent, shared
//! with other test runs, or configured differently. This crate starts a fresh
//! broker per test on a free loopback port, waits until it really answers, and
//! kills it when the handle is dropped.
//!
//! The API is synchronous (plain `std::process`) so it works the same from
//! `#[test]` and `#[tokio::test]` functions; starting a broker takes tens of
//! milliseconds, short enough to block an async test's thread.

#![cfg(unix)]
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// How often readiness conditions are re-checked.
const POLL: Duration = Duration::from_millis(10);
/// How long a freshly spawned broker gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster gets to connect all its routes on start.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(15);
/// How long SIGTERM gets before we fall back to SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// How long a (re)start keeps retrying while its port is still held.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Directories searched after `PATH`: Debian puts nats-server in /usr/sbin,
/// which is not on a normal user's `PATH`.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/usr/local/bin"];
/// How many trailing log lines go into error messages.
const LOG_TAIL_LINES: usize = 40;

/// Everything that can go wrong while starting or waiting for a broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The broker binary is not installed (or not where we look).
    #[error(
        "{binary} not found on PATH or in /usr/sbin: install the Debian package `{package}` \
         (apt-get install {package}) or set {env}"
    )]
    BinaryNotFound {
        /// Executable name, e.g. `nats-server`.
        binary: &'static str,
        /// Debian package that provides it.
        package: &'static str,
        /// Environment variable that overrides the lookup.
        env: &'static str,
    },
    /// The override variable was set, but not to an executable; we fail
    /// instead of silently falling back so a typo does not test the wrong binary.
    #[error("{env} is set to {path:?}, which is not an executable file")]
    BadBinaryEnv {
        /// The environment variable, e.g. `NATS_SERVER_BIN`.
        env: &'static str,
        /// Its value.
        path: PathBuf,
    },
    /// The operating system refused to start the process.
    #[error("could not spawn {binary:?}: {source}")]
    Spawn {
        /// The executable we tried to run.
        binary: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The process kept running but never became ready before the deadline.
    #[error("{what} not ready after {waited:?}; log tail:\n{log}")]
    NotReady {
        /// What we were waiting for, e.g. `nats-server on 127.0.0.1:4567`.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// Tail of the relevant server log(s).
        log: String,
    },
    /// The process died while we waited for it to become ready.
    #[error("{what} exited with {status} before becoming ready; log tail:\n{log}")]
    Exited {
        /// Which server, e.g. `redis-server on 127.0.0.1:4567`.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Tail of its log.
        log: String,
    },
    /// A cluster needs at least two nodes to have routes at all.
    #[error("a NATS cluster needs at least 2 nodes, got {nodes}")]
    ClusterTooSmall {
        /// The requested node count.
        nodes: usize,
    },
    /// Creating the temp dir or log file failed.
    #[error("harness I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Ports already handed out by [`free_port`] in this process. The kernel may
/// return the same ephemeral port to consecutive `bind(:0)` calls once the
/// probe socket is closed, which would make two parallel tests collide.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Returns a loopback TCP port that is currently free and that this process
/// has not handed out before.
///
/// The port is only probed, not reserved: another process could still grab it
/// before the broker binds, which is why starts retry on "address in use".
///
/// # Panics
/// If no loopback port can be bound at all (the machine is unusable for these tests).
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind any port on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("bound socket has a local address")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Which broker a lookup is for; keeps the error text and override variable
/// next to the binary name.
#[derive(Debug, Clone, Copy)]
struct BinarySpec {
    name: &'static str,
    package: &'static str,
    env: &'static str,
}

const NATS: BinarySpec = BinarySpec {
    name: "nats-server",
    package: "nats-server",
    env: "NATS_SERVER_BIN",
};

const REDIS: BinarySpec = BinarySpec {
    name: "redis-server",
    package: "redis-server",
    env: "REDIS_SERVER_BIN",
};

/// Resolves a broker binary from explicit inputs, so the lookup can be tested
/// without touching the process-global environment.
fn find_binary(
    spec: BinarySpec,
    env_value: Option<&OsStr>,
    path_var: Option<&OsStr>,
    fallback_dirs: &[&str],
) -> Result<PathBuf, HarnessError> {
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(HarnessError::BadBinaryEnv {
                env: spec.env,
                path,
            })
        };
    }
    let path_dirs = path_var.map(|p| std::env::split_paths(p).collect::<Vec<_>>());
    path_dirs
        .into_iter()
        .flatten()
        .chain(fallback_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(spec.name))
        .find(|candidate| is_executable(candidate))
        .ok_or(HarnessError::BinaryNotFound {
            binary: spec.name,
            package: spec.package,
            env: spec.env,
        })
}

fn locate(spec: BinarySpec) -> Result<PathBuf, HarnessError> {
    find_binary(
        spec,
        std::env::var_os(spec.env).as_deref(),
        std::env::var_os("PATH").as_deref(),
        FALLBACK_DIRS,
    )
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Creates a fresh directory for one server's log and data. The pid keeps
/// concurrent test binaries apart, the counter keeps servers within one
/// process apart, and the port makes it easy to match a dir to a failure.
fn make_temp_dir(port: u16) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "registry-harness-{}-{n}-{port}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            // Left over from an earlier process that had our pid; skip it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Connects with a short timeout so one readiness probe never eats the
/// whole polling budget.
fn connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(stream)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One broker child process plus its private directory. Shared by the NATS
/// and Redis handles so kill/reap/retry logic exists only once.
#[derive(Debug)]
struct Proc {
    what: String,
    binary: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(
        spec: BinarySpec,
        port: u16,
        log_name: &str,
        args: impl FnOnce(&Path, &Path) -> Vec<OsString>,
    ) -> Result<Self, HarnessError> {
        let binary = locate(spec)?;
        let dir = make_temp_dir(port)?;
        let log_path = dir.join(log_name);
        let args = args(&dir, &log_path);
        Ok(Proc {
            what: format!("{} on 127.0.0.1:{port}", spec.name),
            binary,
            args,
            dir,
            log_path,
            child: None,
        })
    }

    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log_path).map_or(0, |m| m.len())
    }

    /// Log written since byte `offset`, i.e. by the latest spawn only, so an
    /// old "address in use" line cannot trigger another retry.
    fn log_since(&self, offset: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = io::Seek::seek(&mut f, io::SeekFrom::Start(offset));
            let _ = f.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        // Append mode: restarts keep the earlier runs' log for post-mortems,
        // and redis can write its --logfile into the same file safely.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Spawns and waits until `probe` returns `Some`. If the process dies
    /// complaining that its address is in use (a restart racing the kernel
    /// releasing the old socket, or a stranger briefly holding the port), it
    /// is spawned again for up to [`BIND_RETRY`].
    fn start<T>(&mut self, mut probe: impl FnMut() -> Option<T>) -> Result<T, HarnessError> {
        let first_try = Instant::now();
        loop {
            let offset = self.log_len();
            self.spawn()?;
            match self.wait_ready(&mut probe) {
                Err(HarnessError::Exited { .. })
                    if first_try.elapsed() < BIND_RETRY
                        && self
                            .log_since(offset)
                            .to_ascii_lowercase()
                            .contains("address already in use") =>
                {
                    thread::sleep(Duration::from_millis(50));
                }
                other => {
                    if other.is_err() {
                        self.kill();
                    }
                    return other;
                }
            }
        }
    }

    fn wait_ready<T>(&mut self, probe: &mut impl FnMut() -> Option<T>) -> Result<T, HarnessError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(HarnessError::Exited {
                        what: self.what.clone(),
                        status,
                        log: tail(&self.log(), LOG_TAIL_LINES),
                    });
                }
            }
            if let Some(value) = probe() {
                return Ok(value);
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(HarnessError::NotReady {
                    what: self.what.clone(),
                    waited: started.elapsed(),
                    log: tail(&self.log(), LOG_TAIL_LINES),
                });
            }
            thread::sleep(POLL);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it already exited; wait() still reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain syscall on a pid we own and have not reaped yet,
            // so it cannot have been recycled for another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
                return;
            }
            thread::sleep(POLL);
        }
        self.kill();
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Reads the `INFO {...}` greeting a NATS server sends on connect and returns
/// its `server_id`, which changes on every start and identifies routes.
fn nats_probe(port: u16) -> Option<String> {
    let stream = connect(port).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let json = line.strip_prefix("INFO ")?;
    json.starts_with('{')
        .then(|| json_strings(json, "server_id").into_iter().next())
        .flatten()
}

/// Returns every string value stored under `key` in a JSON text. NATS
/// monitoring output is flat and predictable enough that a scanner beats
/// pulling in a JSON crate for a test harness.
fn json_strings(json: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\"");
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        let Some(value) = rest.trim_start().strip_prefix(':') else {
            continue;
        };
        let Some(value) = value.trim_start().strip_prefix('"') else {
            continue;
        };
        if let Some(end) = value.find('"') {
            out.push(value[..end].to_owned());
        }
    }
    out
}

/// Minimal HTTP/1.0 GET: the server closes the connection after the
/// response, so reading to EOF yields the whole body without parsing lengths.
fn http_get(port: u16, path: &str) -> io::Result<String> {
    let mut stream = connect(port)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    let status_ok = head
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code == "200");
    if status_ok {
        Ok(body.to_owned())
    } else {
        let status = head.lines().next().unwrap_or_default();
        Err(io::Error::other(format!("GET {path}: {status}")))
    }
}

/// A private `nats-server` (no JetStream) on a free loopback port.
///
/// Dropping the handle kills the server and removes its temp dir.
#[derive(Debug)]
pub struct NatsServer {
    proc: Proc,
    port: u16,
    monitor_port: Option<u16>,
    /// Changes on every start; used to tell which routes point at whom.
    server_id: String,
}

impl NatsServer {
    /// Starts a standalone server and waits until it greets clients.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(free_port(), None, Vec::new())
    }

    fn start_with(
        port: u16,
        monitor_port: Option<u16>,
        extra_args: Vec<String>,
    ) -> Result<Self, HarnessError> {
        let mut args: Vec<OsString> = vec!["-a".into(), "127.0.0.1".into()];
        args.extend(["-p".into(), port.to_string().into()]);
        if let Some(m) = monitor_port {
            args.extend(["-m".into(), m.to_string().into()]);
        }
        args.extend(extra_args.into_iter().map(OsString::from));
        let mut proc = Proc::new(NATS, port, "nats.log", |_, _| args)?;
        let server_id = proc.start(|| nats_probe(port))?;
        Ok(NatsServer {
            proc,
            port,
            monitor_port,
            server_id,
        })
    }

    /// Client URL, e.g. `nats://127.0.0.1:45678`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port; stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// HTTP monitoring port (`-m`), set for cluster nodes so tests can
    /// inspect `/routez`, `/varz` etc.; `None` for a standalone server.
    pub fn monitor_port(&self) -> Option<u16> {
        self.monitor_port
    }

    /// Kills the server with SIGKILL, simulating a crash: clients see the
    /// connection drop without a goodbye. Idempotent.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM so the server shuts down cleanly (falls back to SIGKILL
    /// after 5 s). Idempotent.
    pub fn stop_graceful(&mut self) {
        self.proc.terminate();
    }

    /// Stops the server if needed and starts it again with the same port and
    /// arguments (cluster routes included), waiting until it is ready.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.proc.kill();
        let port = self.port;
        self.server_id = self.proc.start(|| nats_probe(port))?;
        Ok(())
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Everything the server wrote to stdout/stderr across all its runs,
    /// for assertion messages.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// Several `nats-server` nodes on loopback, fully meshed with explicit routes.
///
/// Dropping the cluster kills every node.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `nodes` (at least 2) servers and waits until each has a route
    /// to every other one, so messages published on one node reach
    /// subscribers on any other as soon as this returns.
    pub fn start(nodes: usize) -> Result<Self, HarnessError> {
        if nodes < 2 {
            return Err(HarnessError::ClusterTooSmall { nodes });
        }
        // All ports up front: every node's --routes must name the others.
        let ports: Vec<(u16, u16, u16)> = (0..nodes)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut servers = Vec::with_capacity(nodes);
        for (i, &(client, cluster, monitor)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(_, c, _))| format!("nats://127.0.0.1:{c}"))
                .collect();
            let args = vec![
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cluster}"),
                "--cluster_name".to_owned(),
                "harness".to_owned(),
                "--routes".to_owned(),
                routes.join(","),
            ];
            servers.push(NatsServer::start_with(client, Some(monitor), args)?);
        }
        let cluster = NatsCluster { nodes: servers };
        cluster.wait_routes(ROUTES_TIMEOUT)?;
        Ok(cluster)
    }

    /// Node `i`, e.g. to stop or restart it.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Client URL of node `i`.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Waits until every node that has not been stopped has a route to every
    /// other such node. Call it after restarting a node: the restarted node
    /// answers clients before its routes are back, and messages published in
    /// that gap would not cross to the other nodes.
    ///
    /// Routes are matched by server id, not counted, so a stale route to a
    /// node's previous incarnation does not count as connected.
    pub fn wait_routes(&self, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let problem = match self.missing_routes() {
                Ok(missing) if missing.is_empty() => return Ok(()),
                Ok(missing) => format!("missing routes (node -> nodes): {missing:?}"),
                Err(e) => format!("monitoring endpoint failed: {e}"),
            };
            if started.elapsed() >= timeout {
                let mut log = problem;
                for (i, node) in self.nodes.iter().enumerate() {
                    log.push_str(&format!(
                        "\n--- node {i} ({}) ---\n{}",
                        node.url(),
                        tail(&node.log(), LOG_TAIL_LINES / 2)
                    ));
                }
                return Err(HarnessError::NotReady {
                    what: "NATS cluster routes".to_owned(),
                    waited: started.elapsed(),
                    log,
                });
            }
            thread::sleep(POLL);
        }
    }

    /// For each running node, the running nodes it has no route to yet.
    fn missing_routes(&self) -> io::Result<BTreeMap<usize, Vec<usize>>> {
        let running: Vec<(usize, &NatsServer)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.proc.child.is_some())
            .collect();
        let mut missing = BTreeMap::new();
        for &(i, node) in &running {
            let monitor = node
                .monitor_port
                .expect("cluster nodes have a monitor port");
            let routez = http_get(monitor, "/routez")?;
            let remote_ids = json_strings(&routez, "remote_id");
            let absent: Vec<usize> = running
                .iter()
                .filter(|&&(j, other)| j != i && !remote_ids.contains(&other.server_id))
                .map(|&(j, _)| j)
                .collect();
            if !absent.is_empty() {
                missing.insert(i, absent);
            }
        }
        Ok(missing)
    }
}

/// A private `redis-server` on a free loopback port, without persistence.
///
/// Dropping the handle kills the server and removes its temp dir.
#[derive(Debug)]
pub struct RedisServer {
    proc: Proc,
    port: u16,
}

/// True once redis answers PING. A server still loading its dataset answers
/// `-LOADING` instead, which counts as not ready yet.
fn redis_probe(port: u16) -> Option<()> {
    let mut stream = connect(port).ok()?;
    stream.write_all(b"PING\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("+PONG").then_some(())
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Result<Self, HarnessError> {
        let port = free_port();
        let mut proc = Proc::new(REDIS, port, "redis.log", |dir, log| {
            let mut args: Vec<OsString> = Vec::new();
            for (flag, value) in [
                ("--port", OsString::from(port.to_string())),
                ("--bind", "127.0.0.1".into()),
                // No RDB/AOF: tests want a clean server after every restart.
                ("--save", "".into()),
                ("--appendonly", "no".into()),
                ("--dir", dir.into()),
                ("--logfile", log.into()),
                ("--daemonize", "no".into()),
            ] {
                args.push(flag.into());
                args.push(value);
            }
            args
        })?;
        proc.start(|| redis_probe(port))?;
        Ok(RedisServer { proc, port })
    }

    /// Client URL, e.g. `redis://127.0.0.1:45678`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Client port; stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL, simulating a crash. Idempotent.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Sends SIGTERM so the server shuts down cleanly (falls back to SIGKILL
    /// after 5 s). Idempotent.
    pub fn stop_graceful(&mut self) {
        self.proc.terminate();
    }

    /// Stops the server if needed and starts it again on the same port,
    /// waiting until it answers PING. The data set starts empty again.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.proc.kill();
        let port = self.port;
        self.proc.start(|| redis_probe(port))
    }

    /// Whether the process is still alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// The server's log across all its runs, for assertion messages.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bin(dir: &Path, name: &str) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn missing_binary_names_debian_package_and_env() {
        let empty = make_temp_dir(0).unwrap();
        let err = find_binary(NATS, None, Some(empty.as_os_str()), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nats-server not found on PATH or in /usr/sbin: install the Debian package \
             `nats-server` (apt-get install nats-server) or set NATS_SERVER_BIN"
        );
        let err = find_binary(REDIS, None, None, &[empty.to_str().unwrap()]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`redis-server`"), "{msg}");
        assert!(msg.contains("REDIS_SERVER_BIN"), "{msg}");
        fs::remove_dir_all(empty).unwrap();
    }

    #[test]
    fn env_override_wins_and_must_exist() {
        let dir = make_temp_dir(0).unwrap();
        let on_path = fake_bin(&dir.join("path"), "nats-server");
        let chosen = fake_bin(&dir.join("env"), "my-nats");
        let path_var = dir.join("path").into_os_string();

        let found = find_binary(NATS, Some(chosen.as_os_str()), Some(&path_var), &[]).unwrap();
        assert_eq!(found, chosen);

        let bogus = dir.join("does-not-exist");
        let err = find_binary(NATS, Some(bogus.as_os_str()), Some(&path_var), &[]).unwrap_err();
        assert!(
            matches!(&err, HarnessError::BadBinaryEnv { env: "NATS_SERVER_BIN", path } if *path == bogus),
            "{err}"
        );

        // An empty variable is treated as unset.
        let found = find_binary(NATS, Some(OsStr::new("")), Some(&path_var), &[]).unwrap();
        assert_eq!(found, on_path);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn path_before_fallback_dirs_and_skips_non_executables() {
        let dir = make_temp_dir(0).unwrap();
        let first = dir.join("first");
        fs::create_dir_all(&first).unwrap();
        fs::write(first.join("redis-server"), "not executable").unwrap();
        let second = fake_bin(&dir.join("second"), "redis-server");
        let fallback = fake_bin(&dir.join("fallback"), "redis-server");
        let path_var = std::env::join_paths([&first, &dir.join("second")]).unwrap();
        let fallback_dir = dir.join("fallback");

        let found = find_binary(
            REDIS,
            None,
            Some(&path_var),
            &[fallback_dir.to_str().unwrap()],
        );
        assert_eq!(found.unwrap(), second);
        let found = find_binary(REDIS, None, None, &[fallback_dir.to_str().unwrap()]);
        assert_eq!(found.unwrap(), fallback);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_strings_finds_all_values() {
        let json =
            r#"{"routes": [ {"rid": 1, "remote_id": "A"}, {"remote_id" : "B"} ], "server_id":"S"}"#;
        assert_eq!(json_strings(json, "remote_id"), ["A", "B"]);
        assert_eq!(json_strings(json, "server_id"), ["S"]);
        assert!(json_strings(json, "rid").is_empty());
    }

    #[test]
    fn server_that_dies_during_startup_reports_its_log() {
        let err = NatsServer::start_with(
            free_port(),
            None,
            vec!["-c".into(), "/nonexistent/harness.conf".into()],
        )
        .unwrap_err();
        match &err {
            HarnessError::Exited { log, .. } => {
                assert!(
                    log.contains("/nonexistent/harness.conf"),
                    "log should explain: {err}"
                )
            }
            other => panic!("expected Exited, got {other}"),
        }
    }

    #[test]
    fn restart_retries_while_port_is_held() {
        let mut nats = NatsServer::start().expect("start nats");
        let port = nats.port();
        nats.stop();

        // Hold the port until the restarting server has demonstrably failed
        // to bind, so the retry path is what makes restart() succeed.
        let squatter = TcpListener::bind(loopback(port)).expect("squat on port");
        let log_path = nats.proc.log_path.clone();
        let holder = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let saw_failure = loop {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                if log.to_ascii_lowercase().contains("address already in use") {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                thread::sleep(POLL);
            };
            drop(squatter);
            saw_failure
        });
        let restarted = nats.restart();
        assert!(holder.join().unwrap(), "server never hit the held port");
        restarted.unwrap_or_else(|e| panic!("restart after port freed: {e}"));
        assert!(nats_probe(port).is_some());
    }
}
