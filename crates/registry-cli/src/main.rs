//! `registry`: see, find, watch and announce services of a pub/sub registry
//! from a shell, and serve them to Consul clients over HTTP.

mod connect;
mod error;
mod output;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use pubsub_registry::http::HttpConfig;
use pubsub_registry::{Instance, Lookup, Service, Status};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::connect::Connection;
use crate::error::CliError;

/// Service discovery over NATS or Redis, wire-compatible with
/// github.com/eddieraa/registry.
#[derive(Parser, Debug)]
#[command(name = "registry", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    conn: Connection,

    /// Log more (-v: info, -vv: debug) to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every service and its instances.
    ///
    /// Listens for announcements for --wait and asks every instance to
    /// announce itself at once ("ping all", answered by registries of this
    /// project); instances of other implementations show up at their next
    /// heartbeat (every 20 s by default), so a longer --wait finds them.
    Ls {
        /// Print JSON (an object: each service name, then the list of its
        /// instances) instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to listen.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Duration,
    },

    /// Show the instances of one service. Exit status: 0 found, 1 not found,
    /// 2 usage or connection error.
    Get {
        /// The service name.
        name: String,
        /// Print a single address (a passing instance if there is one),
        /// taking turns between instances.
        #[arg(long, conflicts_with = "json")]
        one: bool,
        /// Print JSON (a list of instances) instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Print events as they happen: registered, unregistered, expired,
    /// status-changed; one line each, with a timestamp. Ctrl-C to stop.
    Watch {
        /// Only this service (default: all).
        name: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },

    /// Announce a service on behalf of a process that cannot link the
    /// library, until Ctrl-C or SIGTERM, then unregister it.
    Register {
        /// Service name.
        #[arg(long)]
        name: String,
        /// The address it listens on (host:port).
        #[arg(long)]
        address: String,
        /// Base URL to reach it.
        #[arg(long)]
        url: Option<String>,
        /// Its version.
        #[arg(long = "version", value_name = "VERSION")]
        service_version: Option<String>,
        /// Metadata, key=value; repeatable. `tags=a,b` gives Consul tags.
        #[arg(long = "kv", value_name = "KEY=VALUE", value_parser = parse_kv)]
        kv: Vec<(String, String)>,
        /// Announced status.
        #[arg(long, default_value = "passing", value_parser = parse_status)]
        status: Status,
        /// Host name to announce (default: this machine's).
        #[arg(long)]
        host: Option<String>,
        /// Network: tcp, tcp6, unix, ...
        #[arg(long, default_value = "tcp")]
        network: String,
        /// How often to announce it again.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        interval: Duration,
    },

    /// Serve the read-only Consul-compatible HTTP API.
    Serve {
        /// Address to listen on.
        #[arg(long = "http", default_value = "127.0.0.1:8500", value_name = "ADDR")]
        addr: SocketAddr,
        /// Datacenter reported to Consul clients.
        #[arg(long, env = "REGISTRY_DATACENTER", default_value = "dc1")]
        datacenter: String,
        /// Node name reported by /v1/agent/self (default: this host's name).
        #[arg(long)]
        node_name: Option<String>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_status(s: &str) -> Result<Status, String> {
    s.parse()
        .map_err(|e: pubsub_registry::service::UnknownStatus| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("registry: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logs(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    // The NATS client logs connection failures itself; they already reach
    // the user as our one-line error, so its logs wait for -v.
    let client_level = match verbose {
        0 => LevelFilter::OFF,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    let filter = Targets::new()
        .with_default(level)
        .with_target("async_nats", client_level);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(verbose > 1),
        )
        .with(filter)
        .init();
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = &cli.conn;
    match cli.command {
        Command::Ls { json, wait } => ls(conn, json, wait).await,
        Command::Get { name, one, json } => get(conn, &name, one, json).await,
        Command::Watch { name, json } => watch(conn, name.as_deref(), json).await,
        Command::Register {
            name,
            address,
            url,
            service_version,
            kv,
            status,
            host,
            network,
            interval,
        } => {
            let mut service = Service::new(name, address).with_network(network);
            if let Some(url) = url {
                service = service.with_url(url);
            }
            if let Some(v) = service_version {
                service = service.with_version(v);
            }
            if let Some(h) = host {
                service = service.with_host(h);
            }
            for (k, v) in kv {
                service = service.with_kv(k, v);
            }
            register(conn, service, status, interval).await
        }
        Command::Serve {
            addr,
            datacenter,
            node_name,
        } => serve(conn, addr, datacenter, node_name).await,
    }
}

async fn ls(conn: &Connection, json: bool, wait: Duration) -> Result<(), CliError> {
    let registry = conn.registry(|b| b).await?;
    registry.observe_all().await?;
    if let Err(e) = registry.ping_all().await {
        tracing::warn!(error = %e, "cannot ping all instances");
    }
    tokio::time::sleep(wait).await;
    let instances = output::sorted(registry.cached_instances());
    let _ = registry.close().await;
    if json {
        output::print(&(output::json_by_name(&instances) + "\n"))?;
    } else if instances.is_empty() {
        eprintln!(
            "registry: no service heard from within {} on {}",
            humantime::format_duration(wait),
            conn.describe()
        );
    } else {
        output::print(&output::table(&instances, output::colours_on_stdout()))?;
    }
    Ok(())
}

/// How long `get` keeps listening after the first answer, for the other
/// instances' answers to the same ping.
const SETTLE: Duration = Duration::from_millis(100);

async fn get(conn: &Connection, name: &str, one: bool, json: bool) -> Result<(), CliError> {
    pubsub_registry::protocol::validate_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
    let registry = conn.registry(|b| b).await?;
    let found = registry.get_services_with(name, &Lookup::new()).await;
    if found.is_ok() {
        tokio::time::sleep(SETTLE).await;
    }
    let instances: Vec<Arc<Instance>> = registry
        .cached_instances()
        .into_iter()
        .filter(|i| i.name() == name)
        .collect();
    let _ = registry.close().await;
    if instances.is_empty() {
        return Err(CliError::NotFound {
            name: name.to_string(),
            why: format!(
                " on {} (waited {})",
                conn.describe(),
                humantime::format_duration(conn.timeout)
            ),
        });
    }
    let instances = output::sorted(instances);
    if one {
        let picked = pick_one(&instances).ok_or_else(|| CliError::NotFound {
            name: name.to_string(),
            why: ": every instance is critical".to_string(),
        })?;
        return Ok(output::print(&format!("{}\n", picked.address()))?);
    }
    if json {
        output::print(&(output::json_list(&instances) + "\n"))?;
    } else {
        output::print(&output::table(&instances, output::colours_on_stdout()))?;
    }
    Ok(())
}

/// Round-robin for a command that runs once: each run is a new process, so
/// the turn starts at a random instance instead of always the first. Passing
/// instances first, then warning ones; never a critical one.
fn pick_one(instances: &[Arc<Instance>]) -> Option<&Arc<Instance>> {
    use std::hash::{BuildHasher, RandomState};
    let of = |status| {
        instances
            .iter()
            .filter(|i| i.status == status)
            .collect::<Vec<_>>()
    };
    let candidates = [of(Status::Passing), of(Status::Warning)]
        .into_iter()
        .find(|c| !c.is_empty())?;
    let turn = RandomState::new().hash_one(std::process::id()) as usize;
    Some(candidates[turn % candidates.len()])
}

async fn watch(conn: &Connection, name: Option<&str>, json: bool) -> Result<(), CliError> {
    if let Some(name) = name {
        pubsub_registry::protocol::validate_name(name)
            .map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let mut stop = Stop::new()?;
    let registry = conn.registry(|b| b).await?;
    let mut events = match name {
        Some(name) => {
            let events = registry.events_for(name);
            registry.observe(name).await?;
            events
        }
        None => {
            let events = registry.events();
            registry.observe_all().await?;
            events
        }
    };
    let colours = !json && output::colours_on_stdout();
    // Tests and scripts wait for this line before causing events.
    eprintln!(
        "registry: watching {} on {} (Ctrl-C to stop)",
        name.map_or("every service".to_string(), |n| format!("{n:?}")),
        conn.describe()
    );
    loop {
        tokio::select! {
            () = stop.wait() => break,
            event = events.next() => match event {
                Some(Ok(event)) => {
                    let line = if json {
                        output::event_json(&event)
                    } else {
                        output::event_line(&event, colours)
                    };
                    output::print(&(line + "\n"))?;
                }
                Some(Err(lagged)) => eprintln!("registry: {lagged}"),
                None => break,
            },
        }
    }
    let _ = registry.close().await;
    Ok(())
}

async fn register(
    conn: &Connection,
    service: Service,
    status: Status,
    interval: Duration,
) -> Result<(), CliError> {
    if service.address.is_empty() {
        return Err(CliError::Usage("--address must not be empty".into()));
    }
    pubsub_registry::protocol::validate_name(&service.name)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // Signals are caught from here on, so one that comes right after the
    // announcement still unregisters.
    let mut stop = Stop::new()?;
    let registry = conn.registry(|b| b.register_interval(interval)).await?;
    let registration = registry.register(service).await?;
    let service = registration.service().clone();
    if status != Status::Passing {
        registry.set_service_status(&service, status).await?;
    }
    eprintln!(
        "registry: registered {} at {} on {} (Ctrl-C or SIGTERM to unregister)",
        service.name,
        service.address,
        conn.describe()
    );
    stop.wait().await;
    registry.close().await?;
    eprintln!(
        "registry: unregistered {} at {}",
        service.name, service.address
    );
    Ok(())
}

async fn serve(
    conn: &Connection,
    addr: SocketAddr,
    datacenter: String,
    node_name: Option<String>,
) -> Result<(), CliError> {
    let mut stop = Stop::new()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CliError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let registry = conn.registry(|b| b).await?;
    let mut config = HttpConfig::new().datacenter(datacenter);
    if let Some(node) = node_name {
        config = config.node_name(node);
    }
    let app = pubsub_registry::http::router(registry.clone(), config).await?;
    let local = listener.local_addr().map_err(CliError::Output)?;
    eprintln!(
        "registry: serving the Consul API on http://{local} for {} (Ctrl-C to stop)",
        conn.describe()
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.wait().await })
        .await
        .map_err(CliError::Output)?;
    let _ = registry.close().await;
    Ok(())
}

/// SIGINT or SIGTERM, caught from the moment it is created.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn new() -> Result<Stop, CliError> {
        Ok(Stop {
            interrupt: signal(SignalKind::interrupt()).map_err(CliError::Output)?,
            terminate: signal(SignalKind::terminate()).map_err(CliError::Output)?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("interrupted"),
            _ = self.terminate.recv() => tracing::info!("terminated"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kv_needs_an_equals_sign() {
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_kv("a="), Ok(("a".into(), String::new())));
        assert!(parse_kv("a").is_err());
        assert!(parse_kv("=b").is_err());
    }

    #[test]
    fn one_of_nothing_is_nothing() {
        assert!(pick_one(&[]).is_none());
    }
}
