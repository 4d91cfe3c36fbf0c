//! qcow2 images are untrusted input: opening any byte string, then reading and writing a few
//! clusters, must end in Ok or a keel_block::Error — never a panic, hang or huge allocation.
//! The image lives in memory (MemStorage), so no file is written and no backing file opened.
#![no_main]

use keel_block::storage::MemStorage;
use keel_block::{DiskImage, Qcow2Image};
use libfuzzer_sys::fuzz_target;

/// Writes may grow the in-memory file up to this.
const MAX_FILE: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    for read_only in [true, false] {
        let storage = Box::new(MemStorage::new(data.to_vec(), MAX_FILE));
        let Ok(img) = Qcow2Image::open_storage(storage, "<fuzz>", read_only) else {
            continue;
        };
        let size = img.size();
        let cs = img.cluster_size();
        let mut buf = vec![0u8; (2 * cs) as usize];
        for off in [0, cs / 2, 3 * cs, size.saturating_sub(cs + 7)] {
            let len = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
            let _ = img.read_at(&mut buf[..len], off);
        }
        if read_only {
            continue;
        }
        let _ = img.write_at(&[0x5a; 700], cs.saturating_sub(100).min(size.saturating_sub(700)));
        let _ = img.write_at(&buf[..cs.min(size) as usize], 0);
        let _ = img.write_zeroes(cs, (2 * cs).min(size.saturating_sub(cs)));
        let _ = img.discard(0, (4 * cs).min(size));
        let _ = img.flush();
        let len = (buf.len() as u64).min(size) as usize;
        let _ = img.read_at(&mut buf[..len], 0);
    }
});
