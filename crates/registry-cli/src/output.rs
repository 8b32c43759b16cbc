//! How instances and events are printed: tables for people, JSON for
//! scripts, colours only on a terminal.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pubsub_registry::{Event, EventKind, Instance, Kv, Status};
use serde::Serialize;

/// One instance as `--json` prints it.
#[derive(Serialize)]
pub struct InstanceJson<'a> {
    name: &'a str,
    address: &'a str,
    url: &'a str,
    network: &'a str,
    host: &'a str,
    version: &'a str,
    status: &'static str,
    kv: &'a Kv,
    /// RFC 3339, UTC, milliseconds.
    last_heard: String,
    /// The instance's announced register interval.
    interval_ms: u128,
}

impl<'a> From<&'a Instance> for InstanceJson<'a> {
    fn from(i: &'a Instance) -> Self {
        let s = &i.service;
        InstanceJson {
            name: &s.name,
            address: &s.address,
            url: &s.url,
            network: &s.network,
            host: &s.host,
            version: &s.version,
            status: i.status.as_str(),
            kv: &s.kv,
            last_heard: timestamp(i.last_heard()),
            interval_ms: i.interval.as_millis(),
        }
    }
}

/// Sorted by name, then address, so output is stable between runs.
pub fn sorted(mut instances: Vec<Arc<Instance>>) -> Vec<Arc<Instance>> {
    instances.sort_by(|a, b| (a.name(), a.address()).cmp(&(b.name(), b.address())));
    instances
}

/// `{"name": [instances...]}`.
pub fn json_by_name(instances: &[Arc<Instance>]) -> String {
    let mut by_name: BTreeMap<&str, Vec<InstanceJson<'_>>> = BTreeMap::new();
    for i in instances {
        by_name.entry(i.name()).or_default().push(i.as_ref().into());
    }
    serde_json::to_string_pretty(&by_name).expect("plain data serialises")
}

/// `[instances...]`.
pub fn json_list(instances: &[Arc<Instance>]) -> String {
    let list: Vec<InstanceJson<'_>> = instances.iter().map(|i| i.as_ref().into()).collect();
    serde_json::to_string_pretty(&list).expect("plain data serialises")
}

/// A table with a header row, columns padded to their widest cell.
pub fn table(instances: &[Arc<Instance>], colours: bool) -> String {
    let now = SystemTime::now();
    let header = [
        "SERVICE",
        "ADDRESS",
        "HOST",
        "VERSION",
        "STATUS",
        "LAST HEARD",
    ];
    let rows: Vec<([String; 6], Status)> = instances
        .iter()
        .map(|i| {
            let s = &i.service;
            (
                [
                    s.name.to_string(),
                    s.address.to_string(),
                    s.host.to_string(),
                    s.version.to_string(),
                    i.status.to_string(),
                    ago(now, i.last_heard()),
                ],
                i.status,
            )
        })
        .collect();
    let mut widths = header.map(str::len);
    for (row, _) in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], status: Option<Status>, out: &mut String| {
        let last = cells.len() - 1;
        for (n, cell) in cells.iter().enumerate() {
            let pad = widths[n] - cell.chars().count();
            // Only the status cell is coloured; padding stays outside the
            // escape codes so columns line up.
            match (n, status) {
                (4, Some(st)) if colours => out.push_str(&paint(status_colour(st), cell)),
                _ => out.push_str(cell),
            }
            if n < last {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(&header.map(String::from), None, &mut out);
    for (row, status) in &rows {
        line(row, Some(*status), &mut out);
    }
    out
}

/// One line of `watch`.
pub fn event_line(event: &Event, colours: bool) -> String {
    let i = &event.instance;
    let s = &i.service;
    let kind = event.kind.as_str();
    let kind = if colours {
        paint(kind_colour(event.kind), kind)
    } else {
        kind.to_string()
    };
    let mut line = format!(
        "{} {kind} {} {}",
        timestamp(SystemTime::now()),
        s.name,
        s.address
    );
    if !s.host.is_empty() {
        line.push_str(&format!(" host={}", s.host));
    }
    if !s.version.is_empty() {
        line.push_str(&format!(" version={}", s.version));
    }
    match event.kind {
        EventKind::StatusChanged { previous } => {
            line.push_str(&format!(" status={previous}->{}", i.status));
        }
        _ => line.push_str(&format!(" status={}", i.status)),
    }
    line
}

/// One `watch --json` line.
pub fn event_json(event: &Event) -> String {
    #[derive(Serialize)]
    struct EventJson<'a> {
        time: String,
        event: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_status: Option<&'static str>,
        instance: InstanceJson<'a>,
    }
    let previous_status = match event.kind {
        EventKind::StatusChanged { previous } => Some(previous.as_str()),
        _ => None,
    };
    serde_json::to_string(&EventJson {
        time: timestamp(SystemTime::now()),
        event: event.kind.as_str(),
        previous_status,
        instance: event.instance.as_ref().into(),
    })
    .expect("plain data serialises")
}

/// Colours when stdout is a terminal and `NO_COLOR` is not set
/// (<https://no-color.org>).
pub fn colours_on_stdout() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes to stdout; a reader that went away (`| head`) ends the command
/// quietly instead of with an error.
pub fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other,
    }
}

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let d = now.duration_since(then).unwrap_or(Duration::ZERO);
    match d.as_secs() {
        0..=59 => format!("{:.1}s ago", d.as_secs_f64()),
        60..=3599 => format!("{}m{}s ago", d.as_secs() / 60, d.as_secs() % 60),
        s => format!("{}h{}m ago", s / 3600, s % 3600 / 60),
    }
}

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";
const CYAN: &str = "36";
const MAGENTA: &str = "35";

fn status_colour(s: Status) -> &'static str {
    match s {
        Status::Passing => GREEN,
        Status::Warning => YELLOW,
        Status::Critical => RED,
    }
}

fn kind_colour(k: EventKind) -> &'static str {
    match k {
        EventKind::Registered => GREEN,
        EventKind::Unregistered => YELLOW,
        EventKind::Expired => RED,
        EventKind::StatusChanged { .. } => CYAN,
        _ => MAGENTA,
    }
}

fn paint(colour: &str, text: &str) -> String {
    format!("\x1b[{colour}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use pubsub_registry::{MemoryBus, Registry, Service};

    #[tokio::test]
    async fn colours_only_when_asked_and_only_around_words() {
        let bus = MemoryBus::new();
        let watcher = Registry::builder().memory(&bus).build().await.unwrap();
        let mut events = watcher.events();
        watcher.observe_all().await.unwrap();
        let peer = Registry::builder()
            .memory(&bus)
            .host_name("h")
            .build()
            .await
            .unwrap();
        peer.register(Service::new("api", "10.0.0.1:1").with_version("2.0.0"))
            .await
            .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();

        let plain = event_line(&event, false);
        assert!(
            plain.ends_with(" registered api 10.0.0.1:1 host=h version=2.0.0 status=passing"),
            "{plain}"
        );
        assert!(!plain.contains('\x1b'));
        assert!(event_line(&event, true).contains(" \x1b[32mregistered\x1b[0m api "));

        let instances = [event.instance.clone()];
        let coloured = table(&instances, true);
        assert!(coloured.contains("\x1b[32mpassing\x1b[0m"), "{coloured}");
        let plain = table(&instances, false);
        assert!(!plain.contains('\x1b'));
        let lines: Vec<&str> = plain.lines().collect();
        assert_eq!(lines.len(), 2);
        // Columns line up: every cell starts where its header does.
        for header in ["ADDRESS", "HOST", "VERSION", "STATUS", "LAST HEARD"] {
            let at = lines[0].find(header).unwrap();
            assert_ne!(lines[1].as_bytes()[at], b' ', "{header} in {plain}");
            assert_eq!(lines[1].as_bytes()[at - 1], b' ', "{header} in {plain}");
        }
    }
}
