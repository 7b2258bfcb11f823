//! Unit tests of the protocol; std is linked for the tests only.

extern crate std;

use std::{format, string::ToString};

use super::*;
fn key() -> DeviceKey {
    DeviceKey(core::array::from_fn(|i| i as u8))
}

fn sample(keys: &DoorKeys) -> [u8; KNOCK_LEN] {
    Knock {
        kind: Kind::Open,
        index: 1,
        count: 3,
        step: 58_000_000,
        time_ms: 1_740_000_000_123,
        nonce: [0xab; 16],
        bind: None,
    }
    .encode(keys)
}

#[test]
fn knock_round_trips_and_verifies() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let bytes = sample(&keys);
    let (knock, raw) = Knock::parse(&bytes).unwrap();
    assert!(keys.verify(raw));
    assert_eq!((knock.index, knock.count, knock.step), (1, 3, 58_000_000));
    assert_eq!(knock.bind, None);
    assert_eq!(knock.encode(&keys), bytes);
}

#[test]
fn any_flipped_bit_fails_verification() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let bytes = sample(&keys);
    for i in 0..KNOCK_LEN {
        for bit in 0..8 {
            let mut bad = bytes;
            bad[i] ^= 1 << bit;
            if let Ok((_, raw)) = Knock::parse(&bad) {
                assert!(!keys.verify(raw), "byte {i} bit {bit}");
            }
        }
    }
}

#[test]
fn keys_are_bound_to_door_and_device() {
    let bytes = sample(&DoorKeys::derive(&key(), "ssh"));
    let (_, raw) = Knock::parse(&bytes).unwrap();
    assert!(!DoorKeys::derive(&key(), "vpn").verify(raw));
    let other = DeviceKey([7; 32]);
    assert!(!DoorKeys::derive(&other, "ssh").verify(raw));
}

#[test]
fn malformed_knocks_are_named() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let bytes = sample(&keys);
    assert_eq!(
        Knock::parse(&bytes[..10]).unwrap_err(),
        ParseError::Length(10)
    );
    assert_eq!(
        Knock::parse(&[0; 200]).unwrap_err(),
        ParseError::Length(200)
    );
    assert_eq!(Knock::parse(&[]).unwrap_err(), ParseError::Length(0));
    let mut bad = bytes;
    bad[0] = 9;
    assert_eq!(Knock::parse(&bad).unwrap_err(), ParseError::Version(9));
    let mut bad = bytes;
    bad[1] = 0;
    assert_eq!(Knock::parse(&bad).unwrap_err(), ParseError::Kind(0));
    let mut bad = bytes;
    bad[2] = 3;
    assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
    let mut bad = bytes;
    bad[3] = 0;
    assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
    let mut bad = bytes;
    bad[3] = MAX_KNOCKS + 1;
    assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
}

#[test]
fn bind_address_round_trips() {
    let keys = DoorKeys::derive(&key(), "ssh");
    for bind in ["198.18.0.7", "2001:db8::7"] {
        let mut knock = Knock::parse(&sample(&keys)).unwrap().0;
        knock.bind = Some(bind.parse().unwrap());
        let bytes = knock.encode(&keys);
        assert_eq!(Knock::parse(&bytes).unwrap().0.bind, knock.bind);
    }
}

#[test]
fn ports_stay_in_range_and_spread() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let range = 7000..=7099;
    let mut seen = std::collections::BTreeSet::new();
    for step in 0..200 {
        for index in 0..3 {
            let port = keys.port(step, index, &range);
            assert!(range.contains(&port));
            seen.insert(port);
        }
    }
    assert!(
        seen.len() > 90,
        "600 draws over 100 ports hit {}",
        seen.len()
    );
    assert_eq!(keys.port(5, 0, &(9000..=9000)), 9000);
    let full = 1..=65535;
    assert!(full.contains(&keys.port(5, 0, &full)));
}

#[test]
fn reply_seals_and_opens_only_for_its_key_and_sequence() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let reply = Reply {
        kind: Kind::Open,
        nonce: [0xab; 16],
        status: Status::Granted,
        port: 40123,
        expires_in_secs: 30,
        server_time_ms: 1_740_000_000_999,
    };
    let sealed = reply.seal(&keys);
    assert_eq!(Reply::open(&sealed, &keys, &[0xab; 16]).unwrap(), reply);
    assert_eq!(
        Reply::open(&sealed, &keys, &[0xac; 16]).unwrap_err(),
        ReplyError::Nonce
    );
    let other = DoorKeys::derive(&key(), "vpn");
    assert_eq!(
        Reply::open(&sealed, &other, &[0xab; 16]).unwrap_err(),
        ReplyError::Seal
    );
    for i in 0..REPLY_LEN {
        let mut bad = sealed;
        bad[i] ^= 0x01;
        assert!(Reply::open(&bad, &keys, &[0xab; 16]).is_err(), "byte {i}");
    }
    assert_eq!(
        Reply::open(&sealed[1..], &keys, &[0xab; 16]).unwrap_err(),
        ReplyError::Length(REPLY_LEN - 1)
    );
}

#[test]
fn key_file_format() {
    let key = DeviceKey([0x5a; 32]);
    let text = "5a".repeat(32);
    assert_eq!(DeviceKey::from_hex(&format!(" {text}\n")).unwrap(), key);
    assert!(
        DeviceKey::from_hex("abcd")
            .unwrap_err()
            .to_string()
            .contains("64 hex digits")
    );
    assert!(
        DeviceKey::from_hex(&"zz".repeat(32))
            .unwrap_err()
            .to_string()
            .contains("not a hex key")
    );
    assert_eq!(format!("{key:?}"), "DeviceKey(<redacted>)");
}

#[cfg(feature = "std")]
#[test]
fn generated_keys_round_trip_through_hex() {
    let key = DeviceKey::generate();
    assert_eq!(DeviceKey::from_hex(&key.to_hex()).unwrap(), key);
    assert_ne!(DeviceKey::generate(), key);
}

/// The vectors in docs/PROTOCOL.md, recomputed from their inputs.
#[test]
fn protocol_vectors() {
    let doc = crate::vectors::PROTOCOL_MD;
    assert_eq!(crate::vectors::count(doc), 5, "vectors in PROTOCOL.md");
    assert_eq!(crate::vectors::check(doc), Ok(5));
}

/// A vector with one value changed fails, and says which.
#[test]
fn a_wrong_vector_is_named() {
    let doc = crate::vectors::PROTOCOL_MD;
    let wrong = doc.replacen("port.1 7245", "port.1 7246", 1);
    let failure = crate::vectors::check(&wrong).unwrap_err();
    assert_eq!(
        (failure.vector, failure.field, failure.index),
        ("open", "port", Some(1))
    );
    let wrong = doc.replacen(
        "reply_fields granted 40123",
        "reply_fields granted 40124",
        1,
    );
    assert_eq!(crate::vectors::check(&wrong).unwrap_err().field, "reply");
}

/// A door name longer than the keys can hold is refused, not truncated.
#[test]
fn door_names_longer_than_the_buffer_are_refused() {
    let long = "d".repeat(DOOR_NAME_MAX + 1);
    assert_eq!(
        DoorKeys::try_derive(&key(), &long).unwrap_err(),
        DoorNameTooLong(DOOR_NAME_MAX + 1)
    );
    assert!(DoorKeys::try_derive(&key(), &long[1..]).is_ok());
}

#[test]
fn steps() {
    assert_eq!(step_of(0, 30), 0);
    assert_eq!(step_of(29_999, 30), 0);
    assert_eq!(step_of(30_000, 30), 1);
    assert_eq!(step_of(1_740_000_000_000, 30), 58_000_000);
}

/// One knock at a time is the sequence, knock by knock, and nothing past it.
#[test]
fn knocks_one_at_a_time_are_the_sequence() {
    let keys = DoorKeys::derive(&key(), "ssh");
    let params = DoorParams {
        knock_ports: 7000..=7999,
        knocks: 4,
        step_secs: 30,
    };
    for kind in [Kind::Open, Kind::Close, Kind::Heartbeat] {
        let whole = sequence(&keys, &params, kind, 1_740_000_000_000, [3; 16], None);
        for (i, expected) in (0u8..).zip(whole.iter()) {
            let one = knock(&keys, &params, kind, 1_740_000_000_000, [3; 16], None, i);
            assert_eq!(one.as_ref(), Some(expected));
        }
        let past = u8::try_from(whole.len()).unwrap();
        assert!(knock(&keys, &params, kind, 1_740_000_000_000, [3; 16], None, past).is_none());
    }
}
