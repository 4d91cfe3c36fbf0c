//! A snapshot's manifest is untrusted bytes: `Manifest::parse` must accept or refuse any of
//! them without panicking, and an accepted manifest must name only plain files and survive a
//! serialise/parse round trip unchanged.
#![no_main]

use keel_snapshot::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        for p in &m.parts {
            assert!(!p.name.contains('/') && !p.name.starts_with('.'), "{:?}", p.name);
        }
        let json = serde_json::to_vec(&m).expect("a Manifest always serialises");
        assert_eq!(Manifest::parse(&json).ok(), Some(m));
    }
});
