//! The wire format shared with the Go package and its Java port, and nothing
//! else: subjects, name rules, and the JSON of announcements.
//!
//! Decoding is strict about what could corrupt the cache (types, names, size)
//! and lenient where the other implementations differ (key case, unknown
//! fields, unknown status).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::service::{CompactString, Kv, Service, Status};

/// The Go package's main topic.
pub const DEFAULT_MAIN_TOPIC: &str = "registry";

/// Longest service name (bytes) accepted on any call or from the wire.
pub const MAX_NAME_LEN: usize = 256;

/// Largest payload decoded; anything larger is rejected unread.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Deepest nesting of objects and arrays accepted (a real announcement has 2).
pub const MAX_DEPTH: usize = 16;

/// What a subject under the main topic is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `<main>.register.<name>`: an announcement.
    Register,
    /// `<main>.unregister.<name>`: an instance is gone.
    Unregister,
    /// `<main>.ping.<name>`: instances of `<name>`, announce yourselves.
    Ping,
}

impl Kind {
    fn token(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::Unregister => "unregister",
            Kind::Ping => "ping",
        }
    }
}

/// `<main>.<kind>.<name>`.
///
/// ```
/// use pubsub_registry::protocol::{subject, Kind};
/// assert_eq!(subject("registry", Kind::Ping, "a.b"), "registry.ping.a.b");
/// ```
pub fn subject(main: &str, kind: Kind, name: &str) -> String {
    let kind = kind.token();
    let mut s = String::with_capacity(main.len() + kind.len() + name.len() + 2);
    s.push_str(main);
    s.push('.');
    s.push_str(kind);
    s.push('.');
    s.push_str(name);
    s
}

/// `<main>.<kind>.>`: that kind of message for every name, dotted names
/// included, as a NATS-style pattern.
///
/// ```
/// use pubsub_registry::protocol::{all_pattern, Kind};
/// assert_eq!(all_pattern("registry", Kind::Register), "registry.register.>");
/// ```
pub fn all_pattern(main: &str, kind: Kind) -> String {
    format!("{main}.{}.>", kind.token())
}

/// `<main>.pingall`: an extension of the protocol. Every instance registered
/// by this crate under the main topic answers it by announcing itself, so a
/// new observer of everything fills at once. Go and Java peers neither
/// subscribe to it nor answer; as it has no third token it cannot collide
/// with any service's subjects.
pub fn ping_all_subject(main: &str) -> String {
    format!("{main}.pingall")
}

/// Whether `subject` is the "ping all" subject of `main`.
pub fn is_ping_all(main: &str, subject: &str) -> bool {
    subject
        .strip_prefix(main)
        .and_then(|rest| rest.strip_prefix('.'))
        == Some("pingall")
}

/// Splits `<main>.<kind>.<name>` into its kind and name; `None` for anything
/// else. The name is not validated here.
pub fn parse_subject<'a>(main: &str, subject: &'a str) -> Option<(Kind, &'a str)> {
    let rest = subject.strip_prefix(main)?.strip_prefix('.')?;
    let (kind, name) = rest.split_once('.')?;
    let kind = match kind {
        "register" => Kind::Register,
        "unregister" => Kind::Unregister,
        "ping" => Kind::Ping,
        _ => return None,
    };
    Some((kind, name))
}

/// A name that would be unsafe as (part of) a subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: {reason}")]
pub struct NameError {
    /// `service name` or `main topic`.
    pub what: &'static str,
    /// The rejected name (cut to 80 characters).
    pub name: String,
    /// Why.
    pub reason: &'static str,
}

/// Checks a service name: not empty, at most [`MAX_NAME_LEN`] bytes, no NATS
/// wildcard (`*`, `>`), no whitespace or control character, no leading,
/// trailing or doubled dot. Dots inside are allowed (`billing.invoices`).
///
/// ```
/// use pubsub_registry::protocol::validate_name;
/// assert!(validate_name("billing.invoices").is_ok());
/// assert!(validate_name("a.*").is_err());
/// assert!(validate_name(".a").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<(), NameError> {
    check(name, "service name")
}

/// Checks a main topic with the same rules as a service name.
pub fn validate_main_topic(topic: &str) -> Result<(), NameError> {
    check(topic, "main topic")
}

fn check(name: &str, what: &'static str) -> Result<(), NameError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 256 bytes"
    } else if name.starts_with('.') || name.ends_with('.') {
        "it starts or ends with a dot"
    } else if name.contains("..") {
        "it has an empty segment (two dots in a row)"
    } else if name.contains(['*', '>']) {
        "it contains a wildcard (* or >)"
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "it contains whitespace or a control character"
    } else {
        return Ok(());
    };
    Err(NameError {
        what,
        name: name.chars().take(80).collect(),
        reason,
    })
}

/// A decoded register or unregister payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announcement {
    /// The service as announced.
    pub service: Service,
    /// `passing` when missing or unknown.
    pub status: Status,
    /// `t.Registered`: the sender's clock when sent, Unix milliseconds.
    pub registered_ms: Option<i64>,
    /// `t.Duration`: the sender's register interval, milliseconds.
    pub duration_ms: Option<i64>,
}

impl Announcement {
    /// The sender's register interval, when it gave a positive one.
    pub fn interval(&self) -> Option<Duration> {
        self.duration_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
    }

    /// The sender's timestamp, when it gave one that is representable.
    pub fn sent_at(&self) -> Option<SystemTime> {
        let ms = u64::try_from(self.registered_ms?).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }
}

/// Why a payload was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// Not JSON, not an object, or a field of the wrong type.
    #[error("malformed payload: {0}")]
    Json(#[from] serde_json::Error),
    /// Objects or arrays nested deeper than [`MAX_DEPTH`].
    #[error("payload nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// No `name`, or an empty one.
    #[error("payload has no name")]
    MissingName,
    /// No `add`: an instance is identified by name and address.
    #[error("payload has no address")]
    MissingAddress,
    /// The name is not a valid service name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The payload's name is not the one in the subject.
    #[error("payload names {payload:?} but was sent on the subject of {subject:?}")]
    NameMismatch {
        /// Name from the subject.
        subject: String,
        /// Name from the payload.
        payload: String,
    },
}

/// Decodes a register or unregister payload received on the subject of
/// `subject_name`, and checks it belongs there.
///
/// ```
/// use pubsub_registry::protocol::decode;
/// let a = decode(br#"{"name":"svc","add":"127.0.0.1:1","t":{"registered":1,"duration":2000}}"#, "svc").unwrap();
/// assert_eq!(a.service.address, "127.0.0.1:1");
/// assert_eq!(a.duration_ms, Some(2000));
/// ```
pub fn decode(payload: &[u8], subject_name: &str) -> Result<Announcement, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    if too_deep(payload) {
        return Err(DecodeError::TooDeep);
    }
    let Wire(a) = serde_json::from_slice(payload)?;
    if a.service.name.is_empty() {
        return Err(DecodeError::MissingName);
    }
    if a.service.address.is_empty() {
        return Err(DecodeError::MissingAddress);
    }
    validate_name(&a.service.name)?;
    if a.service.name != subject_name {
        return Err(DecodeError::NameMismatch {
            subject: subject_name.chars().take(80).collect(),
            payload: a.service.name.chars().take(80).collect(),
        });
    }
    Ok(a)
}

/// Whether brackets nest deeper than [`MAX_DEPTH`] outside strings. serde_json
/// skips unknown values without a depth limit, so this is checked first.
fn too_deep(payload: &[u8]) -> bool {
    // Fewer opening brackets than the limit, wherever they are, cannot
    // nest deeper than it: the common case, counted without branching.
    let opening = payload
        .iter()
        .fold(0usize, |n, &b| n + usize::from(b == b'{' || b == b'['));
    if opening <= MAX_DEPTH {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Encodes an announcement in the Go shape: short keys, `Registered` and
/// `Duration` capitalised, empty fields and a passing status omitted.
pub fn encode_announcement(
    service: &Service,
    status: Status,
    sent: SystemTime,
    interval: Duration,
) -> Vec<u8> {
    let registered = sent
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let t = WireTime {
        registered,
        duration: interval.as_millis() as i64,
    };
    encode(service, Some(t), status)
}

/// Encodes an unregister payload: the service alone, no `t`, no `status`.
pub fn encode_unregister(service: &Service) -> Vec<u8> {
    encode(service, None, Status::Passing)
}

fn encode(service: &Service, t: Option<WireTime>, status: Status) -> Vec<u8> {
    let out = WireOut {
        net: &service.network,
        add: &service.address,
        url: &service.url,
        name: &service.name,
        v: &service.version,
        h: &service.host,
        kv: &service.kv,
        t,
        status: (status != Status::Passing).then(|| status.as_str()),
    };
    // Serialising strings and a map of strings cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Serialize)]
struct WireOut<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    net: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    add: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    url: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    v: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    h: &'a str,
    #[serde(skip_serializing_if = "Kv::is_empty")]
    kv: &'a Kv,
    #[serde(skip_serializing_if = "Option::is_none")]
    t: Option<WireTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
}

#[derive(Serialize)]
struct WireTime {
    #[serde(rename = "Registered")]
    registered: i64,
    #[serde(rename = "Duration")]
    duration: i64,
}

/// Decoding target. Keys match without regard to case, as Go's decoder does
/// (the Java port writes `registered`, Go writes `Registered`); `null` counts
/// as absent; the last of duplicate keys wins.
struct Wire(Announcement);

impl<'de> Deserialize<'de> for Wire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(WireVisitor).map(Wire)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Announcement;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a service object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Announcement, A::Error> {
        let mut a = Announcement::default();
        while let Some(Key(key)) = map.next_key::<Key>()? {
            let s = &mut a.service;
            match key {
                "net" => s.network = opt(&mut map)?,
                "add" => s.address = opt(&mut map)?,
                "url" => s.url = opt(&mut map)?,
                "name" => s.name = opt(&mut map)?,
                "v" => s.version = opt(&mut map)?,
                "h" => s.host = opt(&mut map)?,
                "kv" => s.kv = opt(&mut map)?,
                "t" => {
                    if let Some(t) = map.next_value_seed(TimeSeed)? {
                        a.registered_ms = t.0;
                        a.duration_ms = t.1;
                    }
                }
                "status" => {
                    let status: Option<CompactString> = map.next_value()?;
                    // Unknown or missing statuses are passing (PROTOCOL.md).
                    a.status = status.and_then(|s| s.parse().ok()).unwrap_or_default();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(a)
    }
}

fn opt<'de, A: MapAccess<'de>, T: Deserialize<'de> + Default>(map: &mut A) -> Result<T, A::Error> {
    Ok(map.next_value::<Option<T>>()?.unwrap_or_default())
}

/// A known key, matched without regard to case and without allocating;
/// `""` for any other key.
struct Key(&'static str);

const KEYS: [&str; 11] = [
    "net",
    "add",
    "url",
    "name",
    "v",
    "h",
    "kv",
    "t",
    "status",
    "registered",
    "duration",
];

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                let known = KEYS.iter().find(|k| k.eq_ignore_ascii_case(v));
                Ok(Key(known.copied().unwrap_or("")))
            }
        }
        d.deserialize_str(V)
    }
}

/// `t`: (`Registered`, `Duration`), or `None` for `null`.
struct TimeSeed;

impl<'de> DeserializeSeed<'de> for TimeSeed {
    type Value = Option<(Option<i64>, Option<i64>)>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Option<(Option<i64>, Option<i64>)>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a timestamps object")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(V)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut registered, mut duration) = (None, None);
                while let Some(Key(key)) = map.next_key::<Key>()? {
                    match key {
                        "registered" => registered = map.next_value()?,
                        "duration" => duration = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some((registered, duration)))
            }
        }
        d.deserialize_option(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let s = subject("tenant.a", Kind::Register, "billing.invoices");
        assert_eq!(s, "tenant.a.register.billing.invoices");
        assert_eq!(
            parse_subject("tenant.a", &s),
            Some((Kind::Register, "billing.invoices"))
        );
        assert_eq!(parse_subject("tenant.a", "tenant.b.register.x"), None);
        assert_eq!(parse_subject("registry", "registry.other.x"), None);
        assert_eq!(parse_subject("registry", "registryx.ping.x"), None);
    }

    #[test]
    fn names() {
        for bad in [
            "", ".a", "a.", "a..b", "a*", "a.>", "a b", "a\tb", "a\u{0}", "é\n",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"a".repeat(257)).is_err());
        for good in ["a", "billing.invoices", "my-service_2", "ünïcode", "a:b/c"] {
            assert!(validate_name(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn key_case_and_nulls() {
        let brackets =
            br#"{"name":"x","add":"h:1","s":"[[[[[[[[[[[[[[[[[[[[","k":"\"[[[[[[[[[[[[[[[[[[["}"#;
        assert!(
            decode(brackets, "x").is_ok(),
            "brackets in strings do not count"
        );
        let deep = format!(
            r#"{{"name":"x","add":"h:1","z":{}{}}}"#,
            "[".repeat(16),
            "]".repeat(16)
        );
        assert!(matches!(
            decode(deep.as_bytes(), "x"),
            Err(DecodeError::TooDeep)
        ));
        assert!(matches!(
            decode(br#"{"name":"x"}"#, "x"),
            Err(DecodeError::MissingAddress)
        ));
        let a = decode(
            br#"{"NAME":"x","Add":"h:1","status":null,"kv":null,"t":null,"extra":{"deep":[1,2]}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(a.service.address, "h:1");
        assert_eq!(a.registered_ms, None);
        assert_eq!(a.status, Status::Passing);
    }

    #[test]
    fn wrong_types_are_rejected() {
        for bad in [
            r#"{"name":5}"#,
            r#"{"name":"x","add":[]}"#,
            r#"{"name":"x","kv":{"a":1}}"#,
            r#"{"name":"x","t":{"Registered":"soon"}}"#,
            r#"{"name":"x","t":5}"#,
            r#"{"name":"x","status":3}"#,
            r#"["name","x"]"#,
            r#""x""#,
        ] {
            assert!(decode(bad.as_bytes(), "x").is_err(), "{bad} accepted");
        }
    }
}
