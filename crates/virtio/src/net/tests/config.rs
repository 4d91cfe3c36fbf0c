//! Config space, features, tap offloads, and a throughput measurement.

use super::*;

#[test]
fn config_space_features_and_identity() {
    let test = "config_space_features_and_identity";
    let Some(tap) = tap_or_skip(test) else {
        return;
    };
    let name = tap.name().to_string();
    let probed = tap.probe_offloads().unwrap();
    let mac: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
    let mut net = Net::new(tap, mac).unwrap();
    assert_eq!(net.device_type(), types::NET);
    assert_eq!(net.name(), format!("net {name}"));
    assert_eq!(net.tap_name(), name);
    assert_eq!(net.mac(), mac);
    assert_eq!(net.queue_max_sizes(), vec![QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]);

    let f = net.features();
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b} not offered");
    }
    assert_ne!(f & features::RING_EVENT_IDX, 0);
    assert_ne!(f & features::RING_INDIRECT_DESC, 0);
    for b in [
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_eq!(f & bit(b), 0, "feature {b} offered");
    }
    assert_eq!(f & OFFLOAD_FEATURES, offload_features(probed));
    if probed.contains(Offloads::CSUM | Offloads::TSO4) {
        assert_ne!(f & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_HOST_TSO4), 0);
    } else {
        skip(test, &format!("(TSO part) the tap takes only {probed:?}"));
    }

    let mut c = [0xaau8; 10];
    net.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 1, 0, 1, 0]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    let mut past = [0xaau8; 4];
    net.read_config(8, &mut past);
    assert_eq!(past, [1, 0, 0, 0]);
    net.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    // The MAC is read-only.
    net.write_config(0, &[2; 6]);
    net.read_config(0, &mut c);
    assert_eq!(c[..6], mac.octets());

    // Activation refuses a missing queue.
    let mem = memory(MEM_SIZE);
    let err = net
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(TestInterrupt::default()),
            queues: vec![TestQueue::new(&mem, RX_RINGS, QSIZE).queue()],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            features: features::VERSION_1,
            hooks: Default::default(),
        })
        .err();
    assert!(
        matches!(err, Some(ActivateError::QueueNotReady(1))),
        "{err:?}"
    );
    net.reset();
}

#[test]
fn offloads_follow_the_tap_and_the_driver() {
    let all = Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6 | Offloads::TSO_ECN;
    assert_eq!(offload_features(Offloads::NONE), 0);
    assert_eq!(offload_features(Offloads::TSO4), 0, "TSO without CSUM");
    assert_eq!(
        offload_features(Offloads::CSUM),
        bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM)
    );
    assert_eq!(offload_features(all), OFFLOAD_FEATURES);
    assert_eq!(
        offload_features(Offloads::CSUM | Offloads::TSO_ECN),
        bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM),
        "ECN without TSO"
    );

    let g = |b: u32| bit(b);
    assert_eq!(tap_offloads_for(0, all), Offloads::NONE);
    // Segments without checksum offload make no sense (and the kernel refuses them).
    assert_eq!(
        tap_offloads_for(g(VIRTIO_NET_F_GUEST_TSO4), all),
        Offloads::NONE
    );
    assert_eq!(
        tap_offloads_for(g(VIRTIO_NET_F_GUEST_CSUM), all),
        Offloads::CSUM
    );
    let guest_all = g(VIRTIO_NET_F_GUEST_CSUM)
        | g(VIRTIO_NET_F_GUEST_TSO4)
        | g(VIRTIO_NET_F_GUEST_TSO6)
        | g(VIRTIO_NET_F_GUEST_ECN);
    assert_eq!(tap_offloads_for(guest_all, all), all);
    // Host-side (transmit) offloads do not change what the tap hands over.
    assert_eq!(
        tap_offloads_for(g(VIRTIO_NET_F_CSUM) | g(VIRTIO_NET_F_HOST_TSO4), all),
        Offloads::NONE
    );
    // ECN needs TSO, and only what the tap supports is asked for.
    assert_eq!(
        tap_offloads_for(g(VIRTIO_NET_F_GUEST_CSUM) | g(VIRTIO_NET_F_GUEST_ECN), all),
        Offloads::CSUM
    );
    assert_eq!(
        tap_offloads_for(guest_all, Offloads::CSUM | Offloads::TSO4),
        Offloads::CSUM | Offloads::TSO4
    );
}

/// Whether an ethtool "get" flag (`ETHTOOL_GTXCSUM`, `ETHTOOL_GTSO`) is on for `name`.
fn ethtool_flag(name: &str, cmd: u32) -> bool {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue { cmd, data: 0 };
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq (a name array and a union of plain data).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and, through ifru_data, reads and writes one
    // struct ethtool_value, which `value` is; both outlive the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    assert_eq!(r, 0, "SIOCETHTOOL {cmd:#x}: {}", io::Error::last_os_error());
    value.data != 0
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GTSO: u32 = 0x1e;

#[test]
fn activation_programs_the_tap_offloads_and_reset_clears_them() {
    fn serialisable<T: Serialize>() {}
    serialisable::<NetStats>();
    serialisable::<NetCounters>();
    let test = "activation_programs_the_tap_offloads_and_reset_clears_them";
    let offloads = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    let Some(mut rig) = Rig::new(test, offloads | MRG) else {
        return;
    };
    let name = rig.net.tap_name().to_string();
    assert_eq!(rig.counters(), NetCounters::default());
    if rig.net.features() & offloads == offloads {
        assert!(
            ethtool_flag(&name, ETHTOOL_GTXCSUM),
            "tap checksum offload off"
        );
        assert!(ethtool_flag(&name, ETHTOOL_GTSO), "tap TSO off");
    } else {
        skip(test, &"(offload part) the tap takes no TSO4");
    }
    rig.net.reset();
    assert!(!ethtool_flag(&name, ETHTOOL_GTXCSUM));
    assert!(!ethtool_flag(&name, ETHTOOL_GTSO));

    // A second activation on the same tap, this driver taking no offloads.
    let rx = TestQueue::new(&rig.mem, RX_RINGS, QSIZE);
    let tx = TestQueue::new(&rig.mem, TX_RINGS, QSIZE);
    rig.net
        .activate(ActivateContext {
            mem: rig.mem.clone(),
            interrupt: rig.irq.clone(),
            queues: vec![rx.queue(), tx.queue()],
            queue_events: vec![
                rig.rx_kick.try_clone().unwrap(),
                rig.tx_kick.try_clone().unwrap(),
            ],
            features: MRG | features::VERSION_1,
            hooks: Default::default(),
        })
        .unwrap();
    assert!(!ethtool_flag(&name, ETHTOOL_GTXCSUM));
    rig.rx = rx;
    rig.tx = tx;
    let f = frame(4, 200);
    rig.post_tx(0, TX_BUFS, &f);
    rig.kick_tx();
    rig.tx.wait_used(1);
    assert_eq!(rig.sock.recv_tagged(4), f);
    rig.post_rx(0, RX_BUFS, 4096);
    rig.kick_rx();
    let f = frame(5, 300);
    rig.sock.send(&f);
    rig.rx.wait_used(1);
    assert_eq!(rig.read(RX_BUFS + 12, 300), f);
    // Without GUEST_CSUM the header's flags are 0.
    assert_eq!(rig.read(RX_BUFS, 1), [0]);
    rig.assert_healthy();
}

/// Not a check: prints how many 1514-byte frames per second each direction moves, the
/// "driver" being this test thread recycling buffers as fast as it can.
/// `cargo test --release -p keel-virtio throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn throughput() {
    const LEN: usize = 1514;
    const SECS: f64 = 2.0;
    let Some(mut rig) = Rig::new("throughput", MRG | features::RING_EVENT_IDX) else {
        return;
    };
    // Transmit: keep the ring full.
    let f = frame(1, LEN);
    for i in 0..QSIZE {
        rig.post_tx(i, TX_BUFS + u64::from(i) * 0x800, &f);
    }
    rig.kick_tx();
    let (mut seen, mut sent) = (0u16, 0u64);
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < SECS {
        let used = rig.tx.used_idx();
        while seen != used {
            let (head, _) = rig.tx.used(seen);
            rig.tx.publish(head as u16);
            seen = seen.wrapping_add(1);
            sent += 1;
        }
        rig.kick_tx();
    }
    let secs = t.elapsed().as_secs_f64();
    let c = rig.counters();
    println!(
        "tx: {:.0} frames/s, {:.2} Gbit/s ({} refused by the tap)",
        sent as f64 / secs,
        sent as f64 * LEN as f64 * 8.0 / secs / 1e9,
        c.tx_errors
    );

    // Receive: a host thread floods the tap, the guest keeps every buffer posted.
    let buf = |i: u16| RX_BUFS + u64::from(i) * 0x800;
    for i in 0..QSIZE {
        rig.post_rx(i, buf(i), 2048);
    }
    rig.kick_rx();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        // SAFETY: dup(2) of an fd this test owns; the new fd is owned by the thread.
        let fd = unsafe { libc::dup(rig.sock.0.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd from dup that nothing else owns.
        let sock = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        let f = frame(2, LEN);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sock.send(&f);
            }
        })
    };
    let before = rig.counters().rx_frames;
    let mut seen = 0u16;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < SECS {
        let used = rig.rx.used_idx();
        while seen != used {
            let (head, _) = rig.rx.used(seen);
            rig.rx.publish(head as u16);
            seen = seen.wrapping_add(1);
        }
        rig.kick_rx();
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let got = rig.counters().rx_frames - before;
    println!(
        "rx: {:.0} frames/s, {:.2} Gbit/s",
        got as f64 / secs,
        got as f64 * LEN as f64 * 8.0 / secs / 1e9
    );
}
