//! Everything `keel restore` parses from a snapshot directory before any VMM exists: the
//! manifest, the machine state (`state.json`) and the disk list (`disks.json`), each checked
//! against the others. The input is split into the three files at the first two 0xff bytes;
//! a valid-looking state is also mutated in place so the shape checks are reached. Any input
//! must be accepted or refused with an error, never a panic or an unbounded allocation.
#![no_main]

use keel_snapshot::Manifest;
use keel_vmm::snapshot::format::{parse_disks, parse_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0xff);
    let manifest = parts.next().unwrap_or_default();
    let state = parts.next().unwrap_or_default();
    let disks = parts.next().unwrap_or_default();
    let m = Manifest::parse(manifest).unwrap_or(Manifest {
        format: keel_snapshot::FORMAT.into(),
        version: keel_snapshot::VERSION,
        parts: Vec::new(),
        hmac: None,
    });
    let n = match parse_state(state) {
        Ok(saved) => {
            assert_eq!(saved.vcpus.len(), saved.config.vcpus as usize);
            // What passed the checks survives a round trip.
            let json = serde_json::to_vec(&saved).expect("a SavedVm always serialises");
            assert!(parse_state(&json).is_ok());
            saved.config.disks.len()
        }
        Err(_) => usize::from(state.first().copied().unwrap_or(0) % 4),
    };
    if let Ok(d) = parse_disks(disks, n, &m) {
        assert_eq!(d.disks.len(), n);
        for disk in &d.disks {
            for l in &disk.layers {
                assert!(m.parts.iter().any(|p| &p.name == l));
            }
        }
    }
});
