//! The three YAML loaders (configuration, device file, client profile): any
//! text loads or is refused with an error that names its source (the file,
//! or for a rule broken across the configuration, the dotted key), never a
//! panic. The first byte picks the loader.
#![no_main]

use std::path::Path;

use knockd::config::{Config, Error};
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/fuzz/input.yaml";

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let path = Path::new(PATH);
    let named = |message: String| assert!(message.contains(PATH), "{message}");
    match which % 3 {
        0 => match Config::parse(text, path) {
            Ok(_) => {}
            Err(Error::Invalid { key, reason }) => {
                assert!(!key.is_empty() && !reason.is_empty(), "{key}: {reason}")
            }
            Err(e) => named(e.to_string()),
        },
        1 => {
            if let Err(e) = knockd::devices::parse_device_text(text, path) {
                named(e.to_string());
            }
        }
        _ => {
            if let Err(e) = knockd::profile::Profiles::parse(text, path) {
                named(e.to_string());
            }
        }
    }
});
