//! Virtqueues are written by the guest: whatever it puts in the descriptor table, the
//! available ring and the buffers, `keel_virtio::process_queue` must pop chains, hand them to
//! the device and fill the used ring without panicking, without touching memory outside guest
//! RAM (ASan) and without looping forever (libFuzzer `-timeout`).
//!
//! Input: a 16-byte setup block, then the contents of guest RAM from address 0.
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | queue size: `1 << (b % 9)` (1 to 256) |
//! | 1 | bit 0: EVENT_IDX; bit 2: echo readable bytes into writable ones (else fill with byte 2) |
//! | 2 | fill byte for writable buffers |
//! | 3 | the device gives up (serve returns `None`) after this many chains in the first pass; 0 = never |
//! | 4..6 | starting `next_avail` / `next_used` (a driver reaches any value by wrapping) |
//! | 6..8, 8..10, 10..12 | descriptor table, available ring, used ring (u16 guest addresses) |
//! | 12..16 | reserved |
//!
//! Like the PCI transport (`VirtioPciDevice::activate`), a queue whose rings are misaligned
//! or not entirely inside RAM is never handed to a device, so such inputs stop here: without
//! that check `process_queue` spins on an available ring that runs off the end of RAM (see
//! fuzz/README.md). Rings may still overlap each other and the buffers, descriptors may point
//! anywhere, indirect tables may be anything.
#![no_main]

use keel_virtio::{process_queue, Chain, GuestMemory, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: two adjacent regions, so buffers can straddle a region boundary.
const RAM: usize = 64 << 10;
const SETUP: usize = 16;
/// Bytes the fuzz device reads or writes per chain at most (like virtio-rng's cap), so one
/// input cannot spend seconds on a 4 GiB chain of overlapping buffers.
const MAX_IO: usize = 256 << 10;

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), RAM / 2),
            (GuestAddress((RAM / 2) as u64), RAM / 2),
        ])
        .expect("fuzz guest memory")
    })
}

#[derive(Default)]
struct Irq {
    queue: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _queue: u16) {
        self.queue.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config(&self) {}
    fn device_broken(&self, _why: &str) {}
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// A device that reads every readable byte and writes every writable one, as a real device
/// would, through the virtio-queue Reader / Writer (which check every buffer against RAM).
fn serve(chain: Chain<'_>, mem: &GuestMemory, echo: bool, fill: u8) -> u32 {
    // Walk the descriptors themselves too (flags, lengths, indirect tables).
    let mut descs = 0usize;
    let mut claimed = 0u64;
    for d in chain.clone() {
        descs += 1;
        claimed += u64::from(d.len());
        let _ = (
            d.addr(),
            d.is_write_only(),
            d.has_next(),
            d.refers_to_indirect_table(),
        );
    }
    // The chain yields at most 2^32 - 1 bytes in all, whatever its length.
    assert!(
        claimed <= u64::from(u32::MAX),
        "{descs} descriptors claim {claimed} bytes"
    );
    let head = chain.head_index();
    let reader = chain.clone().reader(mem);
    let Ok(mut writer) = chain.writer(mem) else {
        // Writable buffers outside RAM: the device reports nothing written.
        return 0;
    };
    let mut buf = [0u8; 4096];
    let mut written = 0usize;
    if let Ok(mut r) = reader {
        let mut read = 0usize;
        while read < MAX_IO {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            read += n;
            if echo && written < MAX_IO {
                written += writer.write(&buf[..n]).unwrap_or(0);
            }
        }
    }
    if !echo {
        buf.fill(fill ^ head as u8);
        while written < MAX_IO {
            match writer.write(&buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
    }
    assert!(writer.bytes_written() <= MAX_IO + buf.len());
    written as u32
}

fuzz_target!(|data: &[u8]| {
    if data.len() < SETUP {
        return;
    }
    let (setup, rest) = data.split_at(SETUP);
    let size = 1u16 << (setup[0] % 9);
    let flags = setup[1];
    let event_idx = flags & 1 != 0;
    let echo = flags & 4 != 0;
    let fill = setup[2];
    let stop_after = setup[3] as usize;
    let start = u16_at(setup, 4);
    let addr = |at| u64::from(u16_at(setup, at));
    let addrs = [addr(6), addr(8), addr(10)];

    let mem = memory();
    let ram = &rest[..rest.len().min(RAM)];
    mem.write_slice(ram, GuestAddress(0)).unwrap();
    mem.write_slice(&vec![0u8; RAM - ram.len()], GuestAddress(ram.len() as u64))
        .unwrap();

    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(addrs[0]);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(addrs[1]);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(addrs[2]);
    q.set_used_ring_address(lo, hi);
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return;
    }

    let irq = Irq::default();
    let mut served = 0usize;
    // First pass: the device may run out of room part-way (serve returns None) ...
    let first = process_queue(&mut q, 0, mem, &irq, |chain| {
        served += 1;
        if stop_after != 0 && served > stop_after {
            return None;
        }
        Some(serve(chain, mem, echo, fill))
    });
    // ... and picks the rest up on the next notification.
    if first.is_ok() {
        let _ = process_queue(&mut q, 0, mem, &irq, |chain| {
            Some(serve(chain, mem, echo, fill))
        });
    }
    // Notifications only follow used buffers.
    assert!(irq.queue.load(Ordering::Relaxed) <= 2);
});
