//! The device driven the way a guest driver would, with real Unix sockets on the host side.

use super::*;
use crate::test_util::{memory, TestInterrupt, TestQueue, WRITE};
use crate::VirtioDevice;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

pub const CID: u64 = 3;
const QSIZE: u16 = 64;
const MEM: usize = 8 << 20;
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096;
pub const TX_BUF: u64 = 0x20_0000;

/// A directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("keel-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest driver: three queues on real guest memory and an activated device.
pub struct Guest {
    pub mem: crate::GuestMemory,
    pub rx: TestQueue,
    pub tx: TestQueue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    pub irq: Arc<TestInterrupt>,
    rx_seen: u16,
    tx_sent: u16,
    /// Credit this guest advertises in every header it sends.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub dev: Vsock,
    pub uds: std::path::PathBuf,
    _dir: TempDir,
}

impl Guest {
    pub fn new() -> Guest {
        Guest::with(|_| {}, |i| (RX_BUF + u64::from(i) * 4096, RX_BUF_LEN))
    }

    /// A guest whose device is tweaked by `dev` and whose rx descriptor `i` is `rx(i)`.
    pub fn with(dev: impl FnOnce(&mut Vsock), rx: impl Fn(u16) -> (u64, u32)) -> Guest {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let mut vsock = Vsock::new(CID, uds.clone()).unwrap();
        dev(&mut vsock);
        let mem = memory(MEM);
        let mut rxq = TestQueue::new(&mem, 0x1_0000, QSIZE);
        let txq = TestQueue::new(&mem, 0x2_0000, QSIZE);
        let evq = TestQueue::new(&mem, 0x3_0000, QSIZE);
        for i in 0..QSIZE {
            let (addr, len) = rx(i);
            rxq.desc(i, addr, len, WRITE, 0);
            rxq.publish(i);
        }
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Arc::new(TestInterrupt::default());
        let mut g = Guest {
            mem: mem.clone(),
            rx: rxq,
            tx: txq,
            rx_evt: evts[0].try_clone().unwrap(),
            tx_evt: evts[1].try_clone().unwrap(),
            irq: irq.clone(),
            rx_seen: 0,
            tx_sent: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
            dev: vsock,
            uds,
            _dir: dir,
        };
        let ctx = ActivateContext {
            mem,
            interrupt: irq,
            queues: vec![g.rx.queue(), g.tx.queue(), evq.queue()],
            queue_events: evts,
            features: 0,
            hooks: Default::default(),
        };
        g.dev.activate(ctx).unwrap();
        g
    }

    /// The next used rx buffer (head, bytes), if one arrives within `within`.
    fn next_used(&mut self, within: Duration) -> Option<(u16, u32)> {
        let t = Instant::now();
        while self.rx.used_idx() == self.rx_seen {
            if t.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (head, len) = self.rx.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        Some((head as u16, len))
    }

    /// The next packet the device put on rx, if one arrives within `within`. Buffers the
    /// device returned empty (unusable) are skipped and not reposted.
    pub fn try_recv(&mut self, within: Duration) -> Option<(Header, Vec<u8>)> {
        loop {
            let (head, len) = self.next_used(within)?;
            if len == 0 {
                continue;
            }
            let mut bytes = vec![0u8; len as usize];
            let addr = RX_BUF + u64::from(head) * 4096;
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let hdr = parse_header(&bytes).unwrap();
            assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN, "{hdr:?}");
            assert_eq!(hdr.addrs.src_cid, HOST_CID);
            assert_eq!(hdr.addrs.dst_cid, CID);
            if hdr.op == Op::Rw {
                self.fwd_cnt = self.fwd_cnt.wrapping_add(hdr.len);
            }
            self.rx.publish(head);
            self.rx_evt.write(1).unwrap();
            return Some((hdr, bytes[HDR_LEN..].to_vec()));
        }
    }

    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(Duration::from_secs(20))
            .expect("timed out waiting for an rx packet")
    }

    /// Asserts the device sends nothing for a while.
    pub fn expect_silence(&mut self) {
        if let Some(p) = self.try_recv(Duration::from_millis(200)) {
            panic!("unexpected packet {p:?}");
        }
    }

    /// Queues one tx chain made of `bufs` and waits until the device consumed it.
    pub fn send_raw(&mut self, bufs: &[(u64, u32, bool)]) {
        self.tx.chain(0, bufs);
        self.tx.publish(0);
        self.tx_evt.write(1).unwrap();
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.tx.wait_used(self.tx_sent);
    }

    /// Sends raw header bytes followed by `data`, in one buffer.
    pub fn send_bytes(&mut self, hdr: &[u8], data: &[u8]) {
        self.mem.write_slice(hdr, GuestAddress(TX_BUF)).unwrap();
        let at = TX_BUF + hdr.len() as u64;
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        self.send_raw(&[(TX_BUF, (hdr.len() + data.len()) as u32, false)]);
    }

    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        self.send_bytes(&hdr.to_bytes(), data);
    }

    /// A header from guest port `src` to host port `dst` with this guest's credit.
    pub fn hdr(&self, op: Op, src: u32, dst: u32) -> Header {
        Header {
            addrs: Addrs {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: src,
                dst_port: dst,
            },
            len: 0,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub fn send_op(&mut self, op: Op, src: u32, dst: u32, flags: u32) {
        let mut h = self.hdr(op, src, dst);
        h.flags = flags;
        self.send(h, &[]);
    }

    pub fn send_data(&mut self, src: u32, dst: u32, data: &[u8]) {
        let mut h = self.hdr(Op::Rw, src, dst);
        h.len = data.len() as u32;
        self.send(h, data);
    }

    pub fn host_client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host client connected through to guest port `port`, which the guest accepts.
    /// Returns the stream and the device's local port.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = self.host_client();
        writeln!(s, "CONNECT {port}").unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, Op::Request);
        assert_eq!(req.addrs.dst_port, port);
        let local = req.addrs.src_port;
        self.send_op(Op::Response, port, local, 0);
        assert_eq!(read_line(&mut s), format!("OK {local}"));
        (s, local)
    }

    pub fn assert_healthy(&self) {
        assert!(!self.irq.broken.load(Ordering::SeqCst), "device broken");
    }
}

pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Reads until EOF (with the stream's read timeout), asserting the stream closes.
pub fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("host stream should reach EOF");
    v
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn device_basics() {
    let dir = TempDir::new();
    let dev = Vsock::new(42, dir.0.join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), crate::types::VSOCK);
    assert_eq!(dev.name(), "vsock cid=42");
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(
        dev.features(),
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(bad, dir.0.join("x.sock")),
            Err(VsockError::InvalidCid(_))
        ));
    }
}

#[test]
fn socket_file_lifecycle() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    let dev = Vsock::new(3, path.clone()).unwrap();
    assert!(path.exists());
    assert!(matches!(
        Vsock::new(4, path.clone()),
        Err(VsockError::InUse(_))
    ));
    drop(dev);
    assert!(!path.exists(), "drop removes the socket file");

    // A socket file left behind by a dead listener is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(3, path.clone()).unwrap();
    UnixStream::connect(&path).unwrap();
    drop(dev);
    assert!(!path.exists());

    // Anything else is left alone.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        Vsock::new(3, path.clone()),
        Err(VsockError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[test]
fn host_initiated_connection() {
    let mut g = Guest::new();
    let mut s = g.host_client();
    // Bytes after the handshake line are stream data.
    s.write_all(b"CONNECT 5000\nearly").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, Op::Request);
    assert_eq!(req.addrs.dst_port, 5000);
    let local = req.addrs.src_port;
    assert!(local >= 1024);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    g.send_op(Op::Response, 5000, local, 0);
    assert_eq!(read_line(&mut s), format!("OK {local}"));

    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (Op::Rw, &b"early"[..]));
    assert_eq!((h.addrs.src_port, h.addrs.dst_port), (local, 5000));
    s.write_all(b"hello").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (Op::Rw, &b"hello"[..]));

    g.send_data(5000, local, b"world");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");

    // Host half-close: the guest hears "no more sends" and can still answer.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (Op::Shutdown, packet::SHUTDOWN_SEND));
    g.send_data(5000, local, b"reply");
    // The guest closes: the host reads the rest then EOF; the device resets the guest side.
    g.send_op(Op::Shutdown, 5000, local, packet::SHUTDOWN_BOTH);
    assert_eq!(read_to_eof(&mut s), b"reply");
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
    // A second connection gets another local port.
    let (_s2, local2) = g.host_connect(5000);
    assert_ne!(local2, local);
    g.assert_healthy();
}

#[test]
fn guest_refuses_host_connection() {
    let mut g = Guest::new();
    let mut s = g.host_client();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let (req, _) = g.recv();
    g.send_op(Op::Rst, 6000, req.addrs.src_port, 0);
    assert_eq!(read_to_eof(&mut s), b"", "no OK line, just EOF");
    g.expect_silence();
}

#[test]
fn bad_handshakes_close_the_client() {
    let mut g = Guest::new();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'1'; 40]] {
        let mut s = g.host_client();
        s.write_all(line).unwrap();
        assert_eq!(read_to_eof(&mut s), b"");
    }
    // A client that closes before its line is complete.
    let mut s = g.host_client();
    s.write_all(b"CONN").unwrap();
    drop(s);
    g.expect_silence();
    g.assert_healthy();
}

#[test]
fn unanswered_request_times_out() {
    let mut g = Guest::new();
    let mut s = g.host_client();
    s.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = g.recv();
    let t = Instant::now();
    assert_eq!(read_to_eof(&mut s), b"");
    assert!(t.elapsed() >= Duration::from_millis(1500));
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
    assert_eq!(h.addrs.src_port, req.addrs.src_port);
}

#[test]
fn guest_initiated_connection() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(unix::port_path(&g.uds, 52)).unwrap();
    g.send_op(Op::Request, 40000, 52, 0);
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Response);
    assert_eq!((h.addrs.src_port, h.addrs.dst_port), (52, 40000));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send_data(40000, 52, b"ping");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (Op::Rw, &b"pong"[..]));

    // Guest half-close: the host reads EOF and can still send.
    g.send_op(Op::Shutdown, 40000, 52, packet::SHUTDOWN_SEND);
    assert_eq!(read_to_eof(&mut s), b"");
    s.write_all(b"late").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (Op::Rw, &b"late"[..]));
    // The host closes: with both directions done, the guest gets RST.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
    g.assert_healthy();
}

#[test]
fn host_close_resets_guest() {
    let mut g = Guest::new();
    let (mut s, local) = g.host_connect(80);
    s.write_all(b"bye").unwrap();
    drop(s);
    let (h, data) = g.recv();
    assert_eq!((h.op, &data[..]), (Op::Rw, &b"bye"[..]));
    // The device may first relay the EOF it read before it saw the hang-up.
    let mut h = g.recv().0;
    if h.op == Op::Shutdown {
        h = g.recv().0;
    }
    assert_eq!(h.op, Op::Rst);
    // The connection is gone: more data from the guest is answered with RST.
    g.send_data(80, local, b"x");
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut g = Guest::new();
    g.send_op(Op::Request, 40001, 53, 0);
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Rst);
    assert_eq!((h.addrs.src_port, h.addrs.dst_port), (53, 40001));
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut g = Guest::new();
    g.buf_alloc = 1000;
    let (mut s, local) = g.host_connect(5001);
    let sent = pattern(5000);
    s.write_all(&sent).unwrap();
    let mut got = Vec::new();
    let mut credit_requests = 0;
    while got.len() < sent.len() {
        // Everything the guest's credit allows arrives, and nothing more.
        let target = (got.len() + 1000).min(sent.len());
        while got.len() < target {
            let (h, data) = g.recv();
            match h.op {
                Op::Rw => got.extend_from_slice(&data),
                Op::CreditRequest => credit_requests += 1,
                op => panic!("unexpected {op:?}"),
            }
        }
        assert_eq!(got.len(), target, "the device overran the guest's credit");
        while let Some((h, _)) = g.try_recv(Duration::from_millis(100)) {
            assert_eq!(h.op, Op::CreditRequest, "sent beyond the credit");
            credit_requests += 1;
        }
        g.send_op(Op::CreditUpdate, 5001, local, 0);
    }
    assert_eq!(got, sent);
    assert!(
        credit_requests >= 1,
        "the device asks for credit when it runs out"
    );
}

#[test]
fn guest_data_flows_with_credit_updates() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(unix::port_path(&g.uds, 9)).unwrap();
    let total = 1 << 20;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_to_eof(&mut s)
    });
    g.send_op(Op::Request, 1234, 9, 0);
    let (h, _) = g.recv();
    assert_eq!(h.op, Op::Response);
    let (mut peer_alloc, mut peer_fwd) = (h.buf_alloc, h.fwd_cnt);
    let data = pattern(total);
    let mut sent = 0usize;
    let mut updates = 0;
    while sent < total {
        let credit = peer_alloc as usize - (sent - peer_fwd as usize);
        if credit == 0 {
            let (h, _) = g.recv();
            assert_eq!(h.op, Op::CreditUpdate);
            updates += 1;
            (peer_alloc, peer_fwd) = (h.buf_alloc, h.fwd_cnt);
            continue;
        }
        let n = credit.min(32 * 1024).min(total - sent);
        g.send_data(1234, 9, &data[sent..sent + n]);
        sent += n;
    }
    g.send_op(Op::Shutdown, 1234, 9, packet::SHUTDOWN_BOTH);
    assert_eq!(reader.join().unwrap(), data);
    loop {
        let (h, _) = g.recv();
        if h.op == Op::Rst {
            break;
        }
        assert_eq!(h.op, Op::CreditUpdate);
    }
    assert!(updates >= 1);
    g.assert_healthy();
}

#[test]
fn connection_limit() {
    let mut g = Guest::with(
        |d| d.set_max_connections(2),
        |i| (RX_BUF + u64::from(i) * 4096, RX_BUF_LEN),
    );
    let _l = UnixListener::bind(unix::port_path(&g.uds, 1)).unwrap();
    for port in [100, 101] {
        g.send_op(Op::Request, port, 1, 0);
        assert_eq!(g.recv().0.op, Op::Response);
    }
    g.send_op(Op::Request, 102, 1, 0);
    assert_eq!(g.recv().0.op, Op::Rst);
    // Host clients beyond the limit are closed at once.
    let mut s = g.host_client();
    assert_eq!(read_to_eof(&mut s), b"");
    // A freed slot can be used again.
    g.send_op(Op::Rst, 100, 1, 0);
    g.send_op(Op::Request, 103, 1, 0);
    assert_eq!(g.recv().0.op, Op::Response);
}

#[test]
fn reset_closes_host_streams() {
    let mut g = Guest::new();
    let (mut s, _) = g.host_connect(5);
    g.dev.reset();
    assert_eq!(read_to_eof(&mut s), b"");
    assert!(
        g.uds.exists(),
        "the listening socket outlives a driver reset"
    );
}
