//! Golden tests of the wire format against PROTOCOL.md and messages captured
//! from the Go package (`../shared/protocol-vectors.jsonl`, with a copy in
//! tests/data so the crate tests stand alone).

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use pubsub_registry::protocol::{
    decode, encode_announcement, encode_unregister, parse_subject, DecodeError, Kind,
};
use pubsub_registry::{Service, Status};
use serde_json::Value;

fn shared() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    dir.join("PROTOCOL.md").exists().then_some(dir)
}

fn vector_files() -> Vec<PathBuf> {
    let mut files =
        vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/protocol-vectors.jsonl")];
    if let Some(dir) = shared() {
        files.push(dir.join("protocol-vectors.jsonl"));
    }
    files
}

#[test]
fn the_vendored_vectors_are_the_shared_ones() {
    let Some(dir) = shared() else { return };
    let ours = std::fs::read_to_string(&vector_files()[0]).unwrap();
    let theirs = std::fs::read_to_string(dir.join("protocol-vectors.jsonl")).unwrap();
    assert_eq!(
        ours, theirs,
        "tests/data/protocol-vectors.jsonl is out of date: copy it from shared/"
    );
}

#[test]
fn every_captured_message_decodes_to_what_it_says() {
    for file in vector_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut kinds = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            let subject = v["subject"].as_str().unwrap();
            let payload = v["payload"].as_str().unwrap();
            let what = v["what"].as_str().unwrap();
            let (kind, name) = parse_subject("registry", subject).expect(subject);
            kinds.push(kind);
            if kind == Kind::Ping {
                assert!(payload.is_empty(), "{what}");
                continue;
            }
            let a = decode(payload.as_bytes(), name).unwrap_or_else(|e| panic!("{what}: {e}"));
            // Every field decoded is the field in the JSON, whatever its case.
            let j: Value = serde_json::from_str(payload).unwrap();
            let s = &a.service;
            assert_eq!(s.name, j["name"].as_str().unwrap_or(""), "{what}");
            assert_eq!(s.address, j["add"].as_str().unwrap_or(""), "{what}");
            assert_eq!(s.url, j["url"].as_str().unwrap_or(""), "{what}");
            assert_eq!(s.network, j["net"].as_str().unwrap_or(""), "{what}");
            assert_eq!(s.version, j["v"].as_str().unwrap_or(""), "{what}");
            assert_eq!(s.host, j["h"].as_str().unwrap_or(""), "{what}");
            let kv = j["kv"].as_object().map(|m| m.len()).unwrap_or(0);
            assert_eq!(s.kv.len(), kv, "{what}");
            for (k, val) in s.kv.iter() {
                assert_eq!(j["kv"][k], *val, "{what}");
            }
            let t = &j["t"];
            let reg = t
                .get("Registered")
                .or(t.get("registered"))
                .and_then(Value::as_i64);
            let dur = t
                .get("Duration")
                .or(t.get("duration"))
                .and_then(Value::as_i64);
            assert_eq!(a.registered_ms, reg, "{what}");
            assert_eq!(a.duration_ms, dur, "{what}");
            let status = j["status"].as_str().unwrap_or("passing");
            assert_eq!(a.status.as_str(), status, "{what}");
            if kind == Kind::Unregister {
                assert!(j.get("t").is_none() && j.get("h").is_none(), "{what}");
            }
        }
        assert!(
            kinds.contains(&Kind::Register)
                && kinds.contains(&Kind::Unregister)
                && kinds.contains(&Kind::Ping)
        );
    }
}

#[test]
fn specific_vectors() {
    let text = std::fs::read_to_string(&vector_files()[0]).unwrap();
    let by_what = |w: &str| -> Value {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["what"].as_str().unwrap().starts_with(w))
            .unwrap()
    };
    let warn = by_what("announcement after a status change");
    let a = decode(warn["payload"].as_str().unwrap().as_bytes(), "wiredemo").unwrap();
    assert_eq!(a.status, Status::Warning);
    assert_eq!(a.interval(), Some(Duration::from_secs(20)));
    assert_eq!(
        a.sent_at(),
        Some(UNIX_EPOCH + Duration::from_millis(1795535125744))
    );
    let java = by_what("Java port");
    let a = decode(java["payload"].as_str().unwrap().as_bytes(), "javademo").unwrap();
    assert_eq!(a.duration_ms, Some(2000));
    assert_eq!(a.registered_ms, Some(1795535104541));
    assert_eq!(a.service.address, "127.0.0.1:9090");
    assert_eq!(a.status, Status::Passing);
}

#[test]
fn the_protocol_md_example() {
    let example = r#"{"net":"tcp","add":"127.0.0.1:10001","url":"http://127.0.0.1:10001/",
 "name":"myservice","v":"1.4.2","h":"host-a","kv":{"zone":"eu-1"},
 "t":{"Registered":1732460000123,"Duration":20000},"status":"warning"}"#;
    if let Some(dir) = shared() {
        let doc = std::fs::read_to_string(dir.join("PROTOCOL.md")).unwrap();
        let block = doc
            .split("```json\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        assert_eq!(block.trim(), example, "PROTOCOL.md's example changed");
    }
    let a = decode(example.as_bytes(), "myservice").unwrap();
    let expected = Service {
        network: "tcp".into(),
        address: "127.0.0.1:10001".into(),
        url: "http://127.0.0.1:10001/".into(),
        name: "myservice".into(),
        version: "1.4.2".into(),
        host: "host-a".into(),
        kv: [("zone".to_string(), "eu-1".to_string())].into(),
    };
    assert_eq!(a.service, expected);
    assert_eq!(a.status, Status::Warning);
    assert_eq!(a.registered_ms, Some(1732460000123));
    assert_eq!(a.duration_ms, Some(20000));
}

#[test]
fn encoding_is_the_go_shape_and_round_trips() {
    let s = Service::new("wiredemo", "127.0.0.1:8081")
        .with_url("http://127.0.0.1:8081/api")
        .with_version("1.2.3")
        .with_host("vm")
        .with_kv("zone", "a");
    let sent = UNIX_EPOCH + Duration::from_millis(1795535104541);
    let bytes = encode_announcement(&s, Status::Passing, sent, Duration::from_secs(20));
    // Byte for byte what the Go package sent for the same service.
    assert_eq!(
        String::from_utf8(bytes.clone()).unwrap(),
        r#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","h":"vm","kv":{"zone":"a"},"t":{"Registered":1795535104541,"Duration":20000}}"#
    );
    let back = decode(&bytes, "wiredemo").unwrap();
    assert_eq!(back.service, s);
    assert_eq!(back.registered_ms, Some(1795535104541));

    let warn = encode_announcement(&s, Status::Warning, sent, Duration::from_secs(20));
    assert!(String::from_utf8(warn)
        .unwrap()
        .ends_with(r#""Duration":20000},"status":"warning"}"#));

    let unreg = encode_unregister(&s.clone().with_host(""));
    assert_eq!(
        String::from_utf8(unreg).unwrap(),
        r#"{"net":"tcp","add":"127.0.0.1:8081","url":"http://127.0.0.1:8081/api","name":"wiredemo","v":"1.2.3","kv":{"zone":"a"}}"#
    );
    let minimal = encode_unregister(&Service {
        name: "x".into(),
        ..Service::default()
    });
    assert_eq!(minimal, br#"{"name":"x"}"#);
}

#[test]
fn lenient_where_peers_differ_strict_where_it_matters() {
    // Lower-case t fields, unknown fields, unknown status.
    let a = decode(
        br#"{"name":"x","add":"h:1","t":{"registered":5,"duration":7,"extra":1},"status":"meh","new":{"a":[1]}}"#,
        "x",
    )
    .unwrap();
    assert_eq!(
        (a.registered_ms, a.duration_ms, a.status),
        (Some(5), Some(7), Status::Passing)
    );
    assert!(matches!(
        decode(br#"{"name":"y","add":"h:1"}"#, "x"),
        Err(DecodeError::NameMismatch { .. })
    ));
    assert!(matches!(
        decode(br#"{"add":"h:1"}"#, "x"),
        Err(DecodeError::MissingName)
    ));
    assert!(matches!(
        decode(br#"{"name":"x"}"#, "x"),
        Err(DecodeError::MissingAddress)
    ));
    assert!(matches!(
        decode(br#"{"name":"x.*","add":"h:1"}"#, "x.*"),
        Err(DecodeError::InvalidName(_))
    ));
    assert!(matches!(
        decode(&[b' '; 70_000], "x"),
        Err(DecodeError::TooLarge(70_000))
    ));
    assert!(matches!(
        decode(b"\xff\xfe", "x"),
        Err(DecodeError::Json(_))
    ));
    assert!(
        decode(br#"{"name":"x","add":"h:1","v":"\ud800"}"#, "x").is_err(),
        "lone surrogate"
    );
    // A negative or zero duration is no interval at all.
    let a = decode(br#"{"name":"x","add":"h:1","t":{"Duration":-5}}"#, "x").unwrap();
    assert_eq!(a.interval(), None);
    let a = decode(br#"{"name":"x","add":"h:1","t":{"Registered":-5}}"#, "x").unwrap();
    assert_eq!(a.sent_at(), None);
}
