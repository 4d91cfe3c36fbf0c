//! A hostile guest: malformed, misaddressed and out-of-protocol packets, and buffers
//! outside its RAM. Each must be dropped or answered with RST, and the device must keep
//! serving.

use super::tests::{read_to_eof, Guest, CID, TX_BUF};
use super::*;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::time::Duration;
use vm_memory::Bytes;

/// The device still answers a well-formed request afterwards.
fn still_serves(g: &mut Guest) {
    g.send_op(Op::Request, 999, 31337, 0); // nobody listens on _31337
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
    assert_eq!(h.addrs.dst_port, 999);
    g.assert_healthy();
}

#[test]
fn garbage_headers() {
    let mut g = Guest::new();
    // Too short for a header, in one or several descriptors.
    g.send_bytes(&[0xab; 10], &[]);
    g.send_raw(&[(TX_BUF, 20, false), (TX_BUF + 100, 20, false)]);
    // A chain with only device-writable buffers has no header at all.
    g.send_raw(&[(TX_BUF, 64, true)]);
    g.expect_silence();

    // Unsupported type and unknown operations are reset.
    let mut raw = g.hdr(Op::Request, 10, 20).to_bytes();
    raw[28] = 2; // SEQPACKET
    g.send_bytes(&raw, &[]);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.addrs.src_port, h.addrs.dst_port),
        (Op::Rst, 20, 10)
    );
    for op in [0u16, 8, 0xffff] {
        let mut raw = g.hdr(Op::Request, 10, 20).to_bytes();
        raw[30..32].copy_from_slice(&op.to_le_bytes());
        g.send_bytes(&raw, &[]);
        assert_eq!(g.recv().0.op, Op::Rst);
    }
    // Pseudo-random bytes: whatever happens, nothing breaks.
    let mut x = 0x1234_5678u32;
    for _ in 0..200 {
        let bytes: Vec<u8> = (0..60)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        g.send_bytes(&bytes, &[]);
    }
    while g.try_recv(Duration::from_millis(100)).is_some() {}
    still_serves(&mut g);
}

#[test]
fn misaddressed_packets_are_dropped() {
    let mut g = Guest::new();
    let _l = UnixListener::bind(unix::port_path(&g.uds, 1)).unwrap();
    let mut spoofed = g.hdr(Op::Request, 10, 1);
    spoofed.addrs.src_cid = CID + 1; // not the guest's CID
    g.send(spoofed, &[]);
    let mut host_src = g.hdr(Op::Request, 10, 1);
    host_src.addrs.src_cid = HOST_CID;
    g.send(host_src, &[]);
    let mut elsewhere = g.hdr(Op::Request, 10, 1);
    elsewhere.addrs.dst_cid = 7; // not the host
    g.send(elsewhere, &[]);
    let mut wide = g.hdr(Op::Request, 10, 1);
    wide.addrs.src_cid |= 1 << 40;
    g.send(wide, &[]);
    g.expect_silence();
    still_serves(&mut g);
}

#[test]
fn packets_for_unknown_connections() {
    let mut g = Guest::new();
    g.send_data(10, 20, b"data");
    assert_eq!(g.recv().0.op, Op::Rst);
    for op in [
        Op::Response,
        Op::Shutdown,
        Op::CreditUpdate,
        Op::CreditRequest,
    ] {
        g.send_op(op, 10, 20, 0);
        assert_eq!(g.recv().0.op, Op::Rst, "{op:?}");
    }
    // Never answer an RST with an RST.
    g.send_op(Op::Rst, 10, 20, 0);
    g.expect_silence();
    still_serves(&mut g);
}

#[test]
fn bad_lengths_reset_the_connection() {
    let mut g = Guest::new();
    // `len` claims more than the buffers hold.
    let (mut s, local) = g.host_connect(70);
    let mut h = g.hdr(Op::Rw, 70, local);
    h.len = 100;
    g.send(h, &[7; 50]);
    assert_eq!(g.recv().0.op, Op::Rst);
    assert_eq!(read_to_eof(&mut s), b"", "the host stream closes, no data");

    // `len` beyond anything the device would accept, with buffers that hold it.
    let (mut s, local) = g.host_connect(71);
    let mut h = g.hdr(Op::Rw, 71, local);
    h.len = BUF_ALLOC + 1;
    g.send(h, &vec![1; BUF_ALLOC as usize + 1]);
    assert_eq!(g.recv().0.op, Op::Rst);
    assert_eq!(read_to_eof(&mut s), b"");

    // Header and payload in separate descriptors are fine.
    let (mut s, local) = g.host_connect(72);
    let mut h = g.hdr(Op::Rw, 72, local);
    h.len = 3;
    g.mem
        .write_slice(&h.to_bytes(), vm_memory::GuestAddress(TX_BUF))
        .unwrap();
    g.mem
        .write_slice(b"abc", vm_memory::GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    g.send_raw(&[(TX_BUF, HDR_LEN as u32, false), (TX_BUF + 0x1000, 3, false)]);
    let mut buf = [0u8; 3];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    g.assert_healthy();
}

#[test]
fn out_of_protocol_ops_reset() {
    let mut g = Guest::new();
    // A second REQUEST on an established connection.
    let (mut s, local) = g.host_connect(60);
    g.send_op(Op::Request, 60, local, 0);
    assert_eq!(g.recv().0.op, Op::Rst);
    assert_eq!(read_to_eof(&mut s), b"");
    // Data before answering the device's REQUEST.
    let mut s = g.host_client();
    s.write_all(b"CONNECT 61\n").unwrap();
    let local = g.recv().0.addrs.src_port;
    g.send_data(61, local, b"early");
    assert_eq!(g.recv().0.op, Op::Rst);
    assert_eq!(read_to_eof(&mut s), b"");
    // Data after the guest's own SHUTDOWN(SEND).
    let (mut s, local) = g.host_connect(62);
    g.send_op(Op::Shutdown, 62, local, packet::SHUTDOWN_SEND);
    g.send_data(62, local, b"more");
    assert_eq!(g.recv().0.op, Op::Rst);
    assert_eq!(read_to_eof(&mut s), b"");
    g.assert_healthy();
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(90);
    // The host does not read; the guest ignores the device's credit.
    let chunk = vec![0x5a; 64 * 1024];
    let mut reset = false;
    for _ in 0..16 {
        g.send_data(90, local, &chunk);
        while let Some((h, _)) = g.try_recv(Duration::from_millis(20)) {
            match h.op {
                Op::Rst => reset = true,
                Op::CreditUpdate => {}
                op => panic!("unexpected {op:?}"),
            }
        }
        if reset {
            break;
        }
    }
    assert!(
        reset,
        "the device must reset a guest that overruns its credit"
    );
    // The host gets what was accepted, then EOF; never more than the credit allowed
    // beyond what the socket took.
    let got = read_to_eof(&mut s);
    assert!(got.iter().all(|&b| b == 0x5a));
    g.assert_healthy();
}

#[test]
fn buffers_outside_guest_ram() {
    // rx descriptor 0 lies outside guest RAM, descriptor 1 is too small for a header.
    let mut g = Guest::with(
        |_| {},
        |i| match i {
            0 => (0x1_0000_0000, 4096),
            1 => (0x10_0000 + 4096, 20),
            _ => (0x10_0000 + u64::from(i) * 4096, 4096),
        },
    );
    // A tx chain outside RAM is consumed and dropped.
    g.send_raw(&[(0x1_0000_0000, 64, false)]);
    g.send_raw(&[(TX_BUF, 44, false), (u64::MAX - 10, 64, false)]);
    // A chain straddling the end of RAM.
    g.send_raw(&[((8 << 20) - 20, 64, false)]);
    g.expect_silence();
    // The unusable rx buffers are returned empty; the reply lands in the next one.
    still_serves(&mut g);
    assert_eq!(g.rx.used(0).1, 0);
    assert_eq!(g.rx.used(1).1, 0);
}
