//! The decoder over arbitrary bytes and subject names: it must never panic,
//! and whatever it accepts must satisfy the checks it promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pubsub_registry::protocol::{decode, validate_name, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a subject name and a payload.
    let (subject, payload) = match data.split_first() {
        Some((&n, rest)) => rest.split_at((n as usize).min(rest.len())),
        None => return,
    };
    let subject = String::from_utf8_lossy(subject);
    if let Ok(a) = decode(payload, &subject) {
        assert!(payload.len() <= MAX_PAYLOAD);
        assert_eq!(a.service.name, subject);
        assert!(validate_name(&a.service.name).is_ok());
        assert!(!a.service.address.is_empty());
    }
});
