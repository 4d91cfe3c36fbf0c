//! `--memory` values come from users: parsing any string must not panic, and a parsed size
//! must format back to something that parses to the same value.
#![no_main]

use keel_vmm::config::{format_size, parse_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(n) = parse_size(s) {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
});
