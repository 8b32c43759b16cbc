//! The README's first command, the quick start, runs to the end: in memory
//! with no broker (as a new user runs it), and over NATS with `NATS_URL`.
//!
//! It runs the example binary `cargo test` builds; `cargo test --test
//! quickstart` alone runs the one last built (`cargo build --examples`
//! first).

mod common;

use std::process::Output;
use std::time::Duration;

use registry_harness::NatsServer;

/// Runs the quick start to its end, at most a minute.
fn run(nats_url: Option<&str>) -> Output {
    let mut command = std::process::Command::new(common::example("quickstart"));
    command.env_remove("NATS_URL");
    if let Some(url) = nats_url {
        command.env("NATS_URL", url);
    }
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match output.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: a signal to our own child, not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("the quick start did not end within a minute");
        }
    }
}

/// What the quick start must have done, in order: found the service on a
/// cache miss, called it, seen it unregistered, and emptied its cache.
fn check(output: &Output, transport: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let steps = [
        transport,
        "server: registered greeter at ",
        "client: found greeter at ",
        "client: GET http://",
        "-> \"hello from greeter\"",
        "cached lookups",
        "unregistered (the server closed)",
        "client: cache now holds 0 greeter(s)",
    ];
    let mut rest = &stdout[..];
    for step in steps {
        let at = rest
            .find(step)
            .unwrap_or_else(|| panic!("no {step:?} after what came before in:\n{stdout}"));
        rest = &rest[at + step.len()..];
    }
}

// One test, both runs in turn: each takes a port in 10000-10010, and two at
// once could pick the same one.
#[test]
fn the_quick_start_runs_in_memory_and_over_nats() {
    check(&run(None), "transport: in-memory");
    if cfg!(feature = "nats") {
        let server = NatsServer::start().unwrap_or_else(|e| panic!("{e}"));
        check(
            &run(Some(&server.url())),
            &format!("transport: {}", server.url()),
        );
    }
}
