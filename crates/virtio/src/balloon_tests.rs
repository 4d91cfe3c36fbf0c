use super::*;
use crate::test_util::{memory, wait_for, TestInterrupt, TestQueue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestRegionMmap, MmapRegion};

const MIB: u64 = 1 << 20;

struct Rig {
    mem: GuestMemory,
    int: Arc<TestInterrupt>,
    dev: Balloon,
    h: BalloonHandle,
    qs: Vec<TestQueue>,
    evts: Vec<EventFd>,
}

/// `dev` activated on `mem`, its three queues' rings at 0, 12 and 24 KiB.
fn rig((mut dev, h): (Balloon, BalloonHandle), mem: GuestMemory, features: u64) -> Rig {
    let qs: Vec<_> = (0..3)
        .map(|i| TestQueue::new(&mem, i * 0x3000, 256))
        .collect();
    let evts: Vec<_> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
    let int = Arc::new(TestInterrupt::default());
    let queue_events = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let queues = qs.iter().map(TestQueue::queue).collect();
    let (m, interrupt) = (mem.clone(), int.clone());
    dev.activate(ActivateContext {
        mem: m,
        interrupt,
        queues,
        queue_events,
        features,
        hooks: Default::default(),
    })
    .unwrap();
    Rig {
        mem,
        int,
        dev,
        h,
        qs,
        evts,
    }
}

fn rig64() -> Rig {
    rig(
        Balloon::new(true),
        memory(64 << 20),
        VIRTIO_BALLOON_F_STATS_VQ,
    )
}

impl Rig {
    /// Makes `bytes` available as one readable buffer on queue `q` (descriptor `head`).
    fn post(&mut self, q: usize, head: u16, bytes: &[u8]) {
        let addr = MIB * (q as u64 + 1) + u64::from(head) * 0x1000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.qs[q].chain(head, &[(addr, bytes.len() as u32, false)]);
        self.qs[q].publish(head);
    }
    fn pfns(&mut self, q: usize, head: u16, pfns: &[u32]) {
        let b: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.post(q, head, &b);
    }
    fn kick(&self, q: usize) {
        self.evts[q].write(1).unwrap();
    }
    fn config(&self) -> (u32, u32) {
        let mut c = [0u8; 8];
        self.dev.read_config(0, &mut c);
        let w = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
        (w(0), w(4))
    }
    /// (queue interrupts, config interrupts, broken)
    fn ints(&self) -> (usize, usize, bool) {
        let i = &self.int;
        let q = i.queue_signals.load(SeqCst);
        (q, i.config_signals.load(SeqCst), i.broken.load(SeqCst))
    }
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let e = entries.iter();
    e.flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

/// Resident pages of guest range [addr, addr + len), from mincore(2).
fn resident(mem: &GuestMemory, addr: u64, len: u64) -> usize {
    let host = mem.get_host_address(GuestAddress(addr)).unwrap();
    let mut v = vec![0u8; (len >> PAGE_SHIFT) as usize];
    // SAFETY: `host` is the page-aligned start of `len` mapped bytes of guest memory and
    // `v` has one byte per page, as mincore requires.
    let rc = unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|b| **b & 1 != 0).count()
}

fn rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096 / MIB
}

#[test]
fn target_config_and_actual() {
    assert_ne!(
        Balloon::new(true).0.features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        0
    );
    let (mut dev, h) = Balloon::new(false);
    assert_eq!(dev.features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    // Before activation and with unknown RAM: recorded, bounded by the config field.
    h.set_target(100 * MIB + 123).unwrap();
    assert_eq!(h.target(), 100 * MIB);
    assert!(h.set_target(1 << 50).is_err());
    assert_eq!(h.request_stats(), Err(BalloonError::NotActive));
    dev.set_guest_ram(64 * MIB);
    let too_big = BalloonError::TargetTooLarge {
        target: 49 * MIB,
        max: 48 * MIB,
    };
    assert_eq!(h.set_target(49 * MIB), Err(too_big));
    // Activation (64 MiB) clamps the recorded 100 MiB to RAM minus the floor.
    let mut r = rig((dev, h), memory(64 << 20), 0);
    assert_eq!(r.h.target(), 48 * MIB);
    // Active: the config follows the target and the driver is told.
    r.h.set_target(16 * MIB + 4095).unwrap();
    assert_eq!(
        (r.config(), r.h.target(), r.ints()),
        ((4096, 0), 16 * MIB, (0, 1, false))
    );
    assert!(r.h.set_target(48 * MIB + 4096).is_err());
    assert_eq!(r.ints().1, 1);
    // The driver writes `actual`, whole or by bytes; writes to `num_pages` are ignored.
    r.dev.write_config(4, &3000u32.to_le_bytes());
    assert_eq!(r.h.actual(), 3000 * 4096);
    r.dev.write_config(0, &[0xff; 6]);
    r.dev.write_config(u64::MAX, &[1, 2, 3]);
    assert_eq!(r.config(), (4096, 0xffff));
    assert_eq!(r.h.request_stats(), Err(BalloonError::StatsUnavailable));
    // Reset: the guest has all its memory back, the target stays, no more interrupts.
    r.dev.reset();
    assert_eq!((r.h.actual(), r.h.target()), (0, 16 * MIB));
    r.h.set_target(8 * MIB).unwrap();
    assert_eq!(r.ints().1, 1);
}

#[test]
fn inflate_releases_host_memory() {
    let mut r = rig64();
    let (base, len) = (16 * MIB, 32 * MIB);
    for off in (0..len).step_by(MIB as usize) {
        let chunk = [0xa5u8; MIB as usize];
        r.mem.write_slice(&chunk, GuestAddress(base + off)).unwrap();
    }
    let (before, rss_before) = (resident(&r.mem, base, len), rss_mib());
    assert_eq!(before as u64, len >> PAGE_SHIFT);
    // Like Linux: 256 PFNs per buffer (here in descending order), one notification.
    let first = (base >> PAGE_SHIFT) as u32;
    for b in 0..32 {
        let start = first + u32::from(b) * 256;
        r.pfns(0, b, &(start..start + 256).rev().collect::<Vec<_>>());
    }
    r.kick(0);
    r.qs[0].wait_used(32);
    let (after, rss_after) = (resident(&r.mem, base, len), rss_mib());
    eprintln!("balloon: {before} -> {after} resident pages, RSS {rss_before} -> {rss_after} MiB");
    assert_eq!(after, 0);
    assert!(rss_before - rss_after >= 24, "RSS did not drop");
    assert_eq!(r.h.inflated_bytes(), len);
    assert_eq!(
        r.dev.shared.madvise_calls.load(SeqCst),
        32,
        "runs coalesced"
    );
    assert_eq!(r.qs[0].used(5), (5, 0));
    for off in (0..len).step_by(4096 * 97) {
        assert_eq!(r.mem.read_obj::<u64>(GuestAddress(base + off)).unwrap(), 0);
    }
    // Deflating is accounting only.
    r.pfns(1, 0, &(first..first + 4096).collect::<Vec<_>>());
    r.kick(1);
    r.qs[1].wait_used(1);
    assert_eq!((r.h.inflated_bytes(), r.h.ignored_pfns()), (16 * MIB, 0));
    assert_eq!(r.ints(), (2, 0, false));
}

#[test]
fn hostile_inflate_and_deflate() {
    let mut r = rig64();
    let end = (64 << 20 >> PAGE_SHIFT) as u32;
    // Out of range (2), a duplicate, and a trailing partial PFN.
    let pfns = [0x1000, end, u32::MAX, 0x1000, 0x1001];
    let mut b: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    b.extend_from_slice(&[2, 0, 0]);
    r.post(0, 0, &b);
    // A write-only buffer, a buffer outside guest memory, one running off its end.
    r.qs[0].chain(1, &[(MIB, 64, true)]);
    r.qs[0].chain(2, &[(1 << 40, 4096, false)]);
    r.qs[0].chain(3, &[(60 * MIB, u32::MAX, false)]);
    // A descriptor loop (4 -> 5 -> 4 ...) over PFN 0x2000: 256 reads, 255 duplicates.
    r.mem
        .write_obj(0x2000u32, GuestAddress(MIB + 0x8000))
        .unwrap();
    r.qs[0].desc(4, MIB + 0x8000, 4, 1, 5);
    r.qs[0].desc(5, MIB + 0x8000, 4, 1, 4);
    for head in 1..5 {
        r.qs[0].publish(head);
    }
    r.kick(0);
    r.qs[0].wait_used(5);
    assert_eq!(r.h.inflated_bytes(), 3 * 4096);
    assert_eq!(r.h.ignored_pfns(), 3 + 255);
    // Deflating frames never inflated, or twice, is ignored.
    r.pfns(1, 0, &[0x1000, 0x1000, 0x1002, end]);
    r.kick(1);
    r.qs[1].wait_used(1);
    assert_eq!((r.h.inflated_bytes(), r.h.ignored_pfns()), (2 * 4096, 261));
    assert!(!r.ints().2);
    // A malformed ring stops the device, without a panic.
    let avail_idx = GuestAddress(r.qs[0].avail + 2);
    r.mem.write_obj(1000u16, avail_idx).unwrap();
    r.kick(0);
    wait_for("device broken", || r.ints().2);
    r.dev.reset();
    assert_eq!(r.h.inflated_bytes(), 0);
}

#[test]
fn holes_and_read_only_regions_are_never_released() {
    let ram = MmapRegion::new(16 << 20).unwrap();
    let flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    let rom = MmapRegion::build(None, 1 << 20, libc::PROT_READ, flags).unwrap();
    let mem = GuestMemory::from_regions(vec![
        GuestRegionMmap::new(ram, GuestAddress(0)).unwrap(),
        GuestRegionMmap::new(rom, GuestAddress(32 * MIB)).unwrap(),
    ])
    .unwrap();
    let mut r = rig(Balloon::new(false), mem, 0);
    r.pfns(0, 0, &[0x1000, 0x1400, 0x2000, 0x20ff]); // hole, hole, ROM, ROM
    r.kick(0);
    r.qs[0].wait_used(1);
    assert_eq!((r.h.ignored_pfns(), r.h.inflated_bytes()), (4, 0));
    assert_eq!(r.dev.shared.madvise_calls.load(SeqCst), 0);
    // Only the 16 MiB of RAM count towards the limit (floor 4 MiB).
    r.h.set_target(12 * MIB).unwrap();
    r.h.set_target(13 * MIB).unwrap_err();
}

#[test]
fn stats_are_held_and_refreshed() {
    fn serde<T: Serialize + for<'de> Deserialize<'de>>() {}
    serde::<BalloonStats>();
    let mut r = rig64();
    let mut b = stats_bytes(&[(0, 1), (4, 100 * MIB), (5, 64 * MIB), (0x7777, 9), (2, 5)]);
    b.extend_from_slice(&[6, 0, 1]); // partial entry: dropped
    r.post(2, 0, &b);
    r.kick(2);
    wait_for("stats", || r.h.stats().is_some());
    let s = r.h.stats().unwrap();
    assert_eq!(
        (s.swap_in_bytes, s.major_faults, s.available_bytes),
        (Some(1), Some(5), None)
    );
    assert_eq!(
        (s.free_bytes, s.total_bytes),
        (Some(100 * MIB), Some(64 * MIB))
    );
    assert_eq!(s.unknown_tags, 1);
    assert!(s.updated_unix_ms > 0);
    // Held until asked for.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.qs[2].used_idx(), 0);
    r.h.request_stats().unwrap();
    r.qs[2].wait_used(1);
    assert_eq!((r.qs[2].used(0), r.ints()), ((0, 0), (1, 0, false)));
    // Asking with nothing held does nothing; the driver refills the buffer.
    r.h.request_stats().unwrap();
    r.post(2, 1, &stats_bytes(&[(4, 7)]));
    r.kick(2);
    wait_for("new stats", || r.h.stats().unwrap().free_bytes == Some(7));
    assert_eq!(r.h.stats().unwrap().total_bytes, None);
    // An unreadable buffer keeps the old numbers but is held like any other, and a
    // second buffer makes the device give the first one back at once.
    r.qs[2].chain(2, &[(1 << 40, 10, false)]);
    r.qs[2].publish(2);
    r.kick(2);
    r.qs[2].wait_used(2);
    assert_eq!(r.qs[2].used(1), (1, 0));
    assert_eq!(r.h.stats().unwrap().free_bytes, Some(7));
    // Periodic refresh.
    r.h.set_stats_interval(Duration::from_millis(20));
    assert_eq!(r.h.stats_interval(), Duration::from_millis(20));
    r.qs[2].wait_used(3);
    r.post(2, 3, &stats_bytes(&[(4, 8)]));
    r.kick(2);
    r.qs[2].wait_used(4);
    r.h.set_stats_interval(Duration::ZERO);
    assert!(!r.ints().2);
}
