//! The device thread: one epoll loop over the queue notifications, the listening socket
//! and every host stream (registered edge-triggered, added and dropped as connections come
//! and go), with deadlines as the wait timeout. Nothing here spins: a host socket is read
//! only when the guest has credit and an rx buffer for the data, and written only while
//! it takes data.

use super::connection::{ConnKey, Connection, Verdict, BUF_ALLOC};
use super::packet::{parse_header, rst_reply, Header, HeaderError, Op, HDR_LEN, HOST_CID};
use super::unix::{self, Handshake};
use crate::device::process_queue;
use crate::{DeviceError, GuestMemory, VirtioInterrupt};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub const RX: u16 = 0;
pub const TX: u16 = 1;
pub const EVENT: u16 = 2;

const KILL_TOKEN: u64 = 0;
const RX_TOKEN: u64 = 1;
const TX_TOKEN: u64 = 2;
const EVENT_TOKEN: u64 = 3;
const LISTENER_TOKEN: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// A host client has this long to send its `CONNECT <port>\n` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to stop accepting after accept(2) fails (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Resets waiting for an rx buffer; more are dropped (the guest times out instead).
const MAX_QUEUED_RSTS: usize = 4096;
/// Host-initiated connections get local ports from here up, clear of the low ports
/// guests usually connect to.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host client that has not finished its handshake.
struct HostClient {
    stream: UnixStream,
    buf: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub max_connections: usize,
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub rxq: Queue,
    pub txq: Queue,
    /// Carries VIRTIO_VSOCK_EVENT_TRANSPORT_RESET after a restore from a snapshot.
    pub evq: Option<Queue>,
    /// A transport reset is owed to the driver (restored: its connections are gone).
    pub reset_pending: bool,
    pub listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    clients: HashMap<u64, HostClient>,
    rx_pending: VecDeque<ConnKey>,
    rsts: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
    accept_paused_until: Option<Instant>,
}

/// The eventfds the device thread waits on; `kill` must be blocking.
pub struct Events {
    pub kill: EventFd,
    pub rx: EventFd,
    pub tx: EventFd,
    pub event: Option<EventFd>,
}

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        max_connections: usize,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        rxq: Queue,
        txq: Queue,
        evq: Option<Queue>,
        listener: UnixListener,
    ) -> io::Result<Muxer> {
        Ok(Muxer {
            guest_cid,
            uds_path,
            max_connections,
            mem,
            interrupt,
            rxq,
            txq,
            evq,
            reset_pending: false,
            listener,
            epoll: Epoll::new()?,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            clients: HashMap::new(),
            rx_pending: VecDeque::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_port: FIRST_LOCAL_PORT,
            accept_paused_until: None,
        })
    }

    fn add(&self, fd: i32, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Runs until `events.kill` is signalled. Returns itself (connections and all) when
    /// `pausing` was set before the kill, so the device can carry on later.
    pub fn run(mut self, events: Events, pausing: &AtomicBool) -> Option<Muxer> {
        let mut sources = vec![
            (events.kill.as_raw_fd(), KILL_TOKEN),
            (events.rx.as_raw_fd(), RX_TOKEN),
            (events.tx.as_raw_fd(), TX_TOKEN),
            (self.listener.as_raw_fd(), LISTENER_TOKEN),
        ];
        if let Some(e) = &events.event {
            sources.push((e.as_raw_fd(), EVENT_TOKEN));
        }
        for (fd, token) in sources {
            if let Err(e) = self.add(fd, EventSet::IN, token) {
                return self.broken(&events.kill, &format!("epoll: {e}"));
            }
        }
        if let Err(e) = self.send_transport_reset() {
            return self.broken(&events.kill, &e.to_string());
        }
        // Buffers and packets may have been queued before activation.
        if let Err(e) = self.process_tx() {
            return self.broken(&events.kill, &e.to_string());
        }
        let mut ready = vec![EpollEvent::default(); 64];
        loop {
            let timeout = self.timeout_ms(Instant::now());
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.broken(&events.kill, &format!("epoll: {e}")),
            };
            let mut result = Ok(());
            for ev in ready.iter().take(n) {
                match ev.data() {
                    KILL_TOKEN => return self.stopped(&events, pausing),
                    RX_TOKEN => {
                        // New rx buffers: handled by the flush below.
                        let _ = events.rx.read();
                    }
                    TX_TOKEN => {
                        let _ = events.tx.read();
                        if result.is_ok() {
                            result = self.process_tx();
                        }
                    }
                    EVENT_TOKEN => {
                        if let Some(e) = &events.event {
                            let _ = e.read();
                        }
                        if result.is_ok() {
                            result = self.send_transport_reset();
                        }
                    }
                    LISTENER_TOKEN => self.accept_clients(),
                    token => self.stream_event(token, ev.event_set()),
                }
            }
            self.expire(Instant::now());
            if let Err(e) = result.and_then(|()| self.process_rx()) {
                return self.broken(&events.kill, &e.to_string());
            }
        }
    }

    /// Killed: on a pause, forget this activation's eventfds (the next brings its own) and
    /// hand the muxer back; otherwise end here, closing the host streams.
    fn stopped(self, events: &Events, pausing: &AtomicBool) -> Option<Muxer> {
        if !pausing.load(Ordering::SeqCst) {
            return None;
        }
        let fds = [Some(&events.kill), Some(&events.rx), Some(&events.tx)];
        for e in fds.into_iter().chain([events.event.as_ref()]).flatten() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                e.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(self)
    }

    /// Tells the driver its transport was reset (virtio 1.2 §5.10.6.7), if that is owed and
    /// it posted an event buffer; otherwise waits for one.
    fn send_transport_reset(&mut self) -> Result<(), DeviceError> {
        let Some(mut evq) = self.evq.take().filter(|_| self.reset_pending) else {
            return Ok(());
        };
        let mem = self.mem.clone();
        let mut sent = false;
        let r = process_queue(&mut evq, EVENT, &mem, &*self.interrupt, |chain| {
            if sent {
                return None;
            }
            sent = true;
            let Ok(mut w) = chain.writer(&mem) else {
                return Some(0);
            };
            let id = super::packet::EVENT_TRANSPORT_RESET.to_le_bytes();
            Some(if w.write_all(&id).is_ok() { 4 } else { 0 })
        });
        self.evq = Some(evq);
        if sent {
            self.reset_pending = false;
            tracing::debug!("vsock: transport reset sent to the driver");
        }
        r
    }

    /// A malformed ring: drop every connection and wait to be stopped (`kill` blocks).
    pub(crate) fn broken(mut self, kill: &EventFd, why: &str) -> Option<Muxer> {
        keel_pci::guest_warn!("vsock: {why}; the device stops until the driver resets it");
        self.interrupt.device_broken(why);
        self.conns.clear();
        self.clients.clear();
        loop {
            match kill.read() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return None,
            }
        }
    }

    fn timeout_ms(&self, now: Instant) -> i32 {
        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.clients.values().map(|c| c.deadline))
            .chain(self.accept_paused_until)
            .min();
        match next {
            None => -1,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis() + 1;
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        self.clients.retain(|_, c| c.deadline > now);
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.expired(now))
            .map(|c| c.key)
            .collect();
        for key in late {
            tracing::debug!("vsock {key:?}: timed out");
            self.finish(key, Verdict::Reset);
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            let fd = self.listener.as_raw_fd();
            if let Err(e) = self.add(fd, EventSet::IN, LISTENER_TOKEN) {
                tracing::warn!("vsock: cannot watch the listening socket again: {e}");
            }
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.clients.len() >= self.max_connections {
                        tracing::debug!("vsock: connection limit reached; closing host client");
                        continue;
                    }
                    let token = self.new_token();
                    let registered = stream.set_nonblocking(true).and_then(|()| {
                        let ev = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
                        self.add(stream.as_raw_fd(), ev, token)
                    });
                    if let Err(e) = registered {
                        tracing::warn!("vsock: cannot watch a host client: {e}");
                        continue;
                    }
                    let client = HostClient {
                        stream,
                        buf: Vec::new(),
                        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                    };
                    self.clients.insert(token, client);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Level-triggered: stop watching for a while rather than spin.
                    tracing::warn!("vsock: accept failed: {e}");
                    let fd = self.listener.as_raw_fd();
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn stream_event(&mut self, token: u64, events: EventSet) {
        if self.clients.contains_key(&token) {
            return self.client_readable(token);
        }
        let Some(&key) = self.tokens.get(&token) else {
            return; // already gone
        };
        if let Some(c) = self.conns.get_mut(&key) {
            let v = c.host_event(events);
            self.apply(key, v);
        }
    }

    /// Reads a host client's handshake line as far as it has arrived.
    fn client_readable(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut chunk = [0u8; 64];
        let port = loop {
            match (&client.stream).read(&mut chunk) {
                Ok(0) => break None,
                Ok(n) => {
                    client.buf.extend_from_slice(&chunk[..n]);
                    match unix::parse_handshake(&client.buf) {
                        Handshake::Incomplete => {}
                        Handshake::Invalid => break None,
                        Handshake::Connect { port, rest } => break Some((port, rest)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(client) = self.clients.remove(&token) else {
            return;
        };
        let Some((port, rest)) = port else {
            tracing::debug!("vsock: host client sent no valid CONNECT line");
            return;
        };
        let local_port = self.alloc_port();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::host_initiated(
            key,
            token,
            self.guest_cid,
            client.stream,
            rest,
            Instant::now(),
        );
        // The stream stays registered under the same token.
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream().as_raw_fd(),
            EpollEvent::new(stream_events(), token),
        ) {
            tracing::warn!("vsock: cannot watch a host connection: {e}");
            return;
        }
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.enqueue(key);
    }

    /// A local port no live connection uses.
    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = match p.checked_add(1) {
                Some(n) if n != u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    fn enqueue(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rx_pending.push_back(key);
            }
        }
    }

    fn queue_rst(&mut self, rst: Header) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(rst);
        } else {
            tracing::debug!("vsock: too many resets waiting for rx buffers; dropping one");
        }
    }

    fn apply(&mut self, key: ConnKey, v: Verdict) {
        match v {
            Verdict::Keep => self.enqueue(key),
            _ => self.finish(key, v),
        }
    }

    /// Forgets a connection (closing its host stream), with an RST to the guest if asked.
    fn finish(&mut self, key: ConnKey, v: Verdict) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if v == Verdict::Reset {
                self.queue_rst(c.header(Op::Rst, 0, 0));
            }
        }
    }

    /// Serves every packet the guest queued on tx. Only a malformed ring is an error.
    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let mut txq = std::mem::take(&mut self.txq);
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        let r = process_queue(&mut txq, TX, &mem, &*interrupt, |chain| {
            // Buffers outside guest RAM: the request is dropped.
            if let Ok(mut reader) = chain.reader(&mem) {
                self.guest_packet(&mut reader);
            }
            Some(0)
        });
        self.txq = txq;
        r
    }

    fn addressed_to_us(&self, src_cid: u64, dst_cid: u64) -> bool {
        src_cid == self.guest_cid && dst_cid == HOST_CID
    }

    fn guest_packet(&mut self, r: &mut crate::Reader<'_>) {
        let mut raw = [0u8; HDR_LEN];
        if r.read_exact(&mut raw).is_err() {
            return; // shorter than a header
        }
        let hdr = match parse_header(&raw) {
            Ok(h) => h,
            Err(HeaderError::Type { addrs, .. } | HeaderError::Op { addrs, .. }) => {
                if self.addressed_to_us(addrs.src_cid, addrs.dst_cid) {
                    self.queue_rst(rst_reply(&addrs));
                }
                return;
            }
            Err(HeaderError::Short(_)) => return,
        };
        let a = hdr.addrs;
        if !self.addressed_to_us(a.src_cid, a.dst_cid) {
            tracing::debug!(
                "vsock: dropping a packet from {} to {}",
                a.src_cid,
                a.dst_cid
            );
            return;
        }
        let key = ConnKey {
            local_port: a.dst_port,
            peer_port: a.src_port,
        };
        let mut payload = Vec::new();
        if hdr.op == Op::Rw {
            let len = hdr.len as usize;
            let fits = len <= r.available_bytes() && len <= BUF_ALLOC as usize;
            payload.resize(if fits { len } else { 0 }, 0);
            if !fits || r.read_exact(&mut payload).is_err() {
                tracing::debug!("vsock {key:?}: RW length {len} does not match its buffers");
                if self.conns.contains_key(&key) {
                    self.finish(key, Verdict::Reset);
                } else {
                    self.queue_rst(rst_reply(&a));
                }
                return;
            }
        }
        let now = Instant::now();
        match self.conns.get_mut(&key) {
            Some(c) => {
                let v = c.guest_packet(&hdr, &payload, now);
                self.apply(key, v);
            }
            None => match hdr.op {
                Op::Request => self.guest_connect(&hdr, key),
                Op::Rst => {}
                _ => self.queue_rst(rst_reply(&a)),
            },
        }
    }

    /// The guest connects to host port `key.local_port`: `<uds_path>_<port>`.
    fn guest_connect(&mut self, req: &Header, key: ConnKey) {
        if self.conns.len() >= self.max_connections {
            tracing::debug!("vsock: connection limit reached; refusing the guest");
            return self.queue_rst(rst_reply(&req.addrs));
        }
        let path = unix::port_path(&self.uds_path, key.local_port);
        let stream = match unix::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {}: {e}", path.display());
                return self.queue_rst(rst_reply(&req.addrs));
            }
        };
        let token = self.new_token();
        if let Err(e) = self.add(stream.as_raw_fd(), stream_events(), token) {
            tracing::warn!("vsock: cannot watch a host connection: {e}");
            return self.queue_rst(rst_reply(&req.addrs));
        }
        let conn = Connection::guest_initiated(key, token, self.guest_cid, stream, req);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.enqueue(key);
    }

    /// Fills rx buffers with queued resets and connections' packets, round-robin.
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        if self.rsts.is_empty() && self.rx_pending.is_empty() {
            return Ok(());
        }
        let mut rxq = std::mem::take(&mut self.rxq);
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        let r = process_queue(&mut rxq, RX, &mem, &*interrupt, |chain| {
            let Ok(mut w) = chain.writer(&mem) else {
                return Some(0); // outside guest RAM: nothing written
            };
            if w.available_bytes() < HDR_LEN {
                return Some(0); // too small for any packet
            }
            self.next_rx_packet(&mut w)
        });
        self.rxq = rxq;
        r
    }

    /// Writes the next packet into `w`; `None` when no packet can be sent now.
    fn next_rx_packet(&mut self, w: &mut crate::Writer<'_>) -> Option<u32> {
        loop {
            if let Some(rst) = self.rsts.pop_front() {
                let bytes = rst.to_bytes();
                return Some(match w.write_all(&bytes) {
                    Ok(()) => HDR_LEN as u32,
                    Err(_) => w.bytes_written() as u32,
                });
            }
            let key = self.rx_pending.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let (written, v) = c.fill_rx(w);
            self.apply(key, v);
            if written.is_some() {
                return written;
            }
        }
    }
}
