//! The ring-buffer record decoder: any bytes decode or are refused, never
//! panic; a decoded knock never claims more payload than it carries, and
//! its two addresses are of one family.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(knock) = knockd::events::decode(data) {
        assert!(knock.payload.len() <= knockd_common::KNOCK_PAYLOAD_MAX);
        // One family for both ends: a reply goes from one to the other.
        assert_eq!(knock.source.is_ipv4(), knock.destination.is_ipv4());
    }
});
