//! virtio-vsock (virtio 1.2 §5.10) bridged to host Unix sockets, after Firecracker's
//! "Unix socket backend" design.
//!
//! The guest sees a socket device with CID `guest_cid`; the host is CID 2. Host programs
//! reach it through one listening Unix socket at `uds_path`:
//!
//! * **Host → guest**: connect to `uds_path` and write `CONNECT <port>\n` (decimal port,
//!   `\r\n` also accepted, at most 32 bytes). The device asks the guest for a connection
//!   from host CID 2, a fresh local port (2^30 and up), to `guest_cid:<port>`. If the guest
//!   accepts, the device writes `OK <local port>\n` and from then on the Unix stream carries
//!   the connection's bytes both ways. If the guest refuses (nothing listens) or does not
//!   answer within 2 s, the device closes the Unix stream without writing anything. Bytes
//!   written after the `CONNECT` line are delivered once the connection is up.
//! * **Guest → host**: a guest connecting to CID 2 port `P` is connected to the Unix
//!   socket `<uds_path>_P` (e.g. `/run/v.sock_52`); no handshake is written on that
//!   stream. If nothing listens there, the guest's connect fails (RST).
//!
//! Half-close works both ways: `shutdown(SHUT_WR)` on the host stream becomes a SHUTDOWN
//! "no more sends" to the guest (the guest reads EOF and can still reply), and a guest
//! `shutdown(SHUT_WR)` becomes `shutdown(SHUT_WR)` on the host stream. A connection ends
//! (RST to the guest, host stream closed) when both directions are finished, when either
//! side resets, or when the host closes its stream entirely and the guest has read what
//! the host sent.
//!
//! Flow control is the spec's credit scheme: the device never sends the guest more than
//! the guest's advertised `buf_alloc` allows (it stops reading the host stream meanwhile
//! and asks for credit), and advertises [`BUF_ALLOC`] per connection itself: guest data
//! the host stream does not take at once waits in that buffer; a guest that overruns its
//! credit is reset. At most [`MAX_CONNECTIONS`] connections exist at once; more are
//! refused (host clients are closed, guests get RST).
//!
//! Snapshots: a pause keeps the connections (the device thread stops, the muxer with its
//! host streams waits in the device, and carries on at `resume`). A device restored in a new
//! process has no host streams: it sends the driver VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on
//! the event queue as it starts (virtio 1.2 §5.10.6.7), so the guest drops its stale
//! connections and re-reads its CID.

mod connection;
mod muxer;
mod packet;
mod unix;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hostile;

pub use connection::BUF_ALLOC;
pub use packet::{
    parse_header, Addrs, Header, HeaderError, Op, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};

use crate::device::read_config_bytes;
use crate::{
    features, run_hook, types, ActivateContext, ActivateError, VirtioDevice, QUEUE_MAX_SIZE,
};
use muxer::{Events, Muxer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

/// Most connections (and host clients still handshaking) at once.
pub const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (3 to 4294967294)")]
    InvalidCid(u64),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{0} is in use: something is listening on it")]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The virtio-vsock device.
pub struct Vsock {
    // Declared first so the thread stops before the socket file goes.
    thread: Option<DeviceThread>,
    guest_cid: u64,
    socket: unix::BoundSocket,
    max_connections: usize,
    /// A paused data path: connections and host streams, waiting for `resume`.
    paused: Option<Muxer>,
    /// Restored from a snapshot: the next start owes the driver a transport reset.
    reset_on_start: bool,
}

/// What a snapshot keeps of a vsock device (its connections cannot survive a new process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
}

struct DeviceThread {
    kill: EventFd,
    pausing: Arc<AtomicBool>,
    handle: Option<JoinHandle<Option<Muxer>>>,
}

impl DeviceThread {
    /// Stops the thread and takes its muxer back.
    fn pause(mut self) -> Option<Muxer> {
        let h = self.handle.take()?;
        self.pausing.store(true, Ordering::SeqCst);
        let _ = self.kill.write(1);
        h.join().ok().flatten()
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.kill.write(1);
            let _ = h.join();
        }
    }
}

impl Vsock {
    /// A device for a guest with context ID `guest_cid`, listening for host clients at
    /// `uds_path` (a stale socket file nobody listens on is replaced). The socket file is
    /// removed when the device is dropped.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let socket = unix::BoundSocket::bind(&uds_path)?;
        Ok(Vsock {
            guest_cid,
            socket,
            max_connections: MAX_CONNECTIONS,
            thread: None,
            paused: None,
            reset_on_start: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.socket.path
    }

    #[cfg(test)]
    fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        types::VSOCK
    }
    fn name(&self) -> String {
        format!("vsock cid={}", self.guest_cid)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; 3]
    }
    fn features(&self) -> u64 {
        // VIRTIO_VSOCK_F_STREAM is implied when no type feature is offered.
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.paused = None;
        self.start(ctx)
    }
    fn reset(&mut self) {
        // Stops the thread; its host streams close with it.
        self.thread = None;
        self.paused = None;
        self.reset_on_start = false;
    }
    fn pause(&mut self) -> Vec<(usize, virtio_queue::Queue)> {
        let Some(mut m) = self.thread.take().and_then(DeviceThread::pause) else {
            return Vec::new();
        };
        let mut queues = vec![
            (0, std::mem::take(&mut m.rxq)),
            (1, std::mem::take(&mut m.txq)),
        ];
        queues.extend(m.evq.take().map(|q| (2, q)));
        self.reset_on_start |= m.reset_pending;
        self.paused = Some(m);
        queues
    }
    fn resume(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.start(ctx)
    }
    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Vsock(VsockState {
            guest_cid: self.guest_cid,
        })
    }
    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        match state {
            // A different CID is fine: the transport reset makes the driver re-read it.
            crate::DeviceState::Vsock(_) => {
                self.reset_on_start = true;
                Ok(())
            }
            other => Err(format!("{} state for a vsock device", other.kind())),
        }
    }
}

impl Vsock {
    /// Starts the device thread on `ctx`'s queues: with the paused muxer if there is one
    /// (connections kept), a new one otherwise.
    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.thread = None;
        let hook = ctx.hooks.device;
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let mut next = |i: usize, required: bool| match (queues.next(), events.next()) {
            (Some(q), Some(e)) if q.ready() => Ok(Some((q, e))),
            _ if required => Err(ActivateError::QueueNotReady(i)),
            _ => Ok(None),
        };
        let (Some((rxq, rx)), Some((txq, tx))) = (next(0, true)?, next(1, true)?) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        let (evq, event) = next(2, false)?.unzip();
        let listener = self
            .socket
            .listener
            .try_clone()
            .map_err(ActivateError::Thread)?;
        let mut muxer = match self.paused.take() {
            Some(mut m) => {
                (m.mem, m.interrupt, m.rxq, m.txq, m.evq) = (ctx.mem, ctx.interrupt, rxq, txq, evq);
                m
            }
            None => Muxer::new(
                self.guest_cid,
                self.socket.path.clone(),
                self.max_connections,
                ctx.mem,
                ctx.interrupt,
                rxq,
                txq,
                evq,
                listener,
            )
            .map_err(ActivateError::Thread)?,
        };
        muxer.reset_pending |= std::mem::take(&mut self.reset_on_start);
        let pausing = Arc::new(AtomicBool::new(false));
        let paused_flag = pausing.clone();
        // Blocking: a broken device thread sleeps on it until it is stopped.
        let kill = EventFd::new(0).map_err(ActivateError::Thread)?;
        let events = Events {
            kill: kill.try_clone().map_err(ActivateError::Thread)?,
            rx,
            tx,
            event,
        };
        let handle = std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || match run_hook(hook) {
                Ok(()) => muxer.run(events, &paused_flag),
                Err(e) => muxer.broken(&events.kill, &e),
            })
            .map_err(ActivateError::Thread)?;
        self.thread = Some(DeviceThread {
            kill,
            pausing,
            handle: Some(handle),
        });
        Ok(())
    }
}
