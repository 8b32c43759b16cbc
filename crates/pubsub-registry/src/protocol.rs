//! The wire format shared with the Go package and its Java port, and nothing
//! else: subjects, name rules, and the JSON of announcements.
//!
//! Decoding is strict about what could corrupt the cache (types, names, size)
//! and lenient where the other implementations differ (key case, unknown
//! fields, unknown status).

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

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
    if plainly_valid(name) {
        return Ok(());
    }
    match fault(name) {
        None => Ok(()),
        Some(reason) => Err(NameError {
            what,
            name: name.chars().take(80).collect(),
            reason,
        }),
    }
}

/// The first rule `name` breaks, in the order the rules are documented.
fn fault(name: &str) -> Option<&'static str> {
    Some(if name.is_empty() {
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
        return None;
    })
}

/// Whether `name` passes [`check`], decided in one pass over its bytes for
/// the names every message carries (printable ASCII). `false` leaves the
/// verdict, and the reason, to `check`'s rules (any non-ASCII name among
/// them: Unicode whitespace and control characters are found by `char`).
fn plainly_valid(name: &str) -> bool {
    // Printable ASCII but the wildcards: space and below are whitespace or
    // control, as is DEL; above DEL is not ASCII.
    const ALLOWED: [bool; 256] = {
        let mut allowed = [false; 256];
        let mut b = b'!';
        while b < 0x7f {
            allowed[b as usize] = b != b'*' && b != b'>';
            b += 1;
        }
        allowed
    };
    // Starting as if after a dot rejects a leading dot as an empty
    // segment, and ending after one is a trailing dot (or an empty name).
    let mut after_dot = true;
    for &b in name.as_bytes() {
        let dot = b == b'.';
        if !ALLOWED[usize::from(b)] || (dot && after_dot) {
            return false;
        }
        after_dot = dot;
    }
    !after_dot && name.len() <= MAX_NAME_LEN
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
        self.sent().map(|(_, at)| at)
    }

    /// [`sent_at`](Self::sent_at) in Unix milliseconds, 0 for none (as an
    /// instance keeps it): no round trip through `SystemTime`, which costs
    /// a division per message.
    pub(crate) fn sent_ms(&self) -> u64 {
        self.sent().map_or(0, |(ms, _)| ms)
    }

    /// The sender's timestamp both ways, when it is representable.
    fn sent(&self) -> Option<(u64, SystemTime)> {
        let ms = u64::try_from(self.registered_ms?).ok()?;
        Some((ms, UNIX_EPOCH.checked_add(Duration::from_millis(ms))?))
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
    let mut a = Announcement::default();
    decode_into(payload, subject_name, &mut a)?;
    // The payload's name is the subject's: checking one checks both.
    validate_name(subject_name)?;
    Ok(a)
}

/// [`decode`] into `a`, which must be empty (`Announcement::default()`), on
/// the subject of a name already validated (the registry checks every
/// subject's name before it looks at the payload); after an error `a`
/// holds whatever was read. The registry decodes straight into its batch
/// of changes: an announcement weighs some 200 bytes, and each move of one
/// from a returned value to the batch was a `memcpy`.
pub(crate) fn decode_into(
    payload: &[u8],
    subject_name: &str,
    a: &mut Announcement,
) -> Result<(), DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    // Nearly every payload has the plain shape, read by hand in a fraction
    // of serde's time; anything else, valid or not, goes through serde, so
    // what is accepted and every error stay those of the serde path.
    if canonical_into(payload, a).is_none() {
        // Each reader starts from an empty announcement, so that what one
        // reads owes nothing to what the other took before it gave up.
        *a = Announcement::default();
        if plain_into(payload, a).is_none() {
            *a = decode_serde(payload)?;
        }
    }
    belongs(a, subject_name)
}

/// The general path: any JSON, with serde's errors.
fn decode_serde(payload: &[u8]) -> Result<Announcement, DecodeError> {
    if too_deep(payload) {
        return Err(DecodeError::TooDeep);
    }
    let Wire(a) = serde_json::from_slice(payload)?;
    Ok(a)
}

/// Checks a decoded announcement names an instance of `subject_name`.
fn belongs(a: &Announcement, subject_name: &str) -> Result<(), DecodeError> {
    if a.service.name.is_empty() {
        return Err(DecodeError::MissingName);
    }
    if a.service.address.is_empty() {
        return Err(DecodeError::MissingAddress);
    }
    if a.service.name != subject_name {
        return Err(DecodeError::NameMismatch {
            subject: subject_name.chars().take(80).collect(),
            payload: a.service.name.chars().take(80).collect(),
        });
    }
    Ok(())
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

/// Reads into `a` (empty) the plain shape every implementation sends,
/// without serde: an object of known keys (in any case, each at most once)
/// whose values are strings without escapes; `kv` an object of such
/// strings; `t` an object of `Registered` and `Duration` as non-negative
/// integers; whitespace between tokens.
///
/// `None` for anything else, valid JSON or not (escapes, `null`, numbers
/// where strings go, unknown or repeated keys, negative numbers, ...): the
/// caller then decodes with serde, so this only has to agree with serde on
/// what it accepts. The payload is at most two levels deep, so the nesting
/// check has nothing to say about it.
fn plain_into(payload: &[u8], a: &mut Announcement) -> Option<()> {
    // Validated once, so every string read is a slice of it: the slices are
    // cut at quotes, which are ASCII and so always on character boundaries.
    let text = std::str::from_utf8(payload).ok()?;
    let mut p = Plain { text, at: 0 };
    let mut seen = [false; Field::ALL.len()];
    p.object(|p, key| {
        let field = Field::of(key)?;
        // Repeated keys (in any case) never come from a real sender: left to
        // serde, so the rules for them live in one place.
        if std::mem::replace(&mut seen[field as usize], true) {
            return None;
        }
        let s = &mut a.service;
        match field {
            Field::Net => s.network = p.string()?.into(),
            Field::Add => s.address = p.string()?.into(),
            Field::Url => s.url = p.string()?.into(),
            Field::Name => s.name = p.string()?.into(),
            Field::V => s.version = p.string()?.into(),
            Field::H => s.host = p.string()?.into(),
            Field::Kv => s.kv = p.kv()?,
            Field::T => (a.registered_ms, a.duration_ms) = p.time()?,
            // Unknown statuses are passing, as in `WireVisitor`.
            Field::Status => a.status = p.string()?.parse().unwrap_or_default(),
            // `registered` and `duration` are only known inside `t`: serde
            // skips them here, whatever their value.
            Field::Registered | Field::Duration => return None,
        }
        Some(())
    })?;
    p.end()
}

/// Reads into `a` (empty) the exact layout [`encode`] and the Go package
/// write (their fields in their order, keys as they spell them, no
/// whitespace), where the one candidate key at each point is compared as a
/// whole, instead of being read and then looked up. `None` for anything
/// else, which [`plain_into`] then reads: values are read as it reads them,
/// so this only has to agree with serde on the layout.
fn canonical_into(payload: &[u8], a: &mut Announcement) -> Option<()> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut p = Plain { text, at: 0 };
    let s = &mut a.service;
    p.lit(b"{")?;
    // Each key is tried once, in order, and only after `{` or a comma.
    // Written out, not looped over: each literal's length is then known
    // where it is compared, which compiles to a few loads instead of a call.
    let mut open = true;
    p.string_field(b"\"net\":", &mut open, &mut s.network)?;
    p.string_field(b"\"add\":", &mut open, &mut s.address)?;
    p.string_field(b"\"url\":", &mut open, &mut s.url)?;
    p.string_field(b"\"name\":", &mut open, &mut s.name)?;
    p.string_field(b"\"v\":", &mut open, &mut s.version)?;
    p.string_field(b"\"h\":", &mut open, &mut s.host)?;
    if open && p.lit(b"\"kv\":").is_some() {
        s.kv = p.kv()?;
        open = p.lit(b",").is_some();
    }
    if open && p.lit(b"\"t\":").is_some() {
        (a.registered_ms, a.duration_ms) = p.canonical_time()?;
        open = p.lit(b",").is_some();
    }
    if open && p.lit(b"\"status\":").is_some() {
        // Unknown statuses are passing, as in `WireVisitor`.
        a.status = p.string()?.parse().unwrap_or_default();
        open = p.lit(b",").is_some();
    }
    // A comma must have been followed by a key.
    (!open || p.at == 1).then_some(())?;
    p.lit(b"}")?;
    p.end()
}

/// Most `kv` entries [`plain_into`] takes: real announcements carry a
/// handful, and a hostile payload's thousands are left to the serde path.
const MAX_PLAIN_KV: usize = 32;

/// A cursor over valid UTF-8 JSON for [`plain_into`]. Every method returns
/// `None` on anything outside the plain shape; none can panic.
struct Plain<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Plain<'a> {
    /// The next byte after JSON whitespace (the four serde_json skips),
    /// without taking it; `None` at the end.
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.at) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    /// Takes `literal`, if the text goes on with exactly it (no whitespace
    /// first).
    #[inline(always)]
    fn lit<const N: usize>(&mut self, literal: &[u8; N]) -> Option<()> {
        let rest = self.text.as_bytes().get(self.at..self.at + N)?;
        (rest == literal).then(|| self.at += N)
    }

    /// For [`canonical_into`]: if a key may come (`open`) and it is `key`,
    /// its string value into `slot`; `open` then says whether a comma
    /// followed. `None` if the value is not a plain string.
    #[inline(always)]
    fn string_field<const N: usize>(
        &mut self,
        key: &[u8; N],
        open: &mut bool,
        slot: &mut CompactString,
    ) -> Option<()> {
        if *open && self.lit(key).is_some() {
            *slot = self.string()?.into();
            *open = self.lit(b",").is_some();
        }
        Some(())
    }

    /// Takes `byte`, after whitespace.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Whether only whitespace is left, as serde_json requires.
    fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// A string without escapes or control characters (which serde_json
    /// rejects raw): its text is the bytes between the quotes.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let rest = self.text.as_bytes().get(start..)?;
        let len = unescaped_len(rest);
        if rest.get(len) != Some(&b'"') {
            return None;
        }
        self.at = start + len + 1;
        self.text.get(start..start + len)
    }

    /// A non-negative integer that fits an `i64`, in serde_json's syntax (no
    /// leading zero). A fraction or exponent after it is left unread, so the
    /// object around fails on it.
    fn int(&mut self) -> Option<i64> {
        self.peek()?;
        self.digits()
    }

    /// [`int`](Self::int) with no whitespace before it, as in the canonical
    /// layout.
    #[inline(always)]
    fn digits(&mut self) -> Option<i64> {
        let start = self.at;
        let bytes = self.text.as_bytes();
        let first = *bytes.get(start)?;
        // Eight digits at a time: a timestamp's thirteen take two words.
        // Sixteen digits cannot overflow; a longer number goes a byte at a
        // time.
        let (len, n) = match word_digits(word_at(bytes, start)) {
            (8, high) => match word_digits(word_at(bytes, start + 8)) {
                (8, _) => return self.long_int(first),
                (k, low) => (8 + k, high * POW10[k] + low),
            },
            short => short,
        };
        self.at = start + len;
        // At most sixteen digits: below `i64::MAX`.
        let n = n as i64;
        match len {
            0 => None,
            1 => Some(n),
            _ => (first != b'0').then_some(n),
        }
    }

    /// [`int`](Self::int) a byte at a time, for numbers of more than
    /// sixteen digits.
    fn long_int(&mut self, first: u8) -> Option<i64> {
        let mut n: i64 = 0;
        while let Some(&b @ b'0'..=b'9') = self.text.as_bytes().get(self.at) {
            n = n.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
            self.at += 1;
        }
        // More than sixteen digits: a leading zero is one too many.
        (first != b'0').then_some(n)
    }

    /// `{`, then `"key": value` pairs separated by commas, each value read
    /// by `value`, then `}`.
    fn object(&mut self, mut value: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            value(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `kv`: an object of strings. Repeated keys keep the last value, as
    /// serde's [`Kv`] does.
    fn kv(&mut self) -> Option<Kv> {
        // Gathered on the stack, then collected: `Kv`'s `FromIterator` sizes
        // it exactly from a slice, with one allocation (inserting grows it
        // to four entries, 144 bytes more an instance).
        let mut entries = [("", ""); MAX_PLAIN_KV];
        let mut n = 0;
        self.object(|p, key| {
            *entries.get_mut(n)? = (key, p.string()?);
            n += 1;
            Some(())
        })?;
        Some(entries[..n].iter().copied().collect())
    }

    /// `t` as Go writes it (`{"Registered":1,"Duration":2}`), else as
    /// [`time`](Self::time) reads it.
    fn canonical_time(&mut self) -> Option<(Option<i64>, Option<i64>)> {
        let start = self.at;
        let canonical = (|| {
            self.lit(b"{\"Registered\":")?;
            let registered = self.digits()?;
            self.lit(b",\"Duration\":")?;
            let duration = self.digits()?;
            self.lit(b"}")?;
            Some((Some(registered), Some(duration)))
        })();
        canonical.or_else(|| {
            self.at = start;
            self.time()
        })
    }

    /// `t`: (`Registered`, `Duration`), matched as [`TimeSeed`] does, each
    /// at most once; a missing one is `None`.
    fn time(&mut self) -> Option<(Option<i64>, Option<i64>)> {
        let (mut registered, mut duration) = (None, None);
        self.object(|p, key| {
            let slot = match Field::of(key)? {
                Field::Registered => &mut registered,
                Field::Duration => &mut duration,
                _ => return None,
            };
            if slot.is_some() {
                return None;
            }
            *slot = Some(p.int()?);
            Some(())
        })?;
        Some((registered, duration))
    }
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
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    // Written into a buffer kept per thread, then copied out at its exact
    // size: `Bytes::from` a vector with room to spare allocates a second
    // time, for a header, on every message sent.
    let write = |out: &mut Vec<u8>| {
        out.clear();
        write_payload(out, service, t, status);
        out.to_vec()
    };
    // A thread tearing down its locals (a `Drop` at thread exit) has no
    // buffer left: it gets one of its own.
    SCRATCH
        .try_with(|scratch| {
            let mut out = scratch.borrow_mut();
            let payload = write(&mut out);
            if out.capacity() > SCRATCH_KEPT {
                *out = Vec::new();
            }
            payload
        })
        .unwrap_or_else(|_| write(&mut Vec::new()))
}

/// Largest scratch buffer kept between payloads: one huge `kv` must not
/// hold its memory for the thread's life.
const SCRATCH_KEPT: usize = 16 * 1024;

fn write_payload(out: &mut Vec<u8>, service: &Service, t: Option<WireTime>, status: Status) {
    // Written by hand, byte for byte what serde_json writes for the same
    // fields (a test holds it to that), in a fraction of its time. Each
    // field is written with a comma before it, and the first comma becomes
    // the `{`; field by field, so that each key's length is known where it
    // is copied (a few stores, not a call).
    let start = out.len();
    string_field(out, b",\"net\":", &service.network);
    string_field(out, b",\"add\":", &service.address);
    string_field(out, b",\"url\":", &service.url);
    string_field(out, b",\"name\":", &service.name);
    string_field(out, b",\"v\":", &service.version);
    string_field(out, b",\"h\":", &service.host);
    if !service.kv.is_empty() {
        out.extend_from_slice(b",\"kv\":{");
        for (i, (k, v)) in service.kv.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_string(out, k);
            out.push(b':');
            json_string(out, v);
        }
        out.push(b'}');
    }
    if let Some(t) = t {
        // `t`'s keys capitalised, as Go writes them.
        out.extend_from_slice(b",\"t\":{\"Registered\":");
        json_int(out, t.registered);
        out.extend_from_slice(b",\"Duration\":");
        json_int(out, t.duration);
        out.push(b'}');
    }
    if status != Status::Passing {
        string_field(out, b",\"status\":", status.as_str());
    }
    match out.get_mut(start) {
        Some(comma) => *comma = b'{',
        None => out.push(b'{'),
    }
    out.push(b'}');
}

/// `key` (a comma, the quoted key and a colon) and `value`, unless `value`
/// is empty: empty fields are left out, as Go leaves them out.
fn string_field<const N: usize>(out: &mut Vec<u8>, key: &[u8; N], value: &str) {
    if !value.is_empty() {
        out.extend_from_slice(key);
        json_string(out, value);
    }
}

/// `s` as a JSON string, escaped as serde_json escapes: `"`, `\` and
/// control characters, the common ones by letter, others as `\u00XX`.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut rest = s.as_bytes();
    loop {
        let plain = unescaped_len(rest);
        out.extend_from_slice(&rest[..plain]);
        let Some((&b, after)) = rest[plain..].split_first() else {
            break;
        };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            }
        }
        rest = after;
    }
    out.push(b'"');
}

/// Powers of ten up to eight, for joining two words of digits.
const POW10: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// The eight bytes from `at` as a little-endian word (the first byte
/// lowest), zeros past the end: a zero is not a digit.
fn word_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    match bytes.get(at..at + 8) {
        Some(eight) => word.copy_from_slice(eight),
        // The number ends within the last eight bytes: the last word,
        // shifted down to start at `at`.
        None if bytes.len() >= 8 && at < bytes.len() => {
            word.copy_from_slice(&bytes[bytes.len() - 8..]);
            return u64::from_le_bytes(word) >> (8 * (at + 8 - bytes.len()));
        }
        None => {
            let rest = bytes.get(at..).unwrap_or_default();
            word[..rest.len()].copy_from_slice(rest);
        }
    }
    u64::from_le_bytes(word)
}

/// How many of a word's first bytes are ASCII digits (0 to 8), and the
/// number they write.
fn word_digits(x: u64) -> (usize, u64) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // A byte is a digit when its high half is 3 and its low half at most 9
    // (adding 6 to a low half of 10 or more carries into bit 4). Neither
    // test carries out of its byte.
    let not_digit =
        ((x & (ONES * 0xf0)) ^ (ONES * 0x30)) | (((x & (ONES * 0x0f)) + ONES * 6) & (ONES * 0x10));
    // The high bit of each byte that is not a digit.
    let marks = (((not_digit & (ONES * 0x7f)) + ONES * 0x7f) | not_digit) & (ONES * 0x80);
    let len = marks.trailing_zeros() as usize / 8;
    if len == 0 {
        return (0, 0);
    }
    // The digits' values moved to the top of the word, zeros (leading
    // zeros) below; then joined in pairs, fours and eights. No step
    // carries from one lane into the next.
    let d = (x & (ONES * 0x0f)) << (8 * (8 - len));
    let d = (d * 10 + (d >> 8)) & 0x00ff_00ff_00ff_00ff;
    let d = (d * 100 + (d >> 16)) & 0x0000_ffff_0000_ffff;
    let d = (d.wrapping_mul(10_000) + (d >> 32)) & 0xffff_ffff;
    (len, d)
}

/// How many bytes at the start of `bytes` a JSON string holds as they are:
/// up to the first `"`, `\` or control character. Eight bytes at a time,
/// as strings are scanned on every message sent and received.
fn unescaped_len(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let len = bytes.len();
    if len < 8 {
        return bytes
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(len);
    }
    // A byte's high bit ends up set where it is zero (after the xor) or
    // below 0x20. A borrow can only mark bytes above a marked one, so the
    // lowest mark, the first byte in memory, is always a real one.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let first_mark = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        let x = u64::from_le_bytes(word);
        let control = x.wrapping_sub(ONES * 0x20) & !x;
        let marks = (control | zero(x ^ (ONES * 0x22)) | zero(x ^ (ONES * 0x5c))) & HIGH;
        (marks != 0).then(|| at + marks.trailing_zeros() as usize / 8)
    };
    let mut at = 0;
    while at + 8 <= len {
        if let Some(found) = first_mark(at) {
            return found;
        }
        at += 8;
    }
    // The rest, as the last eight bytes: those it shares with the words
    // above are clean, so its first mark is the first byte to escape.
    if at < len {
        if let Some(found) = first_mark(len - 8) {
            return found;
        }
    }
    len
}

/// `n` in decimal.
fn json_int(out: &mut Vec<u8>, n: i64) {
    // serde_json's own digits (it writes integers with itoa).
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[derive(Clone, Copy)]
struct WireTime {
    registered: i64,
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
        while let Some(Key(field)) = map.next_key::<Key>()? {
            let s = &mut a.service;
            match field {
                Some(Field::Net) => s.network = opt(&mut map)?,
                Some(Field::Add) => s.address = opt(&mut map)?,
                Some(Field::Url) => s.url = opt(&mut map)?,
                Some(Field::Name) => s.name = opt(&mut map)?,
                Some(Field::V) => s.version = opt(&mut map)?,
                Some(Field::H) => s.host = opt(&mut map)?,
                Some(Field::Kv) => s.kv = opt(&mut map)?,
                Some(Field::T) => {
                    if let Some(t) = map.next_value_seed(TimeSeed)? {
                        a.registered_ms = t.0;
                        a.duration_ms = t.1;
                    }
                }
                Some(Field::Status) => {
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

/// A key, matched without regard to case and without allocating; `None`
/// for any unknown key.
struct Key(Option<Field>);

/// A known key of an announcement or of its `t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Net,
    Add,
    Url,
    Name,
    V,
    H,
    Kv,
    T,
    Status,
    Registered,
    Duration,
}

impl Field {
    /// In declaration order: `ALL[f as usize] == f`.
    const ALL: [Field; 11] = [
        Field::Net,
        Field::Add,
        Field::Url,
        Field::Name,
        Field::V,
        Field::H,
        Field::Kv,
        Field::T,
        Field::Status,
        Field::Registered,
        Field::Duration,
    ];

    /// The key in lower case (the Go package capitalises `t`'s two).
    fn key(self) -> &'static str {
        match self {
            Field::Net => "net",
            Field::Add => "add",
            Field::Url => "url",
            Field::Name => "name",
            Field::V => "v",
            Field::H => "h",
            Field::Kv => "kv",
            Field::T => "t",
            Field::Status => "status",
            Field::Registered => "registered",
            Field::Duration => "duration",
        }
    }

    /// The field `key` names, without regard to ASCII case (by [`Key`] and
    /// [`plain_into`] alike).
    fn of(key: &str) -> Option<Field> {
        // Every message has nine keys or so: comparing each with all eleven
        // was a sixth of the listener's instructions (callgrind). No two
        // keys share a length and a first letter, so those pick the one
        // candidate.
        let field = match (key.len(), key.as_bytes().first()? | 0x20) {
            (1, b'v') => Field::V,
            (1, b'h') => Field::H,
            (1, b't') => Field::T,
            (2, b'k') => Field::Kv,
            (3, b'n') => Field::Net,
            (3, b'a') => Field::Add,
            (3, b'u') => Field::Url,
            (4, b'n') => Field::Name,
            (6, b's') => Field::Status,
            (8, b'd') => Field::Duration,
            (10, b'r') => Field::Registered,
            _ => return None,
        };
        // Keys are lower-case letters. Setting bit 5 lower-cases a letter,
        // and no byte but a letter's two cases lands on a lower-case letter
        // that way, so this is exactly `eq_ignore_ascii_case`, without its
        // branch per byte.
        let differ = (key.bytes())
            .zip(field.key().bytes())
            .fold(0, |d, (b, k)| d | ((b | 0x20) ^ k));
        (key.len() == field.key().len() && differ == 0).then_some(field)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(Field::of(v)))
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
                while let Some(Key(field)) = map.next_key::<Key>()? {
                    match field {
                        Some(Field::Registered) => registered = map.next_value()?,
                        Some(Field::Duration) => duration = map.next_value()?,
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

    fn decode_canonical(payload: &[u8]) -> Option<Announcement> {
        let mut a = Announcement::default();
        canonical_into(payload, &mut a).map(|()| a)
    }

    fn decode_plain(payload: &[u8]) -> Option<Announcement> {
        let mut a = Announcement::default();
        plain_into(payload, &mut a).map(|()| a)
    }

    #[test]
    fn the_sent_time_in_milliseconds_is_the_sent_time() {
        use crate::service::unix_ms;
        let now = unix_ms(SystemTime::now()) as i64;
        for registered_ms in [
            None,
            Some(i64::MIN),
            Some(-1),
            Some(0),
            Some(1),
            Some(now),
            Some(i64::MAX),
        ] {
            let a = Announcement {
                registered_ms,
                ..Announcement::default()
            };
            assert_eq!(
                a.sent_ms(),
                a.sent_at().map_or(0, unix_ms),
                "{registered_ms:?}"
            );
        }
    }

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

    proptest::proptest! {
        #[test]
        fn the_one_pass_name_check_agrees_with_the_rules(
            chars in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => proptest::char::range('a', 'c'),
                    3 => proptest::strategy::Just('.'),
                    1 => proptest::sample::select(vec!['*', '>', ' ', '\t', '\0', '\x1f', '\x7f']),
                    1 => proptest::sample::select(vec!['\u{85}', '\u{a0}', '\u{3000}', 'é']),
                    1 => proptest::arbitrary::any::<char>(),
                ],
                0..10,
            ),
            long in 250usize..262,
        ) {
            let name: String = chars.into_iter().collect();
            let long = format!("{name}{}", "a".repeat(long));
            for name in [name.as_str(), long.as_str()] {
                // It may send a valid non-ASCII name to the rules, never a
                // bad one through.
                if plainly_valid(name) {
                    proptest::prop_assert_eq!(fault(name), None, "{:?}", name);
                } else if name.is_ascii() {
                    proptest::prop_assert!(fault(name).is_some(), "{:?}", name);
                }
            }
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

    /// [`decode`] without the plain path: what it must always agree with.
    fn decode_serde_only(payload: &[u8], subject_name: &str) -> Result<Announcement, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        let a = decode_serde(payload)?;
        belongs(&a, subject_name)?;
        Ok(a)
    }

    const GO_VECTOR: &[u8] = br#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","h":"vm","kv":{"zone":"a"},"t":{"Registered":1795535104541,"Duration":20000}}"#;

    /// Whatever the canonical and the plain paths make of `payload` is what
    /// serde makes of it, and `decode` answers as the serde path alone
    /// does, errors included.
    fn agree(payload: &[u8]) -> Result<(), String> {
        for (path, decoded) in [
            ("canonical", decode_canonical(payload)),
            ("plain", decode_plain(payload)),
        ] {
            if let Some(ours) = decoded {
                match decode_serde(payload) {
                    Ok(serde) if serde == ours => {}
                    other => return Err(format!("{path} {ours:?}, serde {other:?}")),
                }
            }
        }
        let (with, without) = (
            decode(payload, "wiredemo"),
            decode_serde_only(payload, "wiredemo"),
        );
        // `DecodeError` has no `PartialEq` (serde_json's error has none).
        let (with, without) = (format!("{with:?}"), format!("{without:?}"));
        if with != without {
            return Err(format!("decode {with}, serde only {without}"));
        }
        Ok(())
    }

    #[test]
    fn a_decoded_kv_has_no_spare_room() {
        let a = decode(
            br#"{"name":"s","add":"h:1","kv":{"zone":"a","b":"c"}}"#,
            "s",
        )
        .unwrap();
        assert_eq!(a.service.kv.capacity(), 2);
    }

    #[test]
    fn the_go_vector_takes_the_plain_path() {
        let canonical = decode_canonical(GO_VECTOR).expect("canonical path");
        assert_eq!(canonical, decode_serde(GO_VECTOR).unwrap());
        let plain = decode_plain(GO_VECTOR).expect("plain path");
        assert_eq!(plain, decode_serde(GO_VECTOR).unwrap());
        assert_eq!(plain.service.url, "http://127.0.0.1:8081/api");
        assert_eq!(plain.service.kv["zone"], "a");
        assert_eq!(plain.registered_ms, Some(1795535104541));
        assert_eq!(plain.duration_ms, Some(20000));
        assert_eq!(decode(GO_VECTOR, "wiredemo").unwrap(), plain);
        let warning = br#" {"NAME" : "wiredemo",
            "add":"h:1", "status":"warning", "t":{"registered":0} }
        "#;
        let a = decode_plain(warning).expect("plain path");
        assert_eq!(a.status, Status::Warning);
        assert_eq!((a.registered_ms, a.duration_ms), (Some(0), None));
    }

    #[test]
    fn edge_cases_agree() {
        let taken = [
            r#"{}"#,
            r#"{"name":"wiredemo","add":"h:1","kv":{"a":"1","b":"2","a":"3"}}"#,
            r#"{"name":"wiredemo","add":"h:1","kv":{}}"#,
            r#"{"name":"wiredemo","add":"h:1","status":"Warning"}"#,
            r#"{"name":"wiredemo","add":"h:1","status":"bogus"}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"duration":9223372036854775807}}"#,
            "{\"name\":\"wiredemo\",\"add\":\"h\u{7f}é😀\"}",
            r#"{"name":"other","add":"h:1"}"#,
            r#"{"name":"a b","add":"h:1"}"#,
            r#"{"name":"wiredemo","add":""}"#,
        ];
        let left_to_serde = [
            "",
            " ",
            "{",
            "[]",
            "null",
            r#"{"name":"wiredemo","add":"h:1",}"#,
            r#"{"name":"wiredemo","add":"h:1"}x"#,
            r#"{"name":"wiredemo","add":"h:1"} {}"#,
            r#"{"name":"wiredemo","NAME":"wiredemo","add":"h:1"}"#,
            r#"{"name":"wiredemo","add":"h:1","t":null}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":1},"t":null}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":-0}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":-1}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":01}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":1.0}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":1e3}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":9223372036854775808}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":1,"registered":2}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"Registered":"1"}}"#,
            r#"{"name":"wiredemo","add":"h:1","t":{"name":"x"}}"#,
            r#"{"name":"wiredemo","add":"h:1","registered":5}"#,
            r#"{"name":"wiredemo","add":"h:1","extra":"x"}"#,
            r#"{"name":"wiredemo","add":"h:1","kv":{"a":null}}"#,
            r#"{"name":"wiredemo","add":"h:1","kv":{"a":1}}"#,
            r#"{"name":"wiredemo","add":"h:1","status":null}"#,
            r#"{"n\u0061me":"wiredemo","add":"h:1"}"#,
            r#"{"name":"wiredemo","add":"h\"1"}"#,
            "{\"name\":\"wiredemo\",\"add\":\"h\t1\"}",
            "{\"name\":\"wiredemo\",\u{a0}\"add\":\"h:1\"}",
        ];
        // In the encoder's order and spelling, whatever the values.
        let canonical = [
            r#"{"add":"h:1","name":"wiredemo"}"#,
            r#"{"add":"h:1","name":"wiredemo","kv":{"a":"1"},"status":"warning"}"#,
            r#"{"add":"h:1","name":"wiredemo","t":{"registered":1,"duration":2}}"#,
            r#"{"add":"h:1","name":"wiredemo","t":{"Duration":2}}"#,
            r#"{"add": "h:1","name":"wiredemo","t":{"Registered":1,"Duration": 2}}"#,
            "{\"add\":\"h:1\",\"name\":\"wiredemo\"}\n",
        ];
        // In that order but broken, or out of it.
        let not_canonical = [
            r#"{"add":"h:1","name":"wiredemo",}"#,
            r#"{,"add":"h:1","name":"wiredemo"}"#,
            r#"{"add":"h:1""name":"wiredemo"}"#,
            r#"{"add":"h:1",,"name":"wiredemo"}"#,
            r#"{"add":"h:1","name":"wiredemo","t":{"Registered":1,"Duration":2},}"#,
            r#"{"add":"h:1","name":"wiredemo","status":"warning",}"#,
            r#"{"name":"wiredemo","add":"h:1"}"#,
            r#"{"add":"h:1","Name":"wiredemo"}"#,
            r#"{ "add":"h:1","name":"wiredemo"}"#,
        ];
        for payload in canonical {
            assert!(decode_canonical(payload.as_bytes()).is_some(), "{payload}");
        }
        for payload in not_canonical.iter().chain(&left_to_serde) {
            assert!(decode_canonical(payload.as_bytes()).is_none(), "{payload}");
        }
        for payload in canonical.iter().chain(&not_canonical).chain(&taken) {
            agree(payload.as_bytes()).unwrap_or_else(|e| panic!("{payload}: {e}"));
        }
        for payload in taken {
            assert!(decode_plain(payload.as_bytes()).is_some(), "{payload}");
        }
        for payload in left_to_serde {
            assert!(decode_plain(payload.as_bytes()).is_none(), "{payload}");
            agree(payload.as_bytes()).unwrap_or_else(|e| panic!("{payload}: {e}"));
        }
        let kv = |n: usize| {
            let entries: Vec<String> = (0..n).map(|i| format!(r#""k{i}":"v""#)).collect();
            format!(
                r#"{{"name":"wiredemo","add":"h:1","kv":{{{}}}}}"#,
                entries.join(",")
            )
        };
        assert!(decode_plain(kv(MAX_PLAIN_KV).as_bytes()).is_some());
        assert!(decode_plain(kv(MAX_PLAIN_KV + 1).as_bytes()).is_none());
        agree(kv(MAX_PLAIN_KV).as_bytes()).unwrap();
        agree(kv(MAX_PLAIN_KV + 1).as_bytes()).unwrap();
        let invalid_utf8 = b"{\"name\":\"wiredemo\",\"add\":\"h\xff\"}";
        assert!(decode_plain(invalid_utf8).is_none());
        agree(invalid_utf8).unwrap();
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::{select, Index};

        /// A JSON value to render: a literal (string, number, `null`, ...)
        /// or an object whose keys are literals too (so they may be escaped).
        #[derive(Clone, Debug)]
        enum J {
            Lit(String),
            Obj(Vec<(String, J)>),
        }

        fn lit(s: &str) -> J {
            J::Lit(s.to_string())
        }

        fn quoted(s: &str) -> String {
            serde_json::to_string(s).unwrap()
        }

        /// Renders `j`, taking whitespace from `ws` between every token.
        fn render(j: &J, out: &mut String, ws: &mut dyn FnMut() -> &'static str) {
            match j {
                J::Lit(s) => out.push_str(s),
                J::Obj(entries) => {
                    out.push('{');
                    for (i, (k, v)) in entries.iter().enumerate() {
                        if i > 0 {
                            out.push_str(ws());
                            out.push(',');
                        }
                        out.push_str(ws());
                        out.push_str(k);
                        out.push_str(ws());
                        out.push(':');
                        out.push_str(ws());
                        render(v, out, ws);
                    }
                    out.push_str(ws());
                    out.push('}');
                }
            }
        }

        /// Text of every kind: plain, empty, unicode, and characters that
        /// must be escaped.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                12 => "[a-z0-9.:/-]{1,30}",
                1 => Just(String::new()),
                1 => "\\PC{0,12}",
                1 => any::<String>(),
                1 => "[\"\\\\\\x00-\\x1f\\x7f éa😀]{0,6}",
            ]
        }

        /// `key` quoted in a random case, sometimes with a needless escape.
        fn spelled(key: &'static str) -> impl Strategy<Value = String> {
            (any::<u64>(), prop::bool::weighted(0.05)).prop_map(move |(case, escape)| {
                let mut k: String = key
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if case >> (i % 64) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                if escape {
                    let first = k.remove(0);
                    return format!("\"\\u{:04x}{k}\"", first as u32);
                }
                quoted(&k)
            })
        }

        fn number() -> impl Strategy<Value = J> {
            prop_oneof![
                4 => (0..=i64::MAX).prop_map(|n| J::Lit(n.to_string())),
                1 => any::<i64>().prop_map(|n| J::Lit(n.to_string())),
                1 => any::<u64>().prop_map(|n| J::Lit(n.to_string())),
                1 => select(vec!["-0", "0", "01", "1.5", "1e3", "-", "18446744073709551616", "null", "\"5\"", "true"]).prop_map(lit),
            ]
        }

        fn string_value() -> impl Strategy<Value = J> {
            prop_oneof![
                8 => text().prop_map(|s| J::Lit(quoted(&s))),
                1 => select(vec!["null", "5", "[]", "{}", "\"\\u0061\"", "true"]).prop_map(lit),
            ]
        }

        fn kv_value() -> impl Strategy<Value = J> {
            let entry = prop_oneof![
                (text(), text()).prop_map(|(k, v)| (quoted(&k), J::Lit(quoted(&v)))),
                select(vec!["a", "b"]).prop_map(|k| (quoted(k), lit("\"dup\""))),
                select(vec!["null", "1", "{}"]).prop_map(|v| (quoted("a"), lit(v))),
            ];
            prop_oneof![
                8 => prop::collection::vec(entry, 0..5).prop_map(J::Obj),
                1 => select(vec!["null", "\"x\"", "[]"]).prop_map(lit),
            ]
        }

        fn time_value() -> impl Strategy<Value = J> {
            let entry = prop_oneof![
                4 => (spelled("Registered"), number()),
                4 => (spelled("Duration"), number()),
                1 => (spelled("name"), string_value()),
            ];
            prop_oneof![
                8 => prop::collection::vec(entry, 0..4).prop_map(J::Obj),
                1 => select(vec!["null", "5", "\"x\""]).prop_map(lit),
            ]
        }

        fn status_value() -> impl Strategy<Value = J> {
            prop_oneof![
                4 => select(vec!["passing", "warning", "critical", "Warning", ""]).prop_map(|s| J::Lit(quoted(s))),
                1 => string_value(),
            ]
        }

        /// Any other value, as an unknown key might carry.
        fn other_value() -> impl Strategy<Value = J> {
            prop_oneof![
                string_value(),
                number(),
                select(vec!["{\"deep\":[1,{\"x\":null}]}", "[\"}\"]"]).prop_map(lit),
            ]
        }

        /// One entry of any known key or none, with a fitting value mostly.
        fn entry() -> impl Strategy<Value = (String, J)> {
            let known = select(Field::ALL.map(Field::key).to_vec()).prop_flat_map(|key| {
                let value = match key {
                    "kv" => kv_value().boxed(),
                    "t" => time_value().boxed(),
                    "status" => status_value().boxed(),
                    "registered" | "duration" => number().boxed(),
                    _ => string_value().boxed(),
                };
                (spelled(key), value)
            });
            prop_oneof![
                3 => known,
                1 => ("[a-z]{0,4}".prop_map(|k| quoted(&k)), other_value()),
            ]
        }

        /// An announcement as the Go package writes it (keys in its order,
        /// empty fields left out, `status` before or after `t`), in any
        /// key case, with a few entries of any kind slipped in.
        fn announcement() -> impl Strategy<Value = J> {
            let fields = prop::collection::vec(text(), 6);
            let kv = prop::collection::vec((text(), text()), 0..4);
            let time = (
                spelled("Registered"),
                prop::option::of(number()),
                spelled("Duration"),
                prop::option::of(number()),
            );
            let keys = (
                spelled("net"),
                spelled("add"),
                spelled("url"),
                spelled("name"),
                spelled("v"),
                spelled("h"),
                spelled("kv"),
                spelled("t"),
                spelled("status"),
            );
            let extras = prop_oneof![
                3 => Just(Vec::new()),
                1 => prop::collection::vec((any::<Index>(), entry()), 1..3),
            ];
            (
                fields,
                any::<bool>(),
                kv,
                prop::option::of(time),
                prop::option::of(status_value()),
                any::<bool>(),
                keys,
                extras,
            )
                .prop_map(
                    |(fields, subject, kv, time, status, status_first, keys, extras)| {
                        let (net, add, url, name, v, h, kv_key, t_key, status_key) = keys;
                        let mut entries = Vec::new();
                        let names = [net, add, url, name, v, h];
                        for (i, (key, value)) in names.into_iter().zip(fields).enumerate() {
                            let value = if i == 3 && subject {
                                "wiredemo".to_string()
                            } else {
                                value
                            };
                            if !value.is_empty() {
                                entries.push((key, J::Lit(quoted(&value))));
                            }
                        }
                        if !kv.is_empty() {
                            let kv = kv.iter().map(|(k, v)| (quoted(k), J::Lit(quoted(v))));
                            entries.push((kv_key, J::Obj(kv.collect())));
                        }
                        let status = status.map(|s| (status_key, s));
                        if status_first {
                            entries.extend(status.clone());
                        }
                        if let Some((rk, r, dk, d)) = time {
                            let t = [r.map(|r| (rk, r)), d.map(|d| (dk, d))];
                            entries.push((t_key, J::Obj(t.into_iter().flatten().collect())));
                        }
                        if !status_first {
                            entries.extend(status);
                        }
                        for (at, entry) in extras {
                            entries.insert(at.index(entries.len() + 1), entry);
                        }
                        J::Obj(entries)
                    },
                )
        }

        /// Mostly nothing, sometimes JSON whitespace.
        fn ws() -> impl Strategy<Value = &'static str> {
            prop_oneof![
                3 => Just(""),
                1 => select(vec![" ", "\t", "\n", "\r", " \r\n\t "]),
            ]
        }

        fn payload() -> impl Strategy<Value = Vec<u8>> {
            // Now and then some whitespace JSON does not allow.
            let not_json = prop::option::weighted(
                0.1,
                (any::<Index>(), select(vec!["\u{b}", "\u{a0}", "\u{c}"])),
            );
            let ws = prop::collection::vec(ws(), 32);
            (announcement(), ws, not_json).prop_map(|(j, mut ws, not_json)| {
                if let Some((at, bad)) = not_json {
                    ws[at.index(32)] = bad;
                }
                let mut ws = ws.into_iter().cycle();
                let mut next = move || ws.next().unwrap_or("");
                let mut out = String::from(next());
                render(&j, &mut out, &mut next);
                out.push_str(next());
                out.into_bytes()
            })
        }

        /// Replaces, deletes or inserts a byte, or cuts the payload short.
        #[derive(Clone, Debug)]
        pub(super) enum Edit {
            Set(Index, u8),
            Delete(Index),
            Insert(Index, u8),
            Truncate(Index),
        }

        pub(super) fn edit() -> impl Strategy<Value = Edit> {
            let byte = prop_oneof![
                any::<u8>(),
                select(b"{}[]\":,\\ \t0-9eE.nul\x00\x80\xc3".to_vec()),
            ];
            prop_oneof![
                (any::<Index>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
                any::<Index>().prop_map(Edit::Delete),
                (any::<Index>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
                any::<Index>().prop_map(Edit::Truncate),
            ]
        }

        pub(super) fn apply(payload: &mut Vec<u8>, edit: &Edit) {
            let len = payload.len();
            match *edit {
                Edit::Set(ref i, b) if len > 0 => payload[i.index(len)] = b,
                Edit::Delete(ref i) if len > 0 => {
                    payload.remove(i.index(len));
                }
                Edit::Insert(ref i, b) => payload.insert(i.index(len + 1), b),
                Edit::Truncate(ref i) => payload.truncate(i.index(len + 1)),
                _ => {}
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            #[test]
            fn plain_path_agrees_with_serde(payload in payload()) {
                if let Err(e) = agree(&payload) {
                    prop_assert!(false, "{:?}: {}", String::from_utf8_lossy(&payload), e);
                }
            }

            #[test]
            fn plain_path_agrees_on_damaged_payloads(
                payload in payload(),
                edits in prop::collection::vec(edit(), 1..4),
            ) {
                let mut payload = payload;
                for edit in &edits {
                    apply(&mut payload, edit);
                }
                if let Err(e) = agree(&payload) {
                    prop_assert!(false, "{:?}: {}", String::from_utf8_lossy(&payload), e);
                }
            }

            #[test]
            fn plain_path_agrees_on_damaged_go_vectors(
                edits in prop::collection::vec(edit(), 1..3),
            ) {
                let mut payload = GO_VECTOR.to_vec();
                for edit in &edits {
                    apply(&mut payload, edit);
                }
                if let Err(e) = agree(&payload) {
                    prop_assert!(false, "{:?}: {}", String::from_utf8_lossy(&payload), e);
                }
            }
        }
    }

    /// What serde_json writes for an announcement: the encoder's reference.
    mod serde_reference {
        use super::super::*;
        use serde::Serialize;

        #[derive(Serialize)]
        struct Out<'a> {
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
            t: Option<Time>,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<&'static str>,
        }

        #[derive(Serialize)]
        struct Time {
            #[serde(rename = "Registered")]
            registered: i64,
            #[serde(rename = "Duration")]
            duration: i64,
        }

        pub(super) fn encode(s: &Service, t: Option<(i64, i64)>, status: Status) -> Vec<u8> {
            let out = Out {
                net: &s.network,
                add: &s.address,
                url: &s.url,
                name: &s.name,
                v: &s.version,
                h: &s.host,
                kv: &s.kv,
                t: t.map(|(registered, duration)| Time {
                    registered,
                    duration,
                }),
                status: (status != Status::Passing).then(|| status.as_str()),
            };
            serde_json::to_vec(&out).unwrap()
        }
    }

    mod encoder {
        use super::super::*;
        use proptest::prelude::*;

        #[test]
        fn every_key_is_found_in_any_case() {
            for f in Field::ALL {
                assert_eq!(Field::of(f.key()), Some(f));
                assert_eq!(Field::of(&f.key().to_ascii_uppercase()), Some(f));
                assert_eq!(Field::ALL[f as usize], f);
            }
            for other in ["", "x", "nam", "names", "stat", "registere", "kv2"] {
                assert_eq!(Field::of(other), None, "{other}");
            }
        }

        /// Every key with any one byte replaced (by any byte, in any
        /// position) is matched as the plain case-blind comparison matches it.
        #[test]
        fn a_key_matches_as_eq_ignore_ascii_case_does() {
            let reference = |key: &[u8]| {
                Field::ALL
                    .into_iter()
                    .find(|f| f.key().as_bytes().eq_ignore_ascii_case(key))
            };
            for f in Field::ALL {
                for at in 0..f.key().len() {
                    for b in 0..=255u8 {
                        let mut key = f.key().as_bytes().to_vec();
                        key[at] = b;
                        let found = std::str::from_utf8(&key).ok().and_then(Field::of);
                        let expected = std::str::from_utf8(&key).ok().and(reference(&key));
                        assert_eq!(found, expected, "{key:?}");
                    }
                }
            }
        }

        proptest! {
            #[test]
            fn integers_are_read_as_str_parse_reads_them(
                // Anything before, so that the digits start anywhere in a
                // word and end anywhere near the end of the text.
                before in "[^0-9]{0,9}",
                digits in "[0-9]{0,24}",
                // The bytes either side of the digits, `/` and `:`; anything.
                after in prop_oneof![
                    Just(String::new()),
                    "[/:]{1,8}",
                    "[^0-9]{1,8}",
                ],
            ) {
                let text = format!("{before}{digits}{after}");
                let mut p = Plain { text: &text, at: before.len() };
                let expected = (!digits.is_empty() && (digits.len() == 1 || !digits.starts_with('0')))
                    .then(|| digits.parse::<i64>().ok())
                    .flatten();
                let got = p.int();
                prop_assert_eq!(got, expected);
                if got.is_some() {
                    prop_assert_eq!(p.at, before.len() + digits.len());
                }
            }

            #[test]
            fn unescaped_len_stops_at_the_first_byte_to_escape(
                bytes in proptest::collection::vec(
                    prop_oneof![any::<u8>(), Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..0x7f],
                    0..40,
                ),
            ) {
                let expected = bytes
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                    .unwrap_or(bytes.len());
                prop_assert_eq!(unescaped_len(&bytes), expected);
            }
        }

        /// Text with what needs escaping: quotes, backslashes, every control
        /// character, and beyond ASCII.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[\\x00-\\x1f\"\\\\a\\x7f]{0,8}",
                "\\PC{0,12}",
                Just(String::new()),
            ]
        }

        fn service() -> impl Strategy<Value = Service> {
            let texts = proptest::collection::vec(text(), 6);
            let kv = proptest::collection::vec((text(), text()), 0..4);
            (texts, kv).prop_map(|(t, kv)| Service {
                network: t[0].as_str().into(),
                address: t[1].as_str().into(),
                url: t[2].as_str().into(),
                name: t[3].as_str().into(),
                version: t[4].as_str().into(),
                host: t[5].as_str().into(),
                kv: kv.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            })
        }

        /// A payload larger than the scratch buffer keeps, then small
        /// ones: each is written from a clean buffer.
        #[test]
        fn payloads_after_a_huge_one_are_written_clean() {
            let mut huge = Service::new("big", "10.0.0.1:1");
            huge.kv = Kv::from([("k", "x".repeat(SCRATCH_KEPT * 2))]);
            let small = Service::new("small", "10.0.0.2:2");
            for s in [&small, &huge, &small, &small] {
                let t = WireTime {
                    registered: 1,
                    duration: 2,
                };
                assert_eq!(
                    encode(s, Some(t), Status::Passing),
                    super::serde_reference::encode(s, Some((1, 2)), Status::Passing)
                );
            }
        }

        /// Encoding from a `Drop` that runs after the thread's scratch
        /// buffer is gone (thread locals are destroyed in the reverse
        /// order of their first use): a payload all the same, no panic.
        #[test]
        fn encodes_while_a_thread_tears_down() {
            struct AtExit(std::sync::mpsc::Sender<Vec<u8>>);
            impl Drop for AtExit {
                fn drop(&mut self) {
                    let s = Service::new("late", "10.0.0.3:3");
                    let _ = self.0.send(encode_unregister(&s));
                }
            }
            thread_local! {
                static AT_EXIT: RefCell<Option<AtExit>> = const { RefCell::new(None) };
            }
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                AT_EXIT.with_borrow_mut(|a| *a = Some(AtExit(tx)));
                encode_unregister(&Service::new("first", "10.0.0.1:1"));
            })
            .join()
            .unwrap();
            let s = Service::new("late", "10.0.0.3:3");
            assert_eq!(
                rx.recv().unwrap(),
                super::serde_reference::encode(&s, None, Status::Passing)
            );
        }

        fn status() -> impl Strategy<Value = Status> {
            prop_oneof![
                Just(Status::Passing),
                Just(Status::Warning),
                Just(Status::Critical)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn writes_what_serde_writes(
                s in service(),
                t in proptest::option::of((any::<i64>(), any::<i64>())),
                status in status(),
            ) {
                let ours = encode(
                    &s,
                    t.map(|(registered, duration)| WireTime { registered, duration }),
                    status,
                );
                // Exactly sized: `Bytes` takes it without allocating again.
                prop_assert_eq!(ours.capacity(), ours.len());
                let reference = super::serde_reference::encode(&s, t, status);
                prop_assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(reference).unwrap());
            }

            /// The fast path reads what the encoder writes, whole or
            /// damaged, as serde does; and an announcement with nothing to
            /// escape always takes it.
            #[test]
            fn the_canonical_path_reads_what_the_encoder_writes(
                s in service(),
                t in proptest::option::of((any::<i64>(), any::<i64>())),
                status in status(),
                edits in proptest::collection::vec(super::generated::edit(), 0..3),
            ) {
                let time = t.map(|(registered, duration)| WireTime { registered, duration });
                let mut payload = encode(&s, time, status);
                let plain = |x: &str| unescaped_len(x.as_bytes()) == x.len();
                let texts = [&s.network, &s.address, &s.url, &s.name, &s.version, &s.host];
                if edits.is_empty()
                    && texts.iter().all(|x| plain(x))
                    && s.kv.iter().all(|(k, v)| plain(k) && plain(v))
                    && t.is_none_or(|(r, d)| r >= 0 && d >= 0)
                {
                    prop_assert!(super::decode_canonical(&payload).is_some());
                }
                for edit in &edits {
                    super::generated::apply(&mut payload, edit);
                }
                if let Err(e) = super::agree(&payload) {
                    prop_assert!(false, "{:?}: {}", String::from_utf8_lossy(&payload), e);
                }
            }
        }

        #[test]
        fn extremes() {
            for (registered, duration) in [
                (0, 0),
                (i64::MIN, i64::MAX),
                (-1, 9),
                (1_795_535_104_541, 20_000),
            ] {
                let s = Service::new("a", "b:1");
                let t = Some((registered, duration));
                assert_eq!(
                    encode(
                        &s,
                        t.map(|(registered, duration)| WireTime {
                            registered,
                            duration
                        }),
                        Status::Warning
                    ),
                    super::serde_reference::encode(&s, t, Status::Warning),
                );
            }
        }
    }
}
