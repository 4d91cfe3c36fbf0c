use super::*;
use crate::test_util::{memory, wait_for, TestInterrupt, TestQueue};
use keel_block::{open_image, OpenOptions};
use std::sync::atomic::Ordering;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK: u64 = 1 << 20;

struct Rig {
    q: TestQueue,
    dev: Block,
    event: EventFd,
    irq: Arc<TestInterrupt>,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!(
                "keel-blk-test-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn rig(read_only: bool) -> Rig {
    rig_with(read_only, Vec::new())
}

fn rig_with(read_only: bool, budgets: Vec<Budget>) -> Rig {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(DISK).unwrap();
    drop(f);
    let image = open_image(
        &path,
        &OpenOptions {
            format: Some(keel_block::ImageFormat::Raw),
            read_only,
            direct: false,
        },
    )
    .unwrap();
    let mem = memory(4 << 20);
    let q = TestQueue::new(&mem, 0x1000, 64);
    let mut dev =
        Block::new(image, "test".into(), EngineConfig::default()).with_rate_limit(budgets);
    let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(TestInterrupt::default());
    dev.activate(ActivateContext {
        mem,
        interrupt: irq.clone(),
        queues: vec![q.queue()],
        queue_events: vec![event.try_clone().unwrap()],
        features: features::VERSION_1,
        hooks: Default::default(),
    })
    .unwrap();
    Rig {
        q,
        dev,
        event,
        irq,
        _dir: dir,
    }
}

impl Rig {
    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mem = &self.q.mem;
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Submits header + data + status as three descriptors and waits for completion.
    fn request(&mut self, kind: u32, sector: u64, data_len: u32, data_writable: bool) -> u8 {
        self.header(HDR, kind, sector);
        self.q.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![(HDR, 16, false)];
        if data_len > 0 {
            bufs.push((DATA, data_len, data_writable));
        }
        bufs.push((STATUS, 1, true));
        self.q.chain(0, &bufs);
        let n = self.q.used_idx();
        self.q.publish(0);
        self.event.write(1).unwrap();
        self.q.wait_used(n.wrapping_add(1));
        self.q.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

#[test]
fn write_then_read_back_flush_and_id() {
    let mut r = rig(false);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    r.q.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_OUT, 8, 4096, false), S_OK);
    r.q.mem
        .write_slice(&[0u8; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(T_IN, 8, 4096, true), S_OK);
    let mut back = vec![0u8; 4096];
    r.q.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    let (_, len) = r.q.used(r.q.used_idx() - 1);
    assert_eq!(len, 4097, "data plus status byte");
    assert_eq!(r.request(T_FLUSH, 0, 0, false), S_OK);
    assert_eq!(r.request(T_GET_ID, 0, 20, true), S_OK);
    let mut id = [0u8; 20];
    r.q.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_ne!(id, [0u8; 20]);
    assert!(r.irq.queue_signals.load(Ordering::SeqCst) > 0);
    // Discard and write-zeroes: one segment.
    for (kind, flags) in [(T_WRITE_ZEROES, 0u32), (T_DISCARD, 0)] {
        r.q.mem.write_obj(8u64, GuestAddress(DATA)).unwrap();
        r.q.mem.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
        r.q.mem.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
        assert_eq!(r.request(kind, 0, 16, false), S_OK);
    }
    assert_eq!(r.request(T_IN, 8, 4096, true), S_OK);
    r.q.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0u8; 4096]);
    r.dev.reset();
}

#[test]
fn bad_requests_fail_with_a_status() {
    let mut r = rig(false);
    // Past the end of the disk, straddling it, odd lengths, huge sectors.
    assert_eq!(r.request(T_IN, DISK / 512, 512, true), S_IOERR);
    assert_eq!(r.request(T_IN, DISK / 512 - 1, 1024, true), S_IOERR);
    assert_eq!(r.request(T_OUT, 0, 100, false), S_IOERR);
    assert_eq!(r.request(T_IN, u64::MAX, 512, true), S_IOERR);
    assert_eq!(r.request(T_IN, u64::MAX / 512, 512, true), S_IOERR);
    // Unknown type.
    assert_eq!(r.request(77, 0, 0, false), S_UNSUPP);
    // Discard with a bad segment size and flags.
    assert_eq!(r.request(T_DISCARD, 0, 8, false), S_UNSUPP);
    r.q.mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
    r.q.mem.write_obj(3u32, GuestAddress(DATA + 12)).unwrap();
    assert_eq!(r.request(T_WRITE_ZEROES, 0, 16, false), S_UNSUPP);
    // Data buffer outside guest RAM.
    r.header(HDR, T_IN, 0);
    r.q.chain(
        0,
        &[(HDR, 16, false), (64 << 20, 512, true), (STATUS, 1, true)],
    );
    let n = r.q.used_idx();
    r.q.publish(0);
    r.event.write(1).unwrap();
    r.q.wait_used(n + 1);
    assert_eq!(
        r.q.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        S_IOERR
    );
    // Header too short; writable before readable; no status byte at all.
    r.q.chain(0, &[(HDR, 8, false), (STATUS, 1, true)]);
    r.q.chain(2, &[(DATA, 512, true), (HDR, 16, false), (STATUS, 1, true)]);
    r.q.chain(5, &[(HDR, 16, false)]);
    let n = r.q.used_idx();
    for head in [0, 2, 5] {
        r.q.publish(head);
    }
    r.event.write(1).unwrap();
    r.q.wait_used(n + 3);
    assert!(!r.irq.broken.load(Ordering::SeqCst));
    // Still serving.
    assert_eq!(r.request(T_FLUSH, 0, 0, false), S_OK);
}

#[test]
fn read_only_disks_refuse_writes_and_say_so() {
    let mut r = rig(true);
    assert_ne!(r.dev.features() & F_RO, 0);
    assert_eq!(r.dev.features() & F_DISCARD, 0);
    assert_eq!(r.request(T_OUT, 0, 512, false), S_IOERR);
    assert_eq!(r.request(T_IN, 0, 512, true), S_OK);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK / 512);
}

#[test]
fn many_requests_in_flight_complete() {
    let mut r = rig(false);
    // 16 writes of distinct sectors in one notification, then read them back.
    for i in 0..16u16 {
        let hdr = HDR + u64::from(i) * 16;
        r.header(hdr, T_OUT, u64::from(i));
        r.q.mem
            .write_slice(&[i as u8 + 1; 512], GuestAddress(DATA + u64::from(i) * 512))
            .unwrap();
        r.q.chain(
            i * 3,
            &[
                (hdr, 16, false),
                (DATA + u64::from(i) * 512, 512, false),
                (STATUS + u64::from(i), 1, true),
            ],
        );
    }
    for i in 0..16u16 {
        r.q.publish(i * 3);
    }
    r.event.write(1).unwrap();
    r.q.wait_used(16);
    wait_for("statuses", || {
        (0..16).all(|i| r.q.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap() == S_OK)
    });
    for i in 0..16u16 {
        assert_eq!(r.request(T_IN, u64::from(i), 512, true), S_OK);
        assert_eq!(
            r.q.mem.read_obj::<u8>(GuestAddress(DATA + 100)).unwrap(),
            i as u8 + 1
        );
    }
}

/// Publishes `n` 512-byte reads of sectors 0.. at once (heads 0, 3, 6, ...).
fn publish_reads(r: &mut Rig, n: u16) {
    for i in 0..n {
        let hdr = HDR + u64::from(i) * 16;
        r.header(hdr, T_IN, u64::from(i));
        r.q.chain(
            i * 3,
            &[
                (hdr, 16, false),
                (DATA + u64::from(i) * 512, 512, true),
                (STATUS + u64::from(i), 1, true),
            ],
        );
    }
    for i in 0..n {
        r.q.publish(i * 3);
    }
    r.event.write(1).unwrap();
}

#[test]
fn rate_limited_requests_wait_in_the_ring_and_keep_their_order() {
    use keel_rate_limiter::{BucketConfig, ManualClock, RateLimitConfig};
    let clock = Arc::new(ManualClock::default());
    // 10 requests per second, 2 at once; the clock only moves when the test says.
    let cfg = RateLimitConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            rate: 10,
            size: 2,
            one_time_burst: 0,
        }),
    };
    let budget = Budget::with_clock(&cfg, clock.clone()).unwrap();
    let mut r = rig_with(false, vec![budget.clone()]);
    publish_reads(&mut r, 5);
    r.q.wait_used(2);
    // The limiter's timer (100 ms of real time) fires, but the simulated clock has not
    // moved: no tokens, the rest stay in the ring.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(r.q.used_idx(), 2);
    clock.advance(std::time::Duration::from_millis(100));
    r.q.wait_used(3);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(r.q.used_idx(), 3);
    clock.advance(std::time::Duration::from_secs(10));
    r.q.wait_used(5);
    let heads: Vec<u32> = (0..5).map(|i| r.q.used(i).0).collect();
    assert_eq!(heads, [0, 3, 6, 9, 12], "completed out of order");
    for i in 0..5 {
        assert_eq!(
            r.q.mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            S_OK
        );
    }
    // Flush is free: it goes while the budget is empty.
    assert_eq!(budget.available(keel_rate_limiter::TokenKind::Ops), Some(0));
    assert_eq!(r.request(T_FLUSH, 0, 0, false), S_OK);
    assert!(!r.irq.broken.load(Ordering::SeqCst));
}

#[test]
fn rate_limited_bytes_let_an_oversized_read_through_a_full_bucket() {
    use keel_rate_limiter::{BucketConfig, ManualClock, RateLimitConfig, TokenKind};
    let clock = Arc::new(ManualClock::default());
    let cfg = RateLimitConfig {
        bandwidth: Some(BucketConfig {
            rate: 1 << 20,
            size: 1024,
            one_time_burst: 0,
        }),
        ops: None,
    };
    let budget = Budget::with_clock(&cfg, clock.clone()).unwrap();
    let mut r = rig_with(false, vec![budget.clone()]);
    // 4 KiB on a 1 KiB bucket: allowed (full bucket), leaving 3 KiB of debt.
    assert_eq!(r.request(T_IN, 0, 4096, true), S_OK);
    assert_eq!(
        budget.wait_for(512, 0),
        std::time::Duration::from_nanos(3_417_969)
    );
    assert_eq!(budget.available(TokenKind::Bytes), Some(0));
    publish_reads(&mut r, 1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(r.q.used_idx(), 1, "a read went through a bucket in debt");
    clock.advance(std::time::Duration::from_millis(4));
    r.q.wait_used(2);
}

#[test]
fn a_restored_disk_keeps_the_serial_the_guest_read() {
    let a = rig(false);
    let b = rig(false);
    let saved = a.dev.save_state();
    let crate::DeviceState::Block(s) = &saved else {
        panic!("block state is {}", saved.kind());
    };
    assert!(!s.id.is_empty());
    let mut fresh = b.dev;
    assert_ne!(fresh.save_state(), saved, "two files, two serials");
    fresh.reset();
    fresh.restore_state(&saved).unwrap();
    assert_eq!(fresh.save_state(), saved);
    // Untrusted state: an ID longer than GET_ID carries, or another device's state.
    let long = crate::DeviceState::Block(crate::block::BlockState { id: "x".repeat(21) });
    assert!(fresh.restore_state(&long).is_err());
    assert!(fresh.restore_state(&crate::DeviceState::Stateless).is_err());
}
