//! The control-socket request parser: any line parses or is refused with a
//! message, never a panic; what parses serializes back to a request that
//! parses the same.
#![no_main]

use knockd::control::{Command, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    match parse(&line) {
        Ok(command) => {
            let mut value = serde_json::to_value(&command).expect("commands serialize");
            value["version"] = serde_json::json!(knockd::control::VERSION);
            let again: Command = parse(&value.to_string()).expect("a parsed command round-trips");
            assert_eq!(again, command);
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
