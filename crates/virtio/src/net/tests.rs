//! virtio-net against a real tap, driven the way a driver (or a hostile guest) would: rings in
//! real guest memory ([`TestQueue`]), a real device thread, and an AF_PACKET socket on the
//! tap's host side to see what the device sends and to make the kernel transmit frames onto
//! the tap for the device to receive. Tests that need `/dev/net/tun` and CAP_NET_ADMIN print
//! "skipped: <test>: <reason>" to stderr and return where this process cannot create a tap.
//! Each test has its own tap, so they run in parallel.

use super::datapath::BUDGET;
use super::*;
use crate::test_util::{memory, wait_for, TestInterrupt, TestQueue, NEXT, WRITE};
use crate::GuestMemory;
use std::ffi::CString;
use std::fmt::Display;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MQ,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

mod config;
mod hostile;
mod rate;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 256;
/// Receive rings (three pages), then transmit rings.
const RX_RINGS: u64 = 0;
const TX_RINGS: u64 = 0x4000;
/// Receive buffers live from here (1 MiB), transmit buffers from `TX_BUFS` (3 MiB).
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x30_0000;
const INDIRECT: u16 = 4;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The IEEE local experimental EtherType, so test frames stand out.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// Says that a test did not run, on stderr directly so the harness's capture cannot hide it.
fn skip(test: &str, reason: &dyn Display) {
    let _ = writeln!(io::stderr(), "skipped: {test}: {reason}");
}

/// A new anonymous tap, or `None` (said loudly) where this process cannot create one.
fn tap_or_skip(test: &str) -> Option<Tap> {
    match Tap::open(None) {
        Ok(tap) => Some(tap),
        Err(e @ keel_net::Error::OpenTun { .. }) => {
            skip(test, &e);
            None
        }
        Err(keel_net::Error::OpenTap { ref source, .. })
            if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            skip(test, &"no permission to create a tap (needs CAP_NET_ADMIN)");
            None
        }
        Err(e) => panic!("opening an anonymous tap: {e}"),
    }
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(
        index,
        0,
        "if_nametoindex({name}): {}",
        io::Error::last_os_error()
    );
    index
}

/// A broadcast test frame of `len` bytes (no FCS) from the guest's MAC, tagged `tag` in the
/// first payload byte, the rest a pattern.
fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(GUEST_MAC);
    f.extend(ETHERTYPE);
    f.push(tag);
    let mut i = 0u8;
    while f.len() < len {
        f.push(i ^ tag);
        i = i.wrapping_add(1);
    }
    f.truncate(len);
    f
}

fn is_tagged(f: &[u8], tag: u8) -> bool {
    f.len() > 14 && f[12..14] == ETHERTYPE && f[14] == tag
}

/// An AF_PACKET socket bound to one interface: sees every frame it receives or sends, and
/// sends raw frames out of it (the kernel transmits them onto the tap, for the device to
/// read).
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(ifindex: u32) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd from socket(2) that nothing else owns.
        let sock = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: all-zero is a valid sockaddr_ll (integers and a byte array).
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: `sll` is a valid sockaddr_ll and its exact size is passed.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        sock
    }

    /// Transmits `frame` out of the interface, i.e. into the tap's read side.
    fn send(&self, frame: &[u8]) {
        // SAFETY: the kernel reads `frame.len()` bytes from the valid slice `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send on AF_PACKET: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame the interface received (from the device) tagged `tag`, within 5 s.
    fn recv_tagged(&self, tag: u8) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70_000];
        loop {
            assert!(
                Instant::now() < deadline,
                "no frame tagged {tag} within 5 s"
            );
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, exclusively borrowed for the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sll_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `sll` are valid for writes of the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sll_len,
                )
            };
            assert!(n >= 0, "recvfrom: {}", io::Error::last_os_error());
            let f = &buf[..n as usize];
            if sll.sll_pkttype != libc::PACKET_OUTGOING && is_tagged(f, tag) {
                return f.to_vec();
            }
        }
    }
}

/// An activated device on its own tap, with the driver's side of both queues.
struct Rig {
    net: Net,
    mem: GuestMemory,
    rx: TestQueue,
    tx: TestQueue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<TestInterrupt>,
    stats: Arc<NetStats>,
    sock: PacketSocket,
}

impl Rig {
    /// A device whose driver acked `want` (as far as offered), or `None` if taps cannot be
    /// made here.
    fn new(test: &str, want: u64) -> Option<Rig> {
        Rig::limited(test, want, None, None)
    }

    /// The same, with receive and transmit budgets.
    fn limited(
        test: &str,
        want: u64,
        rx: Option<keel_rate_limiter::Budget>,
        tx: Option<keel_rate_limiter::Budget>,
    ) -> Option<Rig> {
        let tap = tap_or_skip(test)?;
        let name = tap.name().to_string();
        // No IPv6 autoconfiguration chatter on the link: the tests count frames.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        tap.bring_up().unwrap();
        let sock = PacketSocket::bind(ifindex(&name));
        let mut net = Net::new(tap, MacAddr::try_from(GUEST_MAC).unwrap())
            .unwrap()
            .with_rate_limits(rx, tx);
        let acked = want & net.features();
        let mem = memory(MEM_SIZE);
        let rx = TestQueue::new(&mem, RX_RINGS, QSIZE);
        let tx = TestQueue::new(&mem, TX_RINGS, QSIZE);
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let mut queues = vec![rx.queue(), tx.queue()];
        for q in &mut queues {
            virtio_queue::QueueT::set_event_idx(q, event_idx);
        }
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(TestInterrupt::default());
        let stats = net.stats_handle();
        net.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
            queue_events: vec![rx_kick.try_clone().unwrap(), tx_kick.try_clone().unwrap()],
            features: acked | features::VERSION_1,
            hooks: Default::default(),
        })
        .unwrap();
        Some(Rig {
            net,
            mem,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq,
            stats,
            sock,
        })
    }

    fn kick_rx(&self) {
        self.rx_kick.write(1).unwrap();
    }

    fn kick_tx(&self) {
        self.tx_kick.write(1).unwrap();
    }

    fn counters(&self) -> NetCounters {
        self.stats.snapshot()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Posts receive buffer `head`: one writable descriptor of `len` bytes at `addr`.
    fn post_rx(&mut self, head: u16, addr: u64, len: u32) {
        self.rx.chain(head, &[(addr, len, true)]);
        self.rx.publish(head);
    }

    /// Puts `hdr + frame` in guest memory at `addr` as transmit chain `head` (one descriptor).
    fn post_tx(&mut self, head: u16, addr: u64, frame: &[u8]) -> u32 {
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend(frame);
        self.write(addr, &bytes);
        self.tx.chain(head, &[(addr, bytes.len() as u32, false)]);
        self.tx.publish(head);
        bytes.len() as u32
    }

    fn assert_healthy(&self) {
        assert!(
            !self.irq.broken.load(Ordering::SeqCst),
            "the device marked itself broken"
        );
    }
}

/// `num_buffers` of the header at `addr`.
fn num_buffers(rig: &Rig, addr: u64) -> u16 {
    let b = rig.read(addr + 10, 2);
    u16::from_le_bytes([b[0], b[1]])
}

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

#[test]
fn guest_frames_reach_the_tap_byte_exact() {
    let Some(mut rig) = Rig::new("guest_frames_reach_the_tap_byte_exact", MRG) else {
        return;
    };
    // Header and frame in separate descriptors, the frame itself split in two.
    let f1 = frame(1, 100);
    rig.write(TX_BUFS, &[0; VNET_HDR_LEN]);
    rig.write(TX_BUFS + 0x100, &f1[..20]);
    rig.write(TX_BUFS + 0x200, &f1[20..]);
    rig.tx.chain(
        0,
        &[
            (TX_BUFS, VNET_HDR_LEN as u32, false),
            (TX_BUFS + 0x100, 20, false),
            (TX_BUFS + 0x200, 80, false),
        ],
    );
    rig.tx.publish(0);
    // Header and frame in one descriptor, as Linux sends when the header fits in front.
    let f2 = frame(2, 1514);
    rig.post_tx(3, TX_BUFS + 0x1000, &f2);
    // Through an indirect table, as Linux uses for scattered skbs.
    let f3 = frame(3, 333);
    let table = TX_BUFS + 0x3000;
    rig.write(TX_BUFS + 0x4000, &[0; VNET_HDR_LEN]);
    rig.write(TX_BUFS + 0x5000, &f3);
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        d
    };
    let mut t = desc(TX_BUFS + 0x4000, VNET_HDR_LEN as u32, NEXT, 1);
    t.extend(desc(TX_BUFS + 0x5000, 333, 0, 0));
    rig.write(table, &t);
    rig.tx.desc(4, table, 32, INDIRECT, 0);
    rig.tx.publish(4);
    rig.kick_tx();

    rig.tx.wait_used(3);
    assert_eq!(rig.tx.used(0), (0, 0));
    assert_eq!(rig.tx.used(1), (3, 0));
    assert_eq!(rig.tx.used(2), (4, 0));
    assert_eq!(rig.sock.recv_tagged(1), f1);
    assert_eq!(rig.sock.recv_tagged(2), f2);
    assert_eq!(rig.sock.recv_tagged(3), f3);
    let c = rig.counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (3, 100 + 1514 + 333));
    assert_eq!((c.tx_dropped, c.tx_errors), (0, 0));
    // Without EVENT_IDX every batch interrupts.
    assert!(rig.irq.queue_signals.load(Ordering::SeqCst) >= 1);
    rig.assert_healthy();
}

#[test]
fn host_frames_land_in_merged_rx_buffers() {
    let Some(mut rig) = Rig::new("host_frames_land_in_merged_rx_buffers", MRG) else {
        return;
    };
    let buf = |i: u16| RX_BUFS + u64::from(i) * 0x1000;
    for i in 0..8 {
        rig.post_rx(i, buf(i), 512);
    }
    rig.kick_rx();

    let small = frame(7, 60);
    rig.sock.send(&small);
    rig.rx.wait_used(1);
    assert_eq!(rig.rx.used(0), (0, 72));
    assert_eq!(num_buffers(&rig, buf(0)), 1);
    assert_eq!(rig.read(buf(0) + 12, 60), small);

    // 12 + 1400 bytes: 512 + 512 + 388 over three buffers.
    let big = frame(8, 1400);
    rig.sock.send(&big);
    rig.rx.wait_used(4);
    assert_eq!(rig.rx.used(1), (1, 512));
    assert_eq!(rig.rx.used(2), (2, 512));
    assert_eq!(rig.rx.used(3), (3, 388));
    assert_eq!(num_buffers(&rig, buf(1)), 3);
    let mut got = rig.read(buf(1) + 12, 500);
    got.extend(rig.read(buf(2), 512));
    got.extend(rig.read(buf(3), 388));
    assert_eq!(got, big);

    let c = rig.counters();
    assert_eq!((c.rx_frames, c.rx_bytes), (2, 1460));
    assert_eq!((c.rx_dropped, c.rx_bad_buffers), (0, 0));
    assert!(rig.irq.queue_signals.load(Ordering::SeqCst) >= 2);
    rig.assert_healthy();
}

#[test]
fn without_merged_buffers_one_chain_holds_the_frame() {
    let Some(mut rig) = Rig::new("without_merged_buffers_one_chain_holds_the_frame", 0) else {
        return;
    };
    // A 100-byte buffer: a 200-byte frame cannot fit and is dropped, the buffer kept...
    rig.post_rx(0, RX_BUFS, 100);
    rig.kick_rx();
    rig.sock.send(&frame(1, 200));
    wait_for("the oversized frame dropped", || {
        rig.counters().rx_dropped == 1
    });
    assert_eq!(rig.rx.used_idx(), 0);
    // ...for a frame that fits.
    let f = frame(2, 60);
    rig.sock.send(&f);
    rig.rx.wait_used(1);
    assert_eq!(rig.rx.used(0), (0, 72));
    assert_eq!(num_buffers(&rig, RX_BUFS), 1);
    assert_eq!(rig.read(RX_BUFS + 12, 60), f);

    // A big-packets style chain: header buffer, then data buffers.
    rig.rx.chain(
        1,
        &[
            (RX_BUFS + 0x1000, VNET_HDR_LEN as u32, true),
            (RX_BUFS + 0x2000, 600, true),
            (RX_BUFS + 0x3000, 1000, true),
        ],
    );
    rig.rx.publish(1);
    rig.kick_rx();
    let f = frame(3, 1000);
    rig.sock.send(&f);
    rig.rx.wait_used(2);
    assert_eq!(rig.rx.used(1), (1, 1012));
    assert_eq!(num_buffers(&rig, RX_BUFS + 0x1000), 1);
    let mut got = rig.read(RX_BUFS + 0x2000, 600);
    got.extend(rig.read(RX_BUFS + 0x3000, 400));
    assert_eq!(got, f);
    let c = rig.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (2, 1));
    rig.assert_healthy();
}

#[test]
fn rx_waits_for_buffers_without_spinning_or_dropping() {
    let want = MRG | features::RING_EVENT_IDX;
    let Some(mut rig) = Rig::new("rx_waits_for_buffers_without_spinning_or_dropping", want) else {
        return;
    };
    // No buffers at all: three frames wait.
    let frames: Vec<_> = (1..=3).map(|t| frame(t, 60 + usize::from(t))).collect();
    for f in &frames {
        rig.sock.send(f);
    }
    wait_for("the device to look at the tap", || {
        rig.counters().wakeups >= 1
    });
    std::thread::sleep(Duration::from_millis(100));
    let before = rig.counters().wakeups;
    std::thread::sleep(Duration::from_millis(300));
    rig.sock.send(&frame(4, 64));
    std::thread::sleep(Duration::from_millis(100));
    let c = rig.counters();
    assert!(
        c.wakeups - before <= 2,
        "the device thread woke {} times with nowhere to put frames",
        c.wakeups - before
    );
    assert_eq!((c.rx_frames, c.rx_dropped), (0, 0));
    assert_eq!(rig.rx.used_idx(), 0);

    // Buffers arrive: everything comes, in order.
    let buf = |i: u16| RX_BUFS + u64::from(i) * 0x1000;
    for i in 0..4 {
        rig.post_rx(i, buf(i), 2048);
    }
    rig.kick_rx();
    rig.rx.wait_used(4);
    for (i, f) in frames.iter().enumerate() {
        let i = i as u16;
        assert_eq!(rig.rx.used(i), (u32::from(i), f.len() as u32 + 12));
        assert_eq!(rig.read(buf(i) + 12, f.len()), *f);
    }
    assert_eq!(rig.read(buf(3) + 12, 64), frame(4, 64));
    assert_eq!(rig.counters().rx_dropped, 0);

    // Too few buffers for a big frame: it waits too, and the device asks (avail_event) to
    // hear of the next buffer, past the one it already holds.
    rig.post_rx(4, buf(4), 512);
    rig.kick_rx();
    let big = frame(5, 1400);
    rig.sock.send(&big);
    wait_for("the device to hold the big frame", || {
        rig.read(rig.rx.used + 4 + 8 * u64::from(QSIZE), 2) == [5, 0]
    });
    assert_eq!(rig.rx.used_idx(), 4);
    rig.post_rx(5, buf(5), 512);
    rig.post_rx(6, buf(6), 512);
    rig.kick_rx();
    rig.rx.wait_used(7);
    assert_eq!(num_buffers(&rig, buf(4)), 3);
    assert_eq!(rig.rx.used(6), (6, 1412 - 1024));
    let c = rig.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (5, 0));
    rig.assert_healthy();
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    let want = features::RING_EVENT_IDX;
    let Some(mut rig) = Rig::new(
        "event_idx_suppresses_interrupts_until_the_driver_asks",
        want,
    ) else {
        return;
    };
    // used_event = 1: interrupt once the second buffer is used, not the first.
    let used_event = rig.tx.avail + 4 + 2 * u64::from(QSIZE);
    rig.write(used_event, &1u16.to_le_bytes());
    rig.post_tx(0, TX_BUFS, &frame(1, 60));
    rig.kick_tx();
    rig.tx.wait_used(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.irq.queue_signals.load(Ordering::SeqCst), 0);
    rig.post_tx(1, TX_BUFS + 0x1000, &frame(2, 60));
    rig.kick_tx();
    rig.tx.wait_used(2);
    wait_for("the interrupt", || {
        rig.irq.queue_signals.load(Ordering::SeqCst) == 1
    });
    rig.assert_healthy();
}

#[test]
fn a_tx_burst_beyond_the_budget_all_goes_out() {
    let Some(mut rig) = Rig::new("a_tx_burst_beyond_the_budget_all_goes_out", 0) else {
        return;
    };
    let n = (BUDGET + BUDGET / 2) as u16;
    for i in 0..n {
        rig.post_tx(i, TX_BUFS + u64::from(i) * 0x800, &frame(1, 100));
    }
    rig.kick_tx();
    rig.tx.wait_used(n);
    let c = rig.counters();
    assert_eq!(c.tx_frames + c.tx_errors, u64::from(n));
    assert!(c.wakeups >= 2, "the burst was not split");
    rig.assert_healthy();
}

#[test]
fn a_frame_waiting_for_buffers_survives_a_pause() {
    let want = MRG | features::RING_EVENT_IDX;
    let Some(mut rig) = Rig::new("a_frame_waiting_for_buffers_survives_a_pause", want) else {
        return;
    };
    // Two frames and no buffers: the device holds the first and leaves the second in the tap.
    let frames: Vec<_> = (1..=2).map(|t| frame(t, 70 + usize::from(t))).collect();
    for f in &frames {
        rig.sock.send(f);
    }
    wait_for("the device to look at the tap", || {
        rig.counters().wakeups >= 1
    });
    std::thread::sleep(Duration::from_millis(100));
    // A snapshot's pause and the resume after it, in this process.
    let mut queues: Vec<virtio_queue::Queue> =
        rig.net.pause().into_iter().map(|(_, q)| q).collect();
    assert_eq!(queues.len(), 2);
    for q in &mut queues {
        virtio_queue::QueueT::set_event_idx(q, true);
    }
    rig.net
        .activate(ActivateContext {
            mem: rig.mem.clone(),
            interrupt: rig.irq.clone(),
            queues,
            queue_events: vec![
                rig.rx_kick.try_clone().unwrap(),
                rig.tx_kick.try_clone().unwrap(),
            ],
            features: (want & rig.net.features()) | features::VERSION_1,
            hooks: Default::default(),
        })
        .unwrap();
    let buf = |i: u16| RX_BUFS + u64::from(i) * 0x1000;
    for i in 0..2 {
        rig.post_rx(i, buf(i), 2048);
    }
    rig.kick_rx();
    rig.rx.wait_used(2);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(rig.read(buf(i as u16) + 12, f.len()), *f, "frame {i}");
    }
    assert_eq!(
        rig.counters().rx_dropped,
        0,
        "a frame was dropped by the pause"
    );
    rig.assert_healthy();
}
