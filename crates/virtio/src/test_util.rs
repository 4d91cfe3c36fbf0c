//! Test helpers for device models: a driver-side view of one split virtqueue in real guest
//! memory, and an interrupt recorder. Devices are tested by activating them with
//! [`TestQueue::queue`]s and driving the rings the way a guest driver would.

use crate::{GuestMemory, VirtioInterrupt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const WRITE: u16 = 2;
pub const NEXT: u16 = 1;

/// Guest memory of `size` bytes at address 0.
pub fn memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory")
}

/// One split virtqueue laid out at `base` (descriptor table, then available, then used ring,
/// each 4 KiB apart), written as a driver would.
pub struct TestQueue {
    pub mem: GuestMemory,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        TestQueue {
            mem: mem.clone(),
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
        }
    }

    /// A device-side `Queue` pointing at these rings, ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a chain of descriptors starting at index `first`: (addr, len, writable).
    pub fn chain(&self, first: u16, bufs: &[(u64, u32, bool)]) {
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let more = k + 1 < bufs.len();
            let flags = if writable { WRITE } else { 0 } | if more { NEXT } else { 0 };
            self.desc(i, addr, len, flags, if more { i + 1 } else { 0 });
        }
    }

    /// Makes chain `head` available (the caller then notifies the device).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used-ring element `i`: (descriptor head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(i % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Waits (up to 5 s) until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) {
        wait_for(&format!("used index {n}"), || self.used_idx() == n);
    }
}

/// Polls `cond` for up to 20 s (generous: a loaded CI machine), panicking with `what` on
/// timeout.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Records interrupts instead of raising them.
#[derive(Default)]
pub struct TestInterrupt {
    pub queue_signals: AtomicUsize,
    pub config_signals: AtomicUsize,
    pub broken: AtomicBool,
}

impl VirtioInterrupt for TestInterrupt {
    fn signal_queue(&self, _queue: u16) {
        self.queue_signals.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {
        self.config_signals.fetch_add(1, Ordering::SeqCst);
    }
    fn device_broken(&self, _why: &str) {
        self.broken.store(true, Ordering::SeqCst);
    }
}
