//! One guest ↔ host stream: its state machine, credit accounting both ways, and the
//! bounded buffer of guest data the host has not taken yet.
//!
//! Host → guest data is never buffered here: it is read from the host socket straight into
//! an rx packet, and only when the guest has both credit and an rx buffer for it. Guest →
//! host data is written to the host socket at once; what the socket does not take waits in
//! `to_host`, which the guest's credit (our `buf_alloc`) keeps under [`BUF_ALLOC`] bytes.

use super::packet::{
    Addrs, Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};
use super::unix;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

/// Receive buffer advertised to the guest for each connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// A credit update goes to the guest once the space it believes free drops below this.
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// Largest payload of one packet to the guest.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection both sides shut down may take to hand its last bytes to the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection's identity: our (host-side) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: waiting for the guest's RESPONSE (or RST).
    AwaitingResponse,
    Established,
}

/// What the device must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    Keep,
    /// Forget it silently (the guest already knows: it sent RST).
    Close,
    /// Forget it and send the guest an RST.
    Reset,
}

pub struct Connection {
    pub key: ConnKey,
    pub token: u64,
    guest_cid: u64,
    stream: UnixStream,
    state: State,
    /// In the device's list of connections with packets for the rx queue.
    pub queued: bool,
    pub deadline: Option<Instant>,

    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_credit_request: bool,
    credit_requested: bool,
    /// SHUTDOWN flags to tell the guest, and those already told.
    shutdown_pending: u32,
    shutdown_sent: u32,

    // Host → guest.
    /// Bytes the host client sent right after its handshake line.
    prefix: Vec<u8>,
    readable: bool,
    host_eof: bool,
    /// The host closed its end entirely (EPOLLHUP): once its data is read, it is gone.
    host_hup: bool,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    guest_rcv_shut: bool,

    // Guest → host.
    /// `OK <port>\n`, still to be written to a host client.
    greeting: Vec<u8>,
    to_host: VecDeque<u8>,
    writable: bool,
    host_wr_closed: bool,
    host_wr_shut: bool,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    guest_send_shut: bool,
}

impl Connection {
    fn new(key: ConnKey, token: u64, guest_cid: u64, stream: UnixStream, state: State) -> Self {
        Connection {
            key,
            token,
            guest_cid,
            stream,
            state,
            queued: false,
            deadline: None,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_credit_request: false,
            credit_requested: false,
            shutdown_pending: 0,
            shutdown_sent: 0,
            prefix: Vec::new(),
            // Edge-triggered epoll: assume the socket may be ready until it says otherwise.
            readable: true,
            host_eof: false,
            host_hup: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_rcv_shut: false,
            greeting: Vec::new(),
            to_host: VecDeque::new(),
            writable: true,
            host_wr_closed: false,
            host_wr_shut: false,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_send_shut: false,
        }
    }

    /// A host client asked (`CONNECT <port>`) for the guest's port `key.peer_port`; `prefix`
    /// is what it sent after the handshake line.
    pub fn host_initiated(
        key: ConnKey,
        token: u64,
        guest_cid: u64,
        stream: UnixStream,
        prefix: Vec<u8>,
        now: Instant,
    ) -> Self {
        let mut c = Connection::new(key, token, guest_cid, stream, State::AwaitingResponse);
        c.prefix = prefix;
        c.send_request = true;
        c.deadline = Some(now + REQUEST_TIMEOUT);
        c
    }

    /// The guest's REQUEST `req` reached a host listener through `stream`.
    pub fn guest_initiated(
        key: ConnKey,
        token: u64,
        guest_cid: u64,
        stream: UnixStream,
        req: &Header,
    ) -> Self {
        let mut c = Connection::new(key, token, guest_cid, stream, State::Established);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c.send_response = true;
        c
    }

    /// A header from us to the guest on this connection, with our credit.
    pub fn header(&self, op: Op, len: u32, flags: u32) -> Header {
        Header {
            addrs: Addrs {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: self.key.local_port,
                dst_port: self.key.peer_port,
            },
            len,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// How many more bytes the guest can take.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_to_read_host(&self) -> bool {
        self.state == State::Established
            && !self.guest_rcv_shut
            && (!self.prefix.is_empty() || (self.readable && !self.host_eof))
    }

    /// Whether this connection has a packet for the guest right now.
    pub fn has_rx_work(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || self.send_credit_request
            || self.shutdown_pending & !self.shutdown_sent != 0
            || (self.wants_to_read_host() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Both directions are finished: the connection can go (with an RST to the guest).
    fn done(&self) -> bool {
        let host_to_guest_done = self.host_eof || self.guest_rcv_shut;
        let guest_to_host_done = self.host_wr_closed
            || (self.guest_send_shut && self.to_host.is_empty() && self.greeting.is_empty());
        self.state == State::Established && host_to_guest_done && guest_to_host_done
    }

    fn verdict(&self) -> Verdict {
        if self.done() {
            Verdict::Reset
        } else {
            Verdict::Keep
        }
    }

    /// A packet from the guest for this connection; `payload` is the RW data, already
    /// checked to be `hdr.len` bytes.
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8], now: Instant) -> Verdict {
        // Every packet carries the guest's view of its receive buffer.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (_, Op::Rst) => Verdict::Close,
            (State::AwaitingResponse, Op::Response) => {
                self.state = State::Established;
                self.deadline = None;
                self.greeting = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush_to_host()
            }
            (State::AwaitingResponse, _) => Verdict::Reset,
            (State::Established, Op::Rw) => self.guest_data(payload),
            (State::Established, Op::CreditUpdate) => Verdict::Keep,
            (State::Established, Op::CreditRequest) => {
                self.send_credit_update = true;
                Verdict::Keep
            }
            (State::Established, Op::Shutdown) => self.guest_shutdown(hdr.flags, now),
            (State::Established, Op::Request | Op::Response) => Verdict::Reset,
        }
    }

    fn guest_data(&mut self, payload: &[u8]) -> Verdict {
        if self.guest_send_shut {
            // Data after the guest said it would send no more.
            return Verdict::Reset;
        }
        if self.to_host.len() + payload.len() > BUF_ALLOC as usize {
            tracing::debug!("vsock {:?}: guest overran its credit", self.key);
            return Verdict::Reset;
        }
        let n = payload.len() as u32; // at most BUF_ALLOC
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        if self.host_wr_closed {
            // The host cannot take it; count it as delivered so credit keeps flowing.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        } else {
            self.to_host.extend(payload);
        }
        self.flush_to_host()
    }

    fn guest_shutdown(&mut self, flags: u32, now: Instant) -> Verdict {
        if flags & SHUTDOWN_RCV != 0 && !self.guest_rcv_shut {
            self.guest_rcv_shut = true;
            self.prefix.clear();
            // The host's further writes fail with EPIPE.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_send_shut = true;
        }
        if self.guest_rcv_shut && self.guest_send_shut && self.deadline.is_none() {
            self.deadline = Some(now + CLOSE_TIMEOUT);
        }
        self.flush_to_host()
    }

    /// The host socket reported `events` (edge-triggered).
    pub fn host_event(&mut self, events: EventSet) -> Verdict {
        let gone = EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(gone) {
            self.host_hup = true;
            if self.state == State::AwaitingResponse {
                // The host client gave up before the guest answered.
                return if self.send_request {
                    Verdict::Close
                } else {
                    Verdict::Reset
                };
            }
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | gone) {
            self.readable = true;
        }
        if events.intersects(EventSet::OUT | gone) {
            self.writable = true;
        }
        if self.host_hup && self.host_eof && !self.host_wr_closed {
            // EOF was read before the hang-up was reported.
            self.host_write_failed();
        }
        self.flush_to_host()
    }

    /// Writes the greeting and buffered guest data to the host while it takes them.
    fn flush_to_host(&mut self) -> Verdict {
        while self.writable && !self.host_wr_closed {
            let (buf, greeting) = if !self.greeting.is_empty() {
                (&self.greeting[..], true)
            } else {
                let (front, _) = self.to_host.as_slices();
                (front, false)
            };
            if buf.is_empty() {
                break;
            }
            match unix::send(&self.stream, buf) {
                Ok(n) if greeting => {
                    self.greeting.drain(..n);
                }
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.host_write_failed(),
            }
        }
        if self.guest_send_shut
            && !self.host_wr_shut
            && self.to_host.is_empty()
            && self.greeting.is_empty()
        {
            self.host_wr_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let believed_in_flight = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if self.fwd_cnt != self.last_fwd_cnt_sent
            && BUF_ALLOC.saturating_sub(believed_in_flight) < CREDIT_UPDATE_THRESHOLD
        {
            self.send_credit_update = true;
        }
        self.verdict()
    }

    /// The host will take no more data: drop what waits and tell the guest.
    fn host_write_failed(&mut self) {
        self.host_wr_closed = true;
        let dropped = self.to_host.len() as u32;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(dropped);
        self.to_host.clear();
        self.greeting.clear();
        self.shutdown_pending |= SHUTDOWN_RCV;
    }

    /// Writes this connection's next packet for the guest into `w`, if it has one.
    /// Returns the bytes written (`None`: nothing to send) and what to do with the
    /// connection afterwards.
    pub fn fill_rx(&mut self, w: &mut crate::Writer<'_>) -> (Option<u32>, Verdict) {
        if w.available_bytes() < HDR_LEN {
            return (None, Verdict::Keep);
        }
        let (hdr, data) = if self.send_request {
            self.send_request = false;
            (self.header(Op::Request, 0, 0), Vec::new())
        } else if self.send_response {
            self.send_response = false;
            (self.header(Op::Response, 0, 0), Vec::new())
        } else if let Some(data) = self.read_host(w.available_bytes() - HDR_LEN) {
            let len = data.len() as u32; // at most MAX_PKT_PAYLOAD
            self.tx_cnt = self.tx_cnt.wrapping_add(len);
            (self.header(Op::Rw, len, 0), data)
        } else if self.done() {
            return (None, Verdict::Reset);
        } else if self.send_credit_update {
            (self.header(Op::CreditUpdate, 0, 0), Vec::new())
        } else if self.send_credit_request {
            self.send_credit_request = false;
            (self.header(Op::CreditRequest, 0, 0), Vec::new())
        } else if self.shutdown_pending & !self.shutdown_sent != 0 {
            self.shutdown_sent |= self.shutdown_pending;
            (self.header(Op::Shutdown, 0, self.shutdown_sent), Vec::new())
        } else {
            return (None, Verdict::Keep);
        };
        // Any packet tells the guest our fwd_cnt.
        self.send_credit_update = false;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        let written = w
            .write_all(&hdr.to_bytes())
            .and_then(|()| w.write_all(&data))
            .map(|()| (HDR_LEN + data.len()) as u32)
            .unwrap_or_else(|_| w.bytes_written() as u32);
        (Some(written), Verdict::Keep)
    }

    /// Up to `room` bytes of host data for the guest, within its credit; `None` when there
    /// is nothing to send now (and the read side's state is updated).
    fn read_host(&mut self, room: usize) -> Option<Vec<u8>> {
        if !self.wants_to_read_host() {
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.send_credit_request = true;
            }
            return None;
        }
        let want = room.min(credit).min(MAX_PKT_PAYLOAD);
        if want == 0 {
            return None;
        }
        if !self.prefix.is_empty() {
            let n = want.min(self.prefix.len());
            return Some(self.prefix.drain(..n).collect());
        }
        let mut buf = vec![0u8; want];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.readable = false;
                    self.shutdown_pending |= SHUTDOWN_SEND;
                    if self.host_hup {
                        self.host_write_failed();
                    }
                    return None;
                }
                Ok(n) => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return None;
                }
                Err(_) => {
                    // Reset by the host: nothing more either way.
                    self.host_eof = true;
                    self.readable = false;
                    self.host_write_failed();
                    self.shutdown_pending |= SHUTDOWN_BOTH;
                    return None;
                }
            }
        }
    }

    /// The deadline passed: a REQUEST the guest never answered, or a close that never
    /// finished.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}
