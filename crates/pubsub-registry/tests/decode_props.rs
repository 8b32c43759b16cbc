//! Properties of the decoder over arbitrary input: it never panics, and what
//! we encode comes back as it went.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use pubsub_registry::protocol::{decode, encode_announcement, encode_unregister, validate_name};
use pubsub_registry::{Service, Status};

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-]{1,12}(\\.[a-zA-Z0-9_-]{1,12}){0,3}"
}

fn service() -> impl Strategy<Value = Service> {
    (
        name(),
        ".{1,40}",
        ".{0,40}",
        ".{0,20}",
        ".{0,20}",
        ".{0,10}",
        proptest::collection::btree_map(".{0,10}", ".{0,20}", 0..5),
    )
        .prop_map(
            |(name, address, url, version, host, network, kv): (
                _,
                _,
                _,
                _,
                _,
                _,
                BTreeMap<String, String>,
            )| Service {
                network: network.into(),
                address: address.into(),
                url: url.into(),
                name: name.into(),
                version: version.into(),
                host: host.into(),
                kv: kv.into_iter().collect(),
            },
        )
}

const VALUES: &[&str] = &[
    r#""x""#,
    "1",
    "-1",
    "null",
    "{}",
    "[]",
    r#"{"Registered":"a"}"#,
    "1e400",
    r#""\ud800""#,
    r#"{"Registered":9223372036854775807,"Duration":-9223372036854775808}"#,
    "18446744073709551616",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), subject in ".{0,20}") {
        let _ = decode(&bytes, &subject);
    }

    #[test]
    fn json_shaped_noise_never_panics(
        keys in proptest::collection::vec(prop_oneof!["name", "add", "t", "kv", "status", "NAME", "Registered", ".{0,6}"], 0..8),
        values in proptest::collection::vec(proptest::sample::select(VALUES), 0..8),
    ) {
        let body: Vec<String> = keys.iter().zip(values.iter()).map(|(k, v)| format!("{k:?}:{v}")).collect();
        let _ = decode(format!("{{{}}}", body.join(",")).as_bytes(), "x");
    }

    #[test]
    fn what_we_encode_decodes_to_the_same(s in service(), status in prop_oneof![Just(Status::Passing), Just(Status::Warning), Just(Status::Critical)], ms in 0u64..4_000_000_000_000, interval in 1u64..100_000_000) {
        prop_assume!(validate_name(&s.name).is_ok());
        let sent = UNIX_EPOCH + Duration::from_millis(ms);
        let bytes = encode_announcement(&s, status, sent, Duration::from_millis(interval));
        let a = decode(&bytes, &s.name).unwrap();
        prop_assert_eq!(&a.service, &s);
        prop_assert_eq!(a.status, status);
        prop_assert_eq!(a.registered_ms, Some(ms as i64));
        prop_assert_eq!(a.duration_ms, Some(interval as i64));
        let back = decode(&encode_unregister(&s), &s.name).unwrap();
        prop_assert_eq!(back.service, s);
        prop_assert_eq!(back.registered_ms, None);
    }
}
