//! The device thread: frames between the virtqueues and the tap.
//!
//! Three event sources wake it: the receive queue's notification, the transmit queue's, and
//! the tap becoming readable. The tap is watched through an epoll set of its own, nested in
//! the worker's: when the guest has no receive buffers the tap is taken out of that set, so
//! the thread sleeps until the driver posts buffers instead of waking for every frame it
//! cannot place.
//!
//! Each direction may have a rate limit (bytes and frames per second). Transmit: a chain
//! over budget stays in the avail ring. Receive: a frame read over budget is held (like one
//! waiting for buffers) and the tap is left alone, so the rest wait in the tap's queue. Both
//! resume when their limiter's timerfd fires (two more event sources).

use super::{count, NetStats, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE};
use crate::{
    ActivateContext, ActivateError, Chain, DeviceError, EventHandler, GuestMemory, VirtioInterrupt,
};
use keel_net::{Tap, VNET_HDR_LEN};
use keel_rate_limiter::RateLimiter;
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const RX_RATE_TOKEN: u64 = 3;
const TX_RATE_TOKEN: u64 = 4;

/// Most frames moved per direction per wake-up, so a flood one way cannot starve the other:
/// the thread goes back to epoll, which hands it every ready source in turn.
pub(super) const BUDGET: usize = 128;

/// The most pieces one transmitted frame may come in (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Where `num_buffers` sits in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS: usize = 10;
/// Where `flags` sits.
const HDR_FLAGS: usize = 0;

/// Why a chain was refused. Only for logs: the guest learns nothing but a used length of 0.
#[derive(Debug, Clone, Copy)]
enum Malformed {
    /// A transmit chain with a device-writable buffer, or a receive chain with a readable one.
    WrongDirection,
    OutsideRam,
    /// Total length over [`MAX_FRAME_LEN`].
    TooLong,
    /// Shorter than the virtio-net header (transmit) or no room at all (receive).
    TooShort,
    /// More than [`IOV_MAX`] pieces.
    Fragmented,
    /// The chain ended early: a loop, a `next` out of the table, a bad indirect table, lengths
    /// that overflow.
    Broken,
}

/// What the data path shares between directions.
struct Shared {
    mem: GuestMemory,
    tap: Arc<Tap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    stats: Arc<NetStats>,
    /// Set once a malformed chain has been logged at warn level; later ones are debug only.
    warned: Cell<bool>,
}

impl Shared {
    fn malformed(&self, queue: u16, why: Malformed) {
        if self.warned.replace(true) {
            tracing::debug!(
                "net {}: queue {queue}: malformed chain: {why:?}",
                self.tap.name()
            );
        } else {
            tracing::warn!(
                "net {}: queue {queue}: dropped a malformed chain ({why:?}); further ones are \
                 only counted",
                self.tap.name()
            );
        }
    }
}

pub(crate) struct NetHandler {
    shared: Shared,
    rx: Rx,
    tx: Tx,
    /// The offloads were cleared already (on a pause, on the device thread).
    offloads_cleared: bool,
}

impl NetHandler {
    /// A paused handler's queues (receive, transmit), with their positions.
    /// The frame waiting for receive buffers, if any (after a pause).
    pub(super) fn take_held(&mut self) -> Option<HeldFrame> {
        let len = self.rx.pending.take()?;
        Some(HeldFrame {
            bytes: self.rx.frame.get(..len)?.to_vec(),
            charged: std::mem::take(&mut self.rx.charged),
        })
    }

    /// Starts with `held` waiting for receive buffers (before the thread runs).
    pub(super) fn hold(&mut self, held: HeldFrame) {
        let len = held.bytes.len();
        if let Some(dst) = self.rx.frame.get_mut(..len) {
            dst.copy_from_slice(&held.bytes);
            self.rx.pending = Some(len);
            self.rx.charged = held.charged;
        } else {
            count(&self.shared.stats.rx_dropped, 1);
        }
    }

    pub(super) fn take_queues(&mut self) -> (Queue, Queue) {
        (
            std::mem::take(&mut self.rx.queue),
            std::mem::take(&mut self.tx.queue),
        )
    }

    fn clear_offloads(&mut self) {
        if std::mem::replace(&mut self.offloads_cleared, true) {
            return;
        }
        if let Err(e) = self.shared.tap.set_offloads(keel_net::Offloads::NONE) {
            tracing::warn!(
                "net {}: clearing the tap's offloads: {e}",
                self.shared.tap.name()
            );
        }
    }
}

impl Drop for NetHandler {
    /// The data path ends with the driver that negotiated its offloads (a reset stops the
    /// worker, which drops this on its own thread): the next driver may not take partial
    /// checksums or segments.
    fn drop(&mut self) {
        self.clear_offloads();
    }
}

impl NetHandler {
    /// The handler and the (fd, token) sources for its worker.
    pub(super) fn new(
        ctx: ActivateContext,
        tap: Arc<Tap>,
        stats: Arc<NetStats>,
        mrg_rxbuf: bool,
        guest_csum: bool,
        limiters: super::Limiters,
    ) -> Result<(NetHandler, Vec<(RawFd, u64)>), ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let mut take = |i: usize| match (queues.next(), events.next()) {
            (Some(q), Some(e)) if q.ready() => Ok((q, e)),
            _ => Err(ActivateError::QueueNotReady(i)),
        };
        let (rx_queue, rx_event) = take(usize::from(RX_QUEUE))?;
        let (tx_queue, tx_event) = take(usize::from(TX_QUEUE))?;
        let backend = |what: &str, e: io::Error| ActivateError::Backend(format!("{what}: {e}"));
        let tap_poll = Epoll::new().map_err(|e| backend("epoll_create", e))?;
        tap_poll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TAP_TOKEN),
            )
            .map_err(|e| backend("watching the tap", e))?;
        let mut sources = vec![
            (rx_event.as_raw_fd(), RX_TOKEN),
            (tx_event.as_raw_fd(), TX_TOKEN),
            (tap_poll.as_raw_fd(), TAP_TOKEN),
        ];
        if let Some(l) = &limiters.rx {
            sources.push((l.as_raw_fd(), RX_RATE_TOKEN));
        }
        if let Some(l) = &limiters.tx {
            sources.push((l.as_raw_fd(), TX_RATE_TOKEN));
        }
        let handler = NetHandler {
            shared: Shared {
                mem: ctx.mem,
                tap,
                interrupt: ctx.interrupt,
                stats,
                warned: Cell::new(false),
            },
            rx: Rx {
                queue: rx_queue,
                event: rx_event,
                tap_poll,
                listening: true,
                mrg_rxbuf,
                guest_csum,
                frame: vec![0; MAX_FRAME_LEN + 1],
                pending: None,
                regions: Vec::new(),
                chains: Vec::new(),
                deferred: Vec::new(),
                used: false,
                limiter: limiters.rx,
                charged: false,
            },
            tx: Tx {
                queue: tx_queue,
                event: tx_event,
                limiter: limiters.tx,
            },
            offloads_cleared: false,
        };
        Ok((handler, sources))
    }
}

impl EventHandler for NetHandler {
    fn handle(&mut self, token: u64) -> Result<(), DeviceError> {
        count(&self.shared.stats.wakeups, 1);
        match token {
            RX_TOKEN => {
                let _ = self.rx.event.read();
                if blocked(&self.rx.limiter) {
                    // The limiter's timer brings the receive side back.
                    return Ok(());
                }
                self.rx.listen(&self.shared, true)?;
                self.rx.process(&self.shared)
            }
            TX_TOKEN => {
                let _ = self.tx.event.read();
                self.tx.process(&self.shared)
            }
            TAP_TOKEN => self.rx.process(&self.shared),
            RX_RATE_TOKEN => {
                timer_fired(&mut self.rx.limiter)?;
                self.rx.listen(&self.shared, true)?;
                self.rx.process(&self.shared)
            }
            TX_RATE_TOKEN => {
                timer_fired(&mut self.tx.limiter)?;
                self.tx.process(&self.shared)
            }
            _ => Ok(()),
        }
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        // A frame waiting for receive buffers stays in `rx` for the device to take
        // (`take_held`). On this thread: the caller's filter may have no tap ioctls.
        self.clear_offloads();
        Ok(())
    }
}

fn blocked(limiter: &Option<RateLimiter>) -> bool {
    limiter.as_ref().is_some_and(RateLimiter::is_blocked)
}

fn timer_fired(limiter: &mut Option<RateLimiter>) -> Result<(), DeviceError> {
    match limiter {
        Some(l) => l
            .event_handled()
            .map_err(|e| DeviceError::Backend(e.to_string())),
        None => Ok(()),
    }
}

/// Charges one frame of `len` bytes (virtio-net header included) to `limiter`: false if it
/// must wait for the limiter's timer. The header is not charged.
fn charge(limiter: &mut Option<RateLimiter>, len: usize) -> Result<bool, DeviceError> {
    let Some(l) = limiter else {
        return Ok(true);
    };
    let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
    l.consume_request(bytes, 1)
        .map_err(|e| DeviceError::Backend(e.to_string()))
}

/// The next available chain, if any. An available index too far ahead is a malformed ring.
fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    index: u16,
) -> Result<Option<Chain<'a>>, DeviceError> {
    let mut it = queue.iter(mem).map_err(|source| DeviceError::Queue {
        queue: index,
        source,
    })?;
    Ok(it.next())
}

fn queue_err(index: u16) -> impl Fn(virtio_queue::Error) -> DeviceError {
    move |source| DeviceError::Queue {
        queue: index,
        source,
    }
}

/// Puts chain `head` in the used ring with `len` bytes written. A head outside the descriptor
/// table cannot be returned (the driver never made such a buffer); it is skipped.
fn give_back(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: u16,
    head: u16,
    len: u32,
) -> Result<bool, DeviceError> {
    if head >= queue.size() {
        return Ok(false);
    }
    queue.add_used(mem, head, len).map_err(queue_err(index))?;
    Ok(true)
}

struct Tx {
    queue: Queue,
    event: EventFd,
    limiter: Option<RateLimiter>,
}

impl Tx {
    /// Sends every chain the driver made available, up to [`BUDGET`] of them.
    fn process(&mut self, sh: &Shared) -> Result<(), DeviceError> {
        if blocked(&self.limiter) {
            return Ok(());
        }
        let err = queue_err(TX_QUEUE);
        let mem = &sh.mem;
        // Reused across frames: the pieces of one frame, pointing into guest memory.
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(32);
        let mut used = false;
        let mut done = 0;
        'outer: loop {
            self.queue.disable_notification(mem).map_err(&err)?;
            let popped_before = done;
            loop {
                if done == BUDGET {
                    // Maybe more: come back once the other sources had their turn (the
                    // driver will not notify, notifications are off).
                    let _ = self.event.write(1);
                    break 'outer;
                }
                let Some(chain) = pop(&mut self.queue, mem, TX_QUEUE)? else {
                    break;
                };
                let head = chain.head_index();
                let res = gather(chain, mem, &mut iov);
                if let Ok(len) = res {
                    if !charge(&mut self.limiter, len)? {
                        // Over budget: the chain goes back to the ring until the timer.
                        iov.clear();
                        self.queue.go_to_previous_position();
                        break 'outer;
                    }
                }
                let res = res.and_then(|len| send(&sh.tap, &iov).map(|r| (len, r)));
                iov.clear();
                match res {
                    Ok((len, Ok(()))) => {
                        count(&sh.stats.tx_frames, 1);
                        count(&sh.stats.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Ok((_, Err(e))) => {
                        count(&sh.stats.tx_errors, 1);
                        tracing::debug!("net {}: tap refused a frame: {e}", sh.tap.name());
                    }
                    Err(why) => {
                        count(&sh.stats.tx_dropped, 1);
                        sh.malformed(TX_QUEUE, why);
                    }
                }
                used |= give_back(&mut self.queue, mem, TX_QUEUE, head, 0)?;
                done += 1;
            }
            if !crate::rearm(&mut self.queue, mem, TX_QUEUE, done - popped_before)? {
                break;
            }
        }
        if used && self.queue.needs_notification(mem).map_err(&err)? {
            sh.interrupt.signal_queue(TX_QUEUE);
        }
        Ok(())
    }
}

/// Collects a transmit chain's buffers as iovecs into guest memory, checking each lies in
/// RAM. Returns the frame's length, header included.
fn gather(
    chain: Chain<'_>,
    mem: &GuestMemory,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, Malformed> {
    let mut total = 0usize;
    let mut open = false;
    for desc in chain {
        open = desc.has_next();
        if desc.is_write_only() {
            return Err(Malformed::WrongDirection);
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|&t| t <= MAX_FRAME_LEN)
            .ok_or(Malformed::TooLong)?;
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| Malformed::OutsideRam)?;
            if iov.len() == IOV_MAX {
                return Err(Malformed::Fragmented);
            }
            let guard = slice.ptr_guard();
            iov.push(libc::iovec {
                iov_base: guard.as_ptr().cast_mut().cast(),
                iov_len: guard.len(),
            });
        }
    }
    if open {
        Err(Malformed::Broken)
    } else if total < VNET_HDR_LEN {
        Err(Malformed::TooShort)
    } else {
        Ok(total)
    }
}

/// Writes one frame gathered in `iov` to the tap.
///
/// This is writev(2) on raw iovecs rather than [`Tap::write_vectored`]: that takes `&[u8]`s,
/// and a Rust reference must not cover memory the guest may change under it. The kernel
/// copies whatever the bytes are; a guest racing its own buffer only garbles its own frame.
fn send(tap: &Tap, iov: &[libc::iovec]) -> Result<io::Result<()>, Malformed> {
    let count = libc::c_int::try_from(iov.len()).map_err(|_| Malformed::Fragmented)?;
    // writev only reads those `count` buffers, and no Rust reference to them exists.
    // SAFETY: every iovec was built by `gather` from a VolatileSlice that `get_slices` checked
    // lies in a mapped region, kept mapped by the `GuestMemory` the caller holds.
    let n = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), count) };
    Ok(if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    })
}

/// One receive chain held for the frame being placed.
struct RxChain {
    head: u16,
    /// End of its writable regions in `Rx::regions` (they start where the previous chain's end).
    regions_end: usize,
}

enum Placed {
    /// The frame is in the guest's buffers.
    Delivered,
    /// The frame can never fit the guest's buffers and is gone.
    Dropped,
    /// Not enough buffers yet. The queue's next index is past every chain looked at; `start`
    /// is where the frame's chains begin, to go back to.
    NoRoom { start: u16 },
}

enum Read {
    Frame(usize),
    Dropped,
    Empty,
}

/// A received frame carried from one data path to the next across a pause.
pub(crate) struct HeldFrame {
    bytes: Vec<u8>,
    /// Already charged to the receive limiter.
    charged: bool,
}

struct Rx {
    queue: Queue,
    event: EventFd,
    /// Holds the tap while the device wants frames; nested in the worker's epoll.
    tap_poll: Epoll,
    listening: bool,
    mrg_rxbuf: bool,
    guest_csum: bool,
    /// One frame, header first, as read from the tap; one byte longer than the longest frame
    /// taken, to tell a frame that filled it from one the tap had to cut.
    frame: Vec<u8>,
    /// `frame` holds a frame of this length waiting for receive buffers.
    pending: Option<usize>,
    /// Scratch: writable regions of the chains held for the current frame.
    regions: Vec<(GuestAddress, usize)>,
    chains: Vec<RxChain>,
    /// Malformed chains met among the current frame's chains, returned after them.
    deferred: Vec<u16>,
    /// Something went into the used ring since the last interrupt decision.
    used: bool,
    limiter: Option<RateLimiter>,
    /// The frame in `pending` has been charged to the limiter already.
    charged: bool,
}

impl Rx {
    /// Starts or stops watching the tap.
    fn listen(&mut self, sh: &Shared, on: bool) -> Result<(), DeviceError> {
        if self.listening == on {
            return Ok(());
        }
        let fd = sh.tap.as_raw_fd();
        let res = if on {
            self.tap_poll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TAP_TOKEN),
            )
        } else {
            self.tap_poll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        res.map_err(|e| DeviceError::Backend(format!("tap {}: epoll_ctl: {e}", sh.tap.name())))?;
        self.listening = on;
        Ok(())
    }

    /// Moves frames from the tap to the guest until the tap is empty, the guest has no room
    /// (then the tap is left alone until the driver posts buffers) or [`BUDGET`] is spent.
    fn process(&mut self, sh: &Shared) -> Result<(), DeviceError> {
        if blocked(&self.limiter) {
            return Ok(());
        }
        let err = queue_err(RX_QUEUE);
        self.queue.disable_notification(&sh.mem).map_err(&err)?;
        self.used = false;
        let mut retried_at: Option<u16> = None;
        let mut frames = 0;
        while frames < BUDGET {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.read(sh)? {
                    Read::Frame(len) => len,
                    Read::Dropped => {
                        frames += 1;
                        continue;
                    }
                    Read::Empty => break,
                },
            };
            if !self.charged {
                if !charge(&mut self.limiter, len)? {
                    // Over budget: hold this frame, leave the rest in the tap, and wait
                    // for the limiter's timer.
                    self.pending = Some(len);
                    self.listen(sh, false)?;
                    break;
                }
                self.charged = true;
            }
            match self.place(sh, len)? {
                Placed::Delivered | Placed::Dropped => {
                    frames += 1;
                    self.charged = false;
                }
                Placed::NoRoom { start } => {
                    self.pending = Some(len);
                    // Ask to be told of new buffers: past the ones already looked at, which
                    // is where the queue's next index stands. Then go back to the first.
                    let more = self.queue.enable_notification(&sh.mem).map_err(&err)?;
                    let seen = self.queue.next_avail();
                    self.queue.set_next_avail(start);
                    // "More" twice at the same ring position means the device's own ring
                    // writes move the driver's index (overlapping rings): wait for a notify.
                    let more = more && retried_at != Some(seen);
                    retried_at = Some(seen);
                    if more {
                        self.queue.disable_notification(&sh.mem).map_err(&err)?;
                        continue;
                    }
                    self.listen(sh, false)?;
                    break;
                }
            }
        }
        if self.used && self.queue.needs_notification(&sh.mem).map_err(&err)? {
            sh.interrupt.signal_queue(RX_QUEUE);
        }
        Ok(())
    }

    /// Reads one frame from the tap into `frame`.
    fn read(&mut self, sh: &Shared) -> Result<Read, DeviceError> {
        loop {
            return match sh.tap.read(&mut self.frame) {
                Ok(n) if (VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&n) => Ok(Read::Frame(n)),
                Ok(n) => {
                    count(&sh.stats.rx_dropped, 1);
                    tracing::debug!(
                        "net {}: dropped a {n}-byte frame from the tap",
                        sh.tap.name()
                    );
                    Ok(Read::Dropped)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Empty),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The tap was deleted or shut down: nothing more will come.
                Err(e) => Err(DeviceError::Backend(format!(
                    "reading tap {}: {e}",
                    sh.tap.name()
                ))),
            };
        }
    }

    /// Copies the `len`-byte frame in `frame` into the guest's receive buffers: one chain,
    /// or as many as it takes with merged buffers.
    fn place(&mut self, sh: &Shared, len: usize) -> Result<Placed, DeviceError> {
        let mem = &sh.mem;
        self.regions.clear();
        self.chains.clear();
        self.deferred.clear();
        let mut start = self.queue.next_avail();
        let mut room = 0usize;
        // Descriptors held (at least one per chain): once they fill the ring the driver cannot
        // post more, and a frame that still does not fit never will.
        let mut held = 0usize;
        while room < len && (self.mrg_rxbuf || self.chains.is_empty()) {
            let Some(chain) = pop(&mut self.queue, mem, RX_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let first = self.regions.len();
            match writable_regions(chain, mem, len - room, &mut self.regions) {
                Ok((cap, descs)) if cap > 0 => {
                    room += cap;
                    held += descs;
                    self.chains.push(RxChain {
                        head,
                        regions_end: self.regions.len(),
                    });
                }
                res => {
                    self.regions.truncate(first);
                    let why = res.err().unwrap_or(Malformed::TooShort);
                    sh.malformed(RX_QUEUE, why);
                    if self.chains.is_empty() {
                        // Nothing of this frame placed yet: hand it back now, for good.
                        count(&sh.stats.rx_bad_buffers, 1);
                        self.used |= give_back(&mut self.queue, &sh.mem, RX_QUEUE, head, 0)?;
                        start = self.queue.next_avail();
                    } else {
                        self.deferred.push(head);
                        held += 1;
                    }
                }
            }
        }
        let mem = &sh.mem;
        if room < len {
            let never = (!self.mrg_rxbuf && !self.chains.is_empty())
                || held >= usize::from(self.queue.size());
            if !never {
                return Ok(Placed::NoRoom { start });
            }
            // Leave the buffers to frames that fit.
            self.queue.set_next_avail(start);
            count(&sh.stats.rx_dropped, 1);
            tracing::debug!(
                "net {}: dropped a {len}-byte frame: the guest's buffers hold {room}",
                sh.tap.name()
            );
            return Ok(Placed::Dropped);
        }

        // At most one chain per ring entry: the count fits num_buffers.
        let buffers = if self.mrg_rxbuf {
            u16::try_from(self.chains.len()).unwrap_or(u16::MAX)
        } else {
            1
        };
        self.frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&buffers.to_le_bytes());
        if !self.guest_csum {
            // §5.1.6.4.1: without GUEST_CSUM the flags must be 0 (the tap may have set
            // DATA_VALID).
            self.frame[HDR_FLAGS] = 0;
        }
        let mut off = 0;
        let mut from = 0;
        let mut complete = true;
        for chain in &self.chains {
            let mut written = 0usize;
            for &(addr, rlen) in &self.regions[from..chain.regions_end] {
                let n = rlen.min(len - off);
                if n == 0 {
                    break;
                }
                // The range was checked when the chain was taken; RAM does not shrink.
                if mem.write_slice(&self.frame[off..off + n], addr).is_err() {
                    complete = false;
                }
                off += n;
                written += n;
            }
            from = chain.regions_end;
            // `written` <= the frame's length, which fits u32.
            let written = u32::try_from(written).unwrap_or(u32::MAX);
            self.used |= give_back(&mut self.queue, mem, RX_QUEUE, chain.head, written)?;
        }
        for &head in &self.deferred {
            count(&sh.stats.rx_bad_buffers, 1);
            self.used |= give_back(&mut self.queue, mem, RX_QUEUE, head, 0)?;
        }
        if complete {
            count(&sh.stats.rx_frames, 1);
            count(&sh.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
            Ok(Placed::Delivered)
        } else {
            count(&sh.stats.rx_dropped, 1);
            Ok(Placed::Dropped)
        }
    }
}

/// Checks a receive chain's buffers all lie in RAM and collects those that the `need` bytes
/// still to place will use. Returns the room the chain offers and how many descriptors it
/// has.
fn writable_regions(
    chain: Chain<'_>,
    mem: &GuestMemory,
    need: usize,
    regions: &mut Vec<(GuestAddress, usize)>,
) -> Result<(usize, usize), Malformed> {
    let mut room = 0usize;
    let mut descs = 0usize;
    let mut open = false;
    for desc in chain {
        open = desc.has_next();
        descs += 1;
        if !desc.is_write_only() {
            return Err(Malformed::WrongDirection);
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(Malformed::OutsideRam);
        }
        // A chain of thousands of tiny buffers costs no more memory than the frame needs.
        if room < need {
            regions.push((desc.addr(), len));
        }
        room = room.checked_add(len).ok_or(Malformed::TooLong)?;
    }
    if open {
        Err(Malformed::Broken)
    } else {
        Ok((room, descs))
    }
}
