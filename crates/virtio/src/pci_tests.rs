//! The transport driven the way a driver (or a hostile guest) would: through BAR 0 and
//! configuration space, on real guest memory, with a real device thread behind it.

use super::*;
use crate::rng::Rng;
use crate::GuestMemory as GuestMemoryMmap;
use keel_hypervisor::MsiMessage;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

#[derive(Default)]
struct FakeMsi {
    next: StdMutex<u32>,
    evts: StdMutex<Vec<EventFd>>,
}
impl MsiRouter for FakeMsi {
    fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
        let mut n = self.next.lock().unwrap();
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        self.evts
            .lock()
            .unwrap()
            .push(e.try_clone().map_err(|e| e.to_string())?);
        *n += 1;
        Ok((*n, e))
    }
    fn set_route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> Result<(), String> {
        Ok(())
    }
}
impl FakeMsi {
    fn fired(&self, vector: usize) -> bool {
        self.evts.lock().unwrap()[vector].read().is_ok()
    }
}

#[derive(Default)]
struct FakeIoEvents {
    live: StdMutex<Vec<u64>>,
}
impl IoEvents for FakeIoEvents {
    fn register(&self, _evt: &EventFd, addr: u64) -> Result<(), String> {
        self.live.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, _evt: &EventFd, addr: u64) -> Result<(), String> {
        self.live.lock().unwrap().retain(|a| *a != addr);
        Ok(())
    }
}

const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const BUF: u64 = 0x10000;

struct Driver {
    dev: VirtioPciDevice,
    mem: GuestMemoryMmap,
    msi: Arc<FakeMsi>,
    ioevents: Arc<FakeIoEvents>,
    avail_idx: u16,
}

/// Holds activations until the test runs them, as the VMM's event loop does.
#[derive(Default)]
struct QueuedActivator(Mutex<Vec<crate::ActivationJob>>);

impl crate::Activator for QueuedActivator {
    fn activate(&self, job: crate::ActivationJob) {
        self.0.lock().unwrap().push(job);
    }
}

impl QueuedActivator {
    fn run_all(&self) -> usize {
        let jobs: Vec<_> = self.0.lock().unwrap().drain(..).collect();
        let n = jobs.len();
        jobs.into_iter().for_each(|j| j());
        n
    }
}

impl Driver {
    fn new() -> Driver {
        Self::with_runtime(crate::DeviceRuntime::inline())
    }

    fn with_runtime(runtime: crate::DeviceRuntime) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let msi = Arc::new(FakeMsi::default());
        let ioevents = Arc::new(FakeIoEvents::default());
        let mut bars = BarAllocator::new(0xc000_0000, 0x100_0000).unwrap();
        let dev = VirtioPciDevice::new(
            Box::new(Rng::new()),
            mem.clone(),
            msi.clone(),
            ioevents.clone(),
            &mut bars,
            runtime,
        )
        .unwrap();
        Driver {
            dev,
            mem,
            msi,
            ioevents,
            avail_idx: 0,
        }
    }

    fn w(&mut self, offset: u64, value: u64, len: usize) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }

    fn enable_msix(&mut self) {
        let cap = self.find_cap(0x11).unwrap();
        self.dev.write_config(cap + 3, &[0x80]);
        for v in 0..2u64 {
            let e = MSIX_TABLE + v * 16;
            self.w(e, 0xfee0_0000, 4);
            self.w(e + 8, 0x30 + v, 4);
            self.w(e + 12, 0, 4);
        }
    }

    fn find_cap(&mut self, id: u8) -> Option<usize> {
        let mut p = self.dev.config().read_u32(0x34) as usize & 0xff;
        while p != 0 {
            let d = self.dev.config().read_u32(p);
            if d as u8 == id {
                return Some(p);
            }
            p = (d >> 8) as usize & 0xff;
        }
        None
    }

    /// Negotiates, sets up queue 0 at the fixed rings, and starts the device.
    fn start(&mut self) {
        self.start_with(DESC, AVAIL, USED);
    }

    /// Like [`Driver::start`], with the rings wherever the test wants them (the avail ring's
    /// address written in two halves, as Linux does).
    fn start_with(&mut self, desc: u64, avail: u64, used: u64) {
        self.w(0x14, 0, 1);
        self.w(0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        self.w(0x08, 1, 4);
        self.w(0x0c, 1, 4); // VERSION_1
        self.w(
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            1,
        );
        assert_ne!(self.status() & status::FEATURES_OK, 0);
        self.w(0x10, 0, 2); // config vector 0
        self.w(0x16, 0, 2);
        self.w(0x18, u64::from(QSIZE), 2);
        self.w(0x1a, 1, 2); // queue vector 1
        self.w(0x20, desc, 8);
        self.w(0x28, avail & 0xffff_ffff, 4);
        self.w(0x2c, avail >> 32, 4);
        self.w(0x30, used, 8);
        self.w(0x1c, 1, 2);
        self.w(
            0x14,
            u64::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
            1,
        );
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(NOTIFY, 0, 2);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + u64::from(i % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn wait(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
        let t = Instant::now();
        while !cond(self) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

const WRITE: u16 = 2;
const NEXT: u16 = 1;

#[test]
fn identity_capabilities_and_ioeventfds() {
    let mut d = Driver::new();
    assert_eq!(d.dev.config().read_u32(0), 0x1044_1af4);
    let bar = d.dev.bar_address().unwrap();
    assert_eq!(*d.ioevents.live.lock().unwrap(), vec![bar + NOTIFY]);
    // Five vendor capabilities (common, ISR, device, notify, PCI cfg) plus MSI-X.
    let mut kinds = Vec::new();
    let mut p = d.dev.config().read_u32(0x34) as usize & 0xff;
    while p != 0 {
        let v = d.dev.config().read_u32(p);
        if v as u8 == CAP_VENDOR {
            kinds.push((v >> 24) as u8);
        }
        p = (v >> 8) as usize & 0xff;
    }
    assert_eq!(kinds, vec![1, 3, 4, 2, 5]);
    assert_eq!(d.r(0x12, 2), 1, "one queue");
    // Moving the BAR moves the notification ioeventfd.
    d.dev.bar_moved(0, Some(bar), Some(0xd000_0000));
    assert_eq!(*d.ioevents.live.lock().unwrap(), vec![0xd000_0000 + NOTIFY]);
    d.dev.bar_moved(0, Some(0xd000_0000), None);
    assert!(d.ioevents.live.lock().unwrap().is_empty());
    // The PCI configuration access window reaches the common configuration.
    let cfg = d.find_cap(CAP_VENDOR).map(|_| d.dev.cfg_cap).unwrap();
    d.dev.write_config(cfg + 4, &[0]);
    d.dev.write_config(cfg + 8, &0x12u32.to_le_bytes());
    d.dev.write_config(cfg + 12, &2u32.to_le_bytes());
    let mut b = [0u8; 2];
    d.dev.read_config(cfg + 16, &mut b);
    assert_eq!(u16::from_le_bytes(b), 1);
}

#[test]
fn features_without_version_1_or_unknown_bits_are_refused() {
    let mut d = Driver::new();
    d.w(0x14, 3, 1);
    d.w(0x14, 3 | u64::from(status::FEATURES_OK), 1);
    assert_eq!(d.status() & status::FEATURES_OK, 0, "legacy driver refused");
    d.w(0x14, 0, 1);
    d.w(0x14, 3, 1);
    d.w(0x08, 1, 4);
    d.w(0x0c, 1 | 1 << 20, 4); // VERSION_1 plus a bit the device never offered
    d.w(0x14, 3 | u64::from(status::FEATURES_OK), 1);
    assert_eq!(d.status() & status::FEATURES_OK, 0);
    // Feature pages: page 1 bit 0 is VERSION_1.
    d.w(0x00, 1, 4);
    assert_eq!(d.r(0x04, 4) & 1, 1);
    d.w(0x00, 7, 4);
    assert_eq!(d.r(0x04, 4), 0);
}

#[test]
fn rng_fills_buffers_and_interrupts_through_msix() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start();
    assert_eq!(d.r(0x1a, 2), 1);
    d.mem.write_slice(&[0u8; 64], GuestAddress(BUF)).unwrap();
    d.desc(0, BUF, 64, WRITE, 0);
    d.publish(0);
    d.wait("the used ring", |d| d.used_idx() == 1);
    assert_eq!(d.used(0), (0, 64));
    let mut got = [0u8; 64];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_ne!(got, [0u8; 64]);
    d.wait("the queue interrupt", |d| d.msi.fired(1));
    // Two-descriptor chain: both buffers filled.
    d.desc(1, BUF, 8, WRITE | NEXT, 2);
    d.desc(2, BUF + 0x100, 8, WRITE, 0);
    d.publish(1);
    d.wait("the second request", |d| d.used_idx() == 2);
    assert_eq!(d.used(1), (1, 16));
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn hostile_descriptors_fail_the_request_not_the_vmm() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start();
    // Buffer outside guest RAM.
    d.desc(0, MEM_SIZE as u64 + 0x1000, 64, WRITE, 0);
    d.publish(0);
    // Buffer straddling the end of guest RAM.
    d.desc(1, MEM_SIZE as u64 - 8, 64, WRITE, 0);
    d.publish(1);
    // Read-only buffer: nothing to fill.
    d.desc(2, BUF, 64, 0, 0);
    d.publish(2);
    // A descriptor loop: 3 -> 4 -> 3 ...
    d.desc(3, BUF, 8, WRITE | NEXT, 4);
    d.desc(4, BUF, 8, WRITE | NEXT, 3);
    d.publish(3);
    // Out-of-range next index.
    d.desc(5, BUF, 8, WRITE | NEXT, 999);
    d.publish(5);
    // A huge length.
    d.desc(6, BUF, u32::MAX, WRITE, 0);
    d.publish(6);
    d.wait("every request to complete or be dropped", |d| {
        d.used_idx() >= 6
    });
    let lens: Vec<u32> = (0..d.used_idx()).map(|i| d.used(i).1).collect();
    assert!(lens.iter().all(|&l| l <= 16 * 8), "{lens:?}");
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    // The device still works afterwards.
    let before = d.used_idx();
    d.desc(7, BUF, 32, WRITE, 0);
    d.publish(7);
    d.wait("a good request after the bad ones", |d| {
        d.used_idx() == before + 1
    });
}

#[test]
fn a_runaway_available_index_marks_the_device_broken() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start();
    d.mem.write_obj(QSIZE + 5, GuestAddress(AVAIL + 2)).unwrap();
    d.w(NOTIFY, 0, 2);
    d.wait("DEVICE_NEEDS_RESET", |d| {
        d.status() & status::DEVICE_NEEDS_RESET != 0
    });
    d.wait("the config interrupt", |d| d.msi.fired(0));
    // Reset brings it back.
    d.w(0x14, 0, 1);
    assert_eq!(d.status(), 0);
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    d.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    d.avail_idx = 0;
    d.enable_msix();
    d.start();
    d.desc(0, BUF, 16, WRITE, 0);
    d.publish(0);
    d.wait("service after reset", |d| d.used_idx() == 1);
}

#[test]
fn a_head_index_outside_the_table_marks_the_device_broken() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start();
    d.publish(QSIZE + 3);
    d.wait("DEVICE_NEEDS_RESET", |d| {
        d.status() & status::DEVICE_NEEDS_RESET != 0
    });
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn rings_outside_guest_memory_are_refused_at_driver_ok() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start_with(MEM_SIZE as u64 * 4, AVAIL, USED);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn garbage_register_writes_never_panic() {
    let mut d = Driver::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 3, 4, 8][(r % 5) as usize];
        let offset = (r >> 8) % (BAR_SIZE + 0x100);
        let value = next().to_le_bytes();
        match r >> 60 {
            0..=9 => d.dev.write_bar(0, offset, &value[..len]),
            10..=11 => {
                let mut b = [0u8; 8];
                d.dev.read_bar(0, offset, &mut b[..len]);
            }
            12..=13 => d.dev.write_config((offset % 4200) as usize, &value[..len]),
            _ => {
                let mut b = [0u8; 8];
                d.dev.read_config((offset % 4200) as usize, &mut b[..len]);
            }
        }
    }
}

#[test]
fn misaligned_rings_are_refused_at_driver_ok() {
    let mut d = Driver::new();
    d.enable_msix();
    // The descriptor table must be 16-byte aligned.
    d.start_with(DESC + 8, AVAIL, USED);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_vectors_can_be_remapped_while_running() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start();
    d.w(0x16, 0, 2);
    d.w(0x1a, 0, 2);
    assert_eq!(d.r(0x1a, 2), 0);
    d.w(0x1a, 99, 2);
    assert_eq!(
        d.r(0x1a, 2),
        u64::from(NO_VECTOR),
        "out-of-table vectors read NO_VECTOR"
    );
    d.w(0x1a, 0, 2);
    d.desc(0, BUF, 8, WRITE, 0);
    d.publish(0);
    d.wait("the interrupt on the remapped vector", |d| d.msi.fired(0));
}

/// Found by fuzzing: with the used ring starting on the available index, the device's own
/// `used.flags` writes announce work that is never there. The device must stop, not spin,
/// and a reset must still complete.
#[test]
fn overlapping_rings_break_the_device_instead_of_spinning() {
    let mut d = Driver::new();
    d.enable_msix();
    d.start_with(DESC, AVAIL + 2, AVAIL + 4);
    d.w(NOTIFY, 0, 2);
    d.wait("DEVICE_NEEDS_RESET", |d| {
        d.status() & status::DEVICE_NEEDS_RESET != 0
    });
    d.w(0x14, 0, 1);
    assert_eq!(d.status(), 0);
}

fn queued() -> (Driver, Arc<QueuedActivator>) {
    let q = Arc::new(QueuedActivator::default());
    let d = Driver::with_runtime(crate::DeviceRuntime {
        activator: q.clone(),
        hooks: crate::ThreadHooks::default(),
    });
    (d, q)
}

#[test]
fn a_kick_before_the_queued_activation_runs_is_not_lost() {
    let (mut d, q) = queued();
    d.start();
    assert_ne!(d.status() & status::DRIVER_OK, 0);
    d.desc(0, BUF, 32, WRITE, 0);
    d.publish(0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 0, "the device ran before its activation");
    assert_eq!(q.run_all(), 1);
    d.wait("the request kicked before activation", |d| {
        d.used_idx() == 1
    });
}

#[test]
fn a_reset_cancels_a_queued_activation() {
    let (mut d, q) = queued();
    d.start();
    d.desc(0, BUF, 32, WRITE, 0);
    d.publish(0);
    d.w(0x14, 0, 1);
    assert_eq!(d.status(), 0);
    // The stale activation runs after the reset: it must not start the device.
    assert_eq!(q.run_all(), 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.used_idx(), 0, "a cancelled activation started the device");
    // A new DRIVER_OK starts it for real (the driver re-posts after the reset).
    d.avail_idx = 0;
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    d.start();
    d.publish(0);
    assert_eq!(q.run_all(), 1);
    d.wait("the request after a restart", |d| d.used_idx() == 1);
}
