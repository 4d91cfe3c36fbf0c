//! Kernel images are untrusted input: loading any byte string must end in Ok or a BootError.
#![no_main]

use keel_arch::boot::{load_kernel, BootConfig};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::sync::OnceLock;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM_ONCE: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM_ONCE.get_or_init(|| {
        let ranges: Vec<(GuestAddress, usize)> = keel_arch::layout::ram_ranges(MEM)
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("fuzz guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    // linux-loader reads from a File (Read + Seek + ReadVolatile): use a memfd.
    let Ok(fd) = memfd() else { return };
    let mut f = fd;
    if f.write_all(data).is_err() {
        return;
    }
    let cfg = BootConfig {
        mem_size: MEM,
        cmdline: "console=ttyS0",
        rsdp_addr: 0xe0000,
    };
    let _ = load_kernel(memory(), &mut f, None, &cfg);
});

fn memfd() -> std::io::Result<std::fs::File> {
    let p = std::env::temp_dir().join(format!("keel-fuzz-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)?;
    let _ = std::fs::remove_file(&p);
    Ok(f)
}
