//! The command's one error type, and the exit status each error maps to.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

/// Everything that ends the command with a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The broker could not be reached; `reason` is one human line, never a
    /// client library's debug text.
    #[error("cannot connect to {broker} at {url}: {reason}")]
    Connect {
        /// `NATS` or `Redis`.
        broker: &'static str,
        /// Where we tried.
        url: String,
        /// Why it failed.
        reason: String,
    },

    /// A file flag (`--creds`, `--tls-ca`, ...) names a file that cannot be
    /// read or used.
    #[error("cannot use {flag} {}: {reason}", path.display())]
    File {
        /// The flag.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// `get` found nothing (exit status 1, so `if registry get x` works).
    #[error("service {name:?} not found{why}")]
    NotFound {
        /// The service looked up.
        name: String,
        /// What else was tried, for the message.
        why: String,
    },

    /// Flags that make no sense together, or a value the registry refuses.
    #[error("{0}")]
    Usage(String),

    /// `serve` could not bind its address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// Why.
        source: io::Error,
    },

    /// Writing the output failed (other than a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),

    /// Anything else the registry reports.
    #[error("{0}")]
    Registry(#[from] pubsub_registry::Error),
}

impl CliError {
    /// 1 for "not found", 2 for everything else (usage, connection, ...).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotFound { .. } => 1,
            _ => 2,
        }
    }

    /// Turns the library's connection error into one readable line: the
    /// reason is taken from the deepest I/O error in the chain when there is
    /// one ("connection refused"), else from the client's own message.
    pub fn connect(broker: &'static str, url: &str, err: pubsub_registry::Error) -> CliError {
        match err {
            pubsub_registry::Error::Connect { source, .. } => CliError::Connect {
                broker,
                url: url.to_string(),
                reason: reason(source.as_ref()),
            },
            pubsub_registry::Error::InvalidName(e) => CliError::Usage(e.to_string()),
            pubsub_registry::Error::InvalidOption { .. } => CliError::Usage(err.to_string()),
            other => CliError::Connect {
                broker,
                url: url.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

fn reason(err: &(dyn StdError + 'static)) -> String {
    let mut chain = Some(err);
    let mut deepest_io = None;
    while let Some(e) = chain {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            deepest_io = Some(io);
        }
        chain = e.source();
    }
    if let Some(io) = deepest_io {
        return io_reason(io);
    }
    // async-nats prefixes its kind ("IO error: ..."); the last link of the
    // chain is the most specific text.
    let mut last = err;
    while let Some(next) = last.source() {
        last = next;
    }
    let text = last.to_string();
    // async-nats's server errors repeat the client's name.
    let text = text
        .strip_prefix("nats: ")
        .map(str::to_string)
        .unwrap_or(text);
    if let Some(io) = os_error_in(&text) {
        return io_reason(&io);
    }
    if text.is_empty() {
        err.to_string()
    } else {
        text
    }
}

/// Clients that keep an I/O error only as text (redis-rs) still end it with
/// "(os error N)": the number gives the error back.
fn os_error_in(text: &str) -> Option<io::Error> {
    let (_, rest) = text.rsplit_once("(os error ")?;
    let code = rest.strip_suffix(')')?.parse().ok()?;
    Some(io::Error::from_raw_os_error(code))
}

/// One short reason for an I/O error.
pub fn io_reason(io: &io::Error) -> String {
    use io::ErrorKind::*;
    match io.kind() {
        // The kind alone says it all, without "(os error 111)".
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut
        | AddrNotAvailable | BrokenPipe | HostUnreachable | NetworkUnreachable => {
            io.kind().to_string()
        }
        _ => {
            // A wrapped io::Error prints its inner error; a bare OS one its
            // message with "(os error N)", which is noise here.
            let text = io.to_string();
            match text.find(" (os error") {
                Some(at) => text[..at].to_string(),
                None => text,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_reads_as_one_short_line() {
        let io = io::Error::from(io::ErrorKind::ConnectionRefused);
        let err = pubsub_registry::Error::Connect {
            url: "nats://127.0.0.1:4222".into(),
            source: Box::new(io),
        };
        let err = CliError::connect("NATS", "nats://127.0.0.1:4222", err);
        assert_eq!(
            err.to_string(),
            "cannot connect to NATS at nats://127.0.0.1:4222: connection refused"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn os_error_numbers_are_read_back_from_text() {
        #[derive(Debug, thiserror::Error)]
        #[error("Connection refused (os error 111)")]
        struct TextOnly;
        assert_eq!(reason(&TextOnly), "connection refused");

        #[derive(Debug, thiserror::Error)]
        #[error("authorization violation")]
        struct Plain;
        assert_eq!(reason(&Plain), "authorization violation");
    }
}
