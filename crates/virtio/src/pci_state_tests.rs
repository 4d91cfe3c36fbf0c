//! Pause, save, restore and resume through the transport, the way the VMM will: a guest
//! driver on real guest memory, the state through JSON, a fresh device on a copy of RAM.

use super::super::MSIX_TABLE;
use crate::block::Block;
use crate::rng::Rng;
use crate::GuestMemory as GuestMemoryMmap;
use crate::{status, DeviceRuntime, IoEvents, StateError, VirtioDevice, VirtioPciDevice};
use crate::{DeviceState, VirtioPciState};
use keel_block::{DiskImage, EngineConfig, EngineKind, ImageFormat};
use keel_hypervisor::MsiMessage;
use keel_pci::{BarAllocator, MsiRouter, PciDevice};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const BUF: u64 = 0x40000;
const NOTIFY: u64 = 0x3000;

#[derive(Default)]
struct Msi {
    evts: Mutex<Vec<EventFd>>,
    routes: Mutex<Vec<(u32, Option<MsiMessage>)>>,
}
impl MsiRouter for Msi {
    fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let mut v = self.evts.lock().unwrap();
        v.push(e.try_clone().map_err(|e| e.to_string())?);
        Ok((v.len() as u32, e))
    }
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
        self.routes.lock().unwrap().push((gsi, msg));
        Ok(())
    }
}
impl Msi {
    fn fired(&self, v: usize) -> bool {
        self.evts.lock().unwrap()[v].read().is_ok()
    }
}

#[derive(Default)]
struct Io(Mutex<Vec<u64>>);
impl IoEvents for Io {
    fn register(&self, _: &EventFd, addr: u64) -> Result<(), String> {
        self.0.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, _: &EventFd, addr: u64) -> Result<(), String> {
        self.0.lock().unwrap().retain(|a| *a != addr);
        Ok(())
    }
}

/// A guest: memory, the device, and the driver's view of its queues (at 0x4000 * (i + 1)).
struct Guest {
    dev: VirtioPciDevice,
    mem: GuestMemoryMmap,
    msi: Arc<Msi>,
    io: Arc<Io>,
    avail: Vec<u16>,
}

fn ring(i: usize) -> (u64, u64, u64) {
    let base = 0x4000 * (i as u64 + 1);
    (base, base + 0x1000, base + 0x2000)
}

impl Guest {
    fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Guest {
        let msi = Arc::new(Msi::default());
        let io = Arc::new(Io::default());
        let mut bars = BarAllocator::new(0xc000_0000, 0x100_0000).unwrap();
        let n = device.queue_max_sizes().len();
        let dev = VirtioPciDevice::new(
            device,
            mem.clone(),
            msi.clone(),
            io.clone(),
            &mut bars,
            DeviceRuntime::inline(),
        )
        .unwrap();
        Guest {
            dev,
            mem,
            msi,
            io,
            avail: vec![0; n],
        }
    }

    /// A fresh device of the same kind on a copy of this guest's RAM, restored from `state`
    /// after a JSON round trip.
    fn restored(&self, device: Box<dyn VirtioDevice>) -> Guest {
        let state: VirtioPciState =
            serde_json::from_str(&serde_json::to_string(&self.dev.save_state().unwrap()).unwrap())
                .unwrap();
        let mut copy = vec![0u8; MEM];
        self.mem.read_slice(&mut copy, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        mem.write_slice(&copy, GuestAddress(0)).unwrap();
        let mut g = Guest::new(device, mem);
        g.dev.restore_state(&state).unwrap();
        g.avail = self.avail.clone();
        g
    }

    fn w(&mut self, offset: u64, value: u64, len: usize) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Negotiates `features`, enables MSI-X (vector v: data 0x30 + v), sets up `queues`
    /// (queue i on vector i + 1) and writes DRIVER_OK.
    fn start(&mut self, features: u64, queues: usize) {
        let cap = 0x40; // MSI-X is the first capability
        self.dev.write_config(cap + 3, &[0x80]);
        for v in 0..=queues as u64 {
            let e = MSIX_TABLE + v * 16;
            self.w(e, 0xfee0_0000, 4);
            self.w(e + 8, 0x30 + v, 4);
            self.w(e + 12, 0, 4);
        }
        self.w(0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        for sel in 0..2 {
            self.w(0x08, sel, 4);
            self.w(0x0c, features >> (32 * sel) & 0xffff_ffff, 4);
        }
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(0x14, u64::from(ok), 1);
        assert_ne!(self.r(0x14, 1) as u8 & status::FEATURES_OK, 0);
        self.w(0x10, 0, 2);
        for i in 0..queues {
            let (d, a, u) = ring(i);
            self.w(0x16, i as u64, 2);
            self.w(0x18, u64::from(QSIZE), 2);
            self.w(0x1a, i as u64 + 1, 2);
            self.w(0x20, d, 8);
            self.w(0x28, a, 8);
            self.w(0x30, u, 8);
            self.w(0x1c, 1, 2);
        }
        self.w(0x14, u64::from(ok | status::DRIVER_OK), 1);
    }

    /// Writes a chain of (addr, len, device-writable) at descriptor `head` of queue `q` and
    /// publishes it (without notifying).
    fn put(&mut self, q: usize, head: u16, bufs: &[(u64, u32, bool)]) {
        let (d, a, _) = ring(q);
        for (k, &(addr, len, wr)) in bufs.iter().enumerate() {
            let i = head + k as u16;
            let more = k + 1 < bufs.len();
            let at = d + u64::from(i) * 16;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            let flags: u16 = if wr { 2 } else { 0 } | if more { 1 } else { 0 };
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj(if more { i + 1 } else { 0 }, GuestAddress(at + 14))
                .unwrap();
        }
        let idx = &mut self.avail[q];
        let slot = a + 4 + u64::from(*idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        *idx = idx.wrapping_add(1);
        self.mem.write_obj(*idx, GuestAddress(a + 2)).unwrap();
    }

    fn kick(&mut self, q: usize) {
        self.w(NOTIFY + 4 * q as u64, q as u64, 2);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    fn used(&self, q: usize, i: u16) -> (u32, u32) {
        let at = ring(q).2 + 4 + u64::from(i % QSIZE) * 8;
        let head = self.mem.read_obj(GuestAddress(at)).unwrap();
        (head, self.mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn wait_used(&self, q: usize, n: u16) {
        let t = Instant::now();
        while self.used_idx(q) != n {
            assert!(t.elapsed() < Duration::from_secs(20), "used index {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Configuration space and BAR registers as the guest reads them.
    fn registers(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for off in (0..0x100).step_by(4) {
            let mut b = [0u8; 4];
            self.dev.read_config(off, &mut b);
            out.push(u64::from(u32::from_le_bytes(b)));
        }
        for (off, len) in [
            (0x00, 4),
            (0x08, 4),
            (0x0c, 4),
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
        ] {
            out.push(self.r(off, len));
        }
        for q in 0..self.avail.len() as u64 {
            self.w(0x16, q, 2);
            for (off, len) in [
                (0x18, 2),
                (0x1a, 2),
                (0x1c, 2),
                (0x20, 8),
                (0x28, 8),
                (0x30, 8),
            ] {
                out.push(self.r(off, len));
            }
        }
        for off in (MSIX_TABLE..MSIX_TABLE + 0x40).step_by(4) {
            out.push(self.r(off, 4));
        }
        out
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

const VERSION_1: u64 = crate::features::VERSION_1;

#[test]
fn rng_continues_after_a_restore_on_its_msix_vectors_and_moved_bar() {
    let mut g = Guest::new(Box::new(Rng::new()), memory());
    g.start(VERSION_1, 1);
    for head in 0..3 {
        g.put(0, head, &[(BUF + u64::from(head) * 64, 64, true)]);
    }
    g.kick(0);
    g.wait_used(0, 3);
    assert!(g.msi.fired(1));
    // The guest moves the BAR (decoding off, new address, decoding on).
    g.dev.write_config(4, &[0x04, 0]);
    g.dev.write_config(0x10, &0xc010_0000u32.to_le_bytes());
    g.dev.write_config(4, &[0x06, 0]);
    g.dev.bar_moved(0, Some(0xc000_0000), Some(0xc010_0000));
    g.dev.pause().unwrap();
    g.dev.pause().unwrap(); // idempotent
    let before = g.registers();

    let mut r = g.restored(Box::new(Rng::new()));
    assert_eq!(r.dev.bar_address(), Some(0xc010_0000));
    assert_eq!(*r.io.0.lock().unwrap(), vec![0xc010_3000]);
    assert!(r.msi.routes.lock().unwrap().contains(&(
        2,
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x31
        })
    )));
    assert_eq!(r.registers(), before);
    r.dev.resume().unwrap();
    // The next request comes from avail slot 3 and completes as used entry 3.
    r.put(0, 5, &[(BUF + 0x1000, 32, true)]);
    r.kick(0);
    r.wait_used(0, 4);
    assert_eq!(r.used(0, 3), (5, 32));
    assert!(r.msi.fired(1), "interrupt on the restored vector");
    assert_eq!(r.r(0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn pause_resume_in_place_and_save_only_while_paused() {
    let mut g = Guest::new(Box::new(Rng::new()), memory());
    assert!(g.dev.save_state().is_ok(), "never started: saves");
    g.start(VERSION_1, 1);
    assert!(matches!(
        g.dev.save_state(),
        Err(StateError::NotPaused { .. })
    ));
    g.dev.pause().unwrap();
    g.put(0, 0, &[(BUF, 16, true)]);
    g.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.used_idx(0), 0, "paused: nothing served");
    let saved = g.dev.save_state().unwrap();
    assert_eq!(saved.queues[0].next_avail, 0);
    g.dev.resume().unwrap();
    g.wait_used(0, 1);
    // Restoring onto a started device is refused.
    assert!(matches!(
        g.dev.restore_state(&saved),
        Err(StateError::AlreadyStarted { .. })
    ));
}

/// An image in memory whose reads take `delay`.
struct SlowImage {
    data: Mutex<Vec<u8>>,
    delay: Duration,
    flushes: Mutex<usize>,
}

impl SlowImage {
    fn new(fill: u8, delay: Duration) -> Arc<SlowImage> {
        Arc::new(SlowImage {
            data: Mutex::new(vec![fill; 1 << 20]),
            delay,
            flushes: Mutex::new(0),
        })
    }
}

impl DiskImage for SlowImage {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> keel_block::Result<()> {
        std::thread::sleep(self.delay);
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> keel_block::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> keel_block::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        "slow".into()
    }
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
}

fn block(image: Arc<SlowImage>) -> Block {
    let engine = EngineConfig {
        kind: EngineKind::ThreadPool,
        workers: 4,
        thread_start: None,
    };
    Block::new(image, "vdz".into(), engine)
}

/// Publishes a read of sector `sector` (512 bytes) as chain `head` of the block queue.
fn read_req(g: &mut Guest, head: u16, sector: u64) -> u64 {
    let hdr = BUF + u64::from(head) * 0x400;
    g.mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
    g.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    g.mem.write_obj(0xffu8, GuestAddress(hdr + 0x3ff)).unwrap();
    g.put(
        0,
        head * 3 % 15,
        &[
            (hdr, 16, false),
            (hdr + 0x100, 512, true),
            (hdr + 0x3ff, 1, true),
        ],
    );
    hdr
}

#[test]
fn block_pause_waits_for_requests_in_flight_then_restores_and_swaps_images() {
    let image = SlowImage::new(0xaa, Duration::from_millis(300));
    let dev = block(image.clone());
    let control = dev.control();
    let mut g = Guest::new(Box::new(dev), memory());
    g.start(VERSION_1, 1);
    for h in 0..4 {
        read_req(&mut g, h, u64::from(h));
    }
    g.kick(0);
    std::thread::sleep(Duration::from_millis(100)); // the device takes them
    assert!(g.used_idx(0) < 4, "reads still running");
    assert!(
        control
            .replace_image(SlowImage::new(0, Duration::ZERO))
            .is_err(),
        "running: no swap"
    );
    let t = Instant::now();
    g.dev.pause().unwrap();
    assert_eq!(
        g.used_idx(0),
        4,
        "pause returned with every request completed"
    );
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert!(*image.flushes.lock().unwrap() >= 1, "the image was flushed");
    let hdr = BUF + 0x400;
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(hdr + 0x3ff)).unwrap(), 0);
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(),
        0xaa
    );

    // Requests made while paused are served after resume, from a swapped image.
    assert!(matches!(
        control.replace_image(Arc::new(Sized2)),
        Err(StateError::ImageSize { .. })
    ));
    control
        .replace_image(SlowImage::new(0xbb, Duration::ZERO))
        .unwrap();
    let hdr = read_req(&mut g, 4, 7);
    g.kick(0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(g.used_idx(0), 4);
    g.dev.resume().unwrap();
    g.wait_used(0, 5);
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(),
        0xbb
    );
    assert!(g.msi.fired(1));

    // Snapshot and restore onto a fresh device on a third image: continues at slot 5.
    g.dev.pause().unwrap();
    let fresh = block(SlowImage::new(0xcc, Duration::ZERO));
    let mut r = g.restored(Box::new(fresh));
    assert_eq!(r.registers(), g.registers());
    r.dev.resume().unwrap();
    let hdr = read_req(&mut r, 5, 9);
    r.kick(0);
    r.wait_used(0, 6);
    assert_eq!(r.used(0, 5), (0, 513));
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(),
        0xcc
    );
    assert!(r.msi.fired(1));
}

/// A 2 MiB image, for the size check.
struct Sized2;
impl DiskImage for Sized2 {
    fn size(&self) -> u64 {
        2 << 20
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn flush(&self) -> keel_block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        "2m".into()
    }
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
}

#[test]
fn hostile_states_are_refused_with_a_reason() {
    let mut g = Guest::new(Box::new(Rng::new()), memory());
    g.start(VERSION_1, 1);
    g.put(0, 0, &[(BUF, 16, true)]);
    g.kick(0);
    g.wait_used(0, 1);
    g.dev.pause().unwrap();
    let good = g.dev.save_state().unwrap();
    let fresh = || Guest::new(Box::new(Rng::new()), g.mem.clone());
    type Mutation = Box<dyn Fn(&mut VirtioPciState)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("type", Box::new(|s| s.device_type = 2)),
        ("queues", Box::new(|s| s.queues.push(s.queues[0]))),
        ("vectors", Box::new(|s| s.queue_vectors.clear())),
        ("size 0", Box::new(|s| s.queues[0].size = 0)),
        ("size 15", Box::new(|s| s.queues[0].size = 15)),
        ("size 512", Box::new(|s| s.queues[0].size = 512)),
        ("max", Box::new(|s| s.queues[0].max_size = 128)),
        ("avail", Box::new(|s| s.queues[0].next_avail = 40000)),
        ("rings", Box::new(|s| s.queues[0].desc_table = 1 << 40)),
        ("align", Box::new(|s| s.queues[0].used_ring = 0x5001)),
        ("vector", Box::new(|s| s.queue_vectors[0] = 2)),
        ("config vector", Box::new(|s| s.config_vector = 900)),
        ("status", Box::new(|s| s.status = status::ACKNOWLEDGE)),
        ("features", Box::new(|s| s.driver_features |= 1 << 40)),
        ("isr", Box::new(|s| s.isr = 0x80)),
        ("bar", Box::new(|s| s.pci.regs[4] = 0x1000_0000)),
        ("pci ids", Box::new(|s| s.pci.regs[0] = 0x1234_5678)),
        ("pci len", Box::new(|s| s.pci.regs.truncate(10))),
        ("msix", Box::new(|s| s.msix.entries.truncate(1))),
        (
            "device",
            Box::new(|s| s.device = DeviceState::Vsock(crate::vsock::VsockState { guest_cid: 3 })),
        ),
    ];
    for (what, mutate) in cases {
        let mut bad = good.clone();
        mutate(&mut bad);
        let err = fresh().dev.restore_state(&bad).unwrap_err();
        assert!(!err.to_string().is_empty(), "{what}");
    }
    // And the untouched state restores.
    fresh().dev.restore_state(&good).unwrap();
}

/// The guest pages written through `mem` from the host side since the last call (clearing).
fn written_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::GuestMemoryBackend;
    let mut pages = Vec::new();
    for region in mem.iter() {
        let map: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
        for (w, word) in map.bitmap().get_and_reset().into_iter().enumerate() {
            pages.extend(
                (0..64)
                    .filter(|b| word >> b & 1 == 1)
                    .map(|b| w as u64 * 64 + b),
            );
        }
    }
    pages
}

#[test]
fn what_a_device_writes_into_guest_memory_is_marked_for_migration() {
    let image = SlowImage::new(0x5a, Duration::ZERO);
    let mut g = Guest::new(Box::new(block(image)), memory());
    g.start(VERSION_1, 1);
    let hdr = read_req(&mut g, 2, 3);
    // What the driver wrote itself (here through the same memory) is not the device's.
    written_pages(&g.mem);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(),
        0x5a
    );
    // The data and status (one page) and the used ring; not the request header's
    // descriptors, the available ring or anything else.
    let (_, _, used) = ring(0);
    let mut want = vec![hdr / 4096, used / 4096];
    want.sort_unstable();
    assert_eq!(written_pages(&g.mem), want);
    assert!(written_pages(&g.mem).is_empty());
}
