//! virtio-blk end to end on hostile rings: a `keel_virtio::block::Block` over an in-memory
//! raw disk is activated on a queue laid out by the fuzz input, notified, left to finish
//! whatever it accepted, then reset. Invariants: no panic, no access outside guest RAM
//! (ASan), no hang — a device thread that never settles makes `reset` (which joins it) block,
//! and libFuzzer's `-timeout` reports it.
//!
//! Input: a 16-byte setup block, then the contents of guest RAM from address 0.
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | queue size: `1 << (b % 9)` (1 to 256) |
//! | 1 | bit 0: EVENT_IDX; bit 1: read-only disk; bit 2: raw format was probed (not given); bit 3: notify twice |
//! | 2..4 | starting `next_avail` / `next_used` |
//! | 4..6, 6..8, 8..10 | descriptor table, available ring, used ring (u16 guest addresses) |
//! | 10..16 | reserved |
//!
//! Like the PCI transport, queues whose rings are not inside RAM (or misaligned) are not
//! activated; `virtio_chain` covers those with no gate at all.
#![no_main]

use keel_block::storage::MemStorage;
use keel_block::{EngineConfig, EngineKind, RawImage};
use keel_virtio::block::Block;
use keel_virtio::{ActivateContext, GuestMemory, VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RAM: usize = 64 << 10;
const DISK: usize = 1 << 20;
const SETUP: usize = 16;
/// Quiet time after which a device that has not finished everything is taken as settled
/// (a request it will never complete, a ring it overwrote itself).
const QUIET: Duration = Duration::from_millis(1);
/// Longest wait for one notification to settle.
const SETTLE_MAX: Duration = Duration::from_millis(100);

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
    broken: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _queue: u16) {
        self.queue.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {}
    fn device_broken(&self, _why: &str) {
        self.broken.fetch_add(1, Ordering::SeqCst);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Whether the queue's notification is still waiting for the device thread to read it.
fn pending(event: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Waits until the device is done with what it was given: it took the notification, and then
/// every chain the driver published is in the used ring, or the device declared itself broken,
/// or nothing moved for [`QUIET`] (requests it will never complete, rings it overwrote).
fn settle(mem: &GuestMemory, event: &EventFd, avail: u64, used: u64, irq: &Irq) {
    let idx = |ring: u64| mem.read_obj::<u16>(GuestAddress(ring + 2)).ok();
    let t0 = Instant::now();
    while pending(event) && t0.elapsed() < SETTLE_MAX {
        std::thread::sleep(Duration::from_micros(20));
    }
    let mut last = (idx(used), irq.queue.load(Ordering::SeqCst));
    let mut last_change = Instant::now();
    loop {
        if irq.broken.load(Ordering::SeqCst) > 0 {
            return;
        }
        let now = (idx(used), irq.queue.load(Ordering::SeqCst));
        if now.0.is_some() && now.0 == idx(avail) {
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= QUIET || t0.elapsed() >= SETTLE_MAX {
            return;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < SETUP {
        return;
    }
    let (setup, ram) = data.split_at(SETUP);
    let size = 1u16 << (setup[0] % 9);
    let flags = setup[1];
    let event_idx = flags & 1 != 0;
    let read_only = flags & 2 != 0;
    let probed = flags & 4 != 0;
    let notify_twice = flags & 8 != 0;
    let start = u16_at(setup, 2);
    let (desc, avail, used) = (
        u64::from(u16_at(setup, 4)),
        u64::from(u16_at(setup, 6)),
        u64::from(u16_at(setup, 8)),
    );

    let mem = memory();
    let ram = &ram[..ram.len().min(RAM)];
    mem.write_slice(ram, GuestAddress(0)).unwrap();
    mem.write_slice(&vec![0u8; RAM - ram.len()], GuestAddress(ram.len() as u64))
        .unwrap();

    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return;
    }

    // A fresh disk per input keeps runs reproducible; MemStorage means no disk I/O.
    let storage = MemStorage::new(vec![0u8; DISK], DISK as u64);
    let image = RawImage::new(storage, "fuzz.raw".into(), read_only, probed).unwrap();
    let mut dev = Block::new(
        Arc::new(image),
        "vfuzz".into(),
        EngineConfig {
            kind: EngineKind::ThreadPool,
            workers: 1,
        },
    );
    let irq = Arc::new(Irq::default());
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let features = dev.features() | keel_virtio::features::VERSION_1;
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![q],
        queue_events: vec![event.try_clone().unwrap()],
        features,
    })
    .expect("activate");

    event.write(1).unwrap();
    settle(mem, &event, avail, used, &irq);
    if notify_twice && irq.broken.load(Ordering::SeqCst) == 0 {
        event.write(1).unwrap();
        settle(mem, &event, avail, used, &irq);
    }
    // Driver reset: stops the device thread and drains the engine. Hangs here are bugs.
    dev.reset();
});
