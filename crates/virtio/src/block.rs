//! virtio-blk (virtio 1.2 §5.2) on a [`keel_block::DiskImage`], with requests running
//! asynchronously on a [`keel_block::IoEngine`] so several are in flight at once and the
//! device thread only parses and completes.
//!
//! With a rate limit (bytes and requests per second, [`keel_rate_limiter`]) a request the
//! budget cannot pay for is left in the avail ring — nothing lost, nothing reordered — and
//! the thread waits on the limiter's timerfd before it looks at the ring again.

use crate::device::read_config_bytes;
use crate::{
    features, types, ActivateContext, ActivateError, DeviceError, EventHandler, GuestMemory,
    VirtioDevice, VirtioInterrupt, Worker, QUEUE_MAX_SIZE,
};
use keel_block::{DiskImage, EngineConfig, IoEngine, Request, RequestKind, DEVICE_ID_LEN};
use keel_rate_limiter::{Budget, RateLimiter};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 16;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Largest data transfer one request may carry; larger ones fail (bounds host memory).
const MAX_TRANSFER: usize = 32 << 20;
/// Descriptors per request the device accepts (data segments + header + status).
const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 - 2;
/// Discard / write-zeroes: one segment per request, up to 4 GiB - 512 each.
const MAX_RANGE_SECTORS: u32 = (u32::MAX as u64 / SECTOR) as u32;

/// How long a pause waits for the requests in flight before it gives up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::block_control::BlockControl;

/// What a snapshot keeps of a block device: the ID (serial) the guest read, which a restored
/// device keeps although it runs on another file (a new overlay).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub id: String,
}
use crate::block_control::{lock, Backing};

/// A virtio block device.
pub struct Block {
    backing: Arc<Mutex<Backing>>,
    /// The device ID the guest reads (GET_ID): the first image's, kept across replacements.
    id: String,
    name: String,
    engine: EngineConfig,
    /// Budgets every request is charged to (its own, a VM-wide one); empty: unlimited.
    rate_limit: Vec<Budget>,
    worker: Option<Worker<BlockHandler>>,
}

impl Block {
    /// `name` is for logs (e.g. "vda (disk.img)").
    pub fn new(image: Arc<dyn DiskImage>, name: String, engine: EngineConfig) -> Self {
        Block {
            id: image.id(),
            backing: Arc::new(Mutex::new(Backing {
                image,
                running: false,
            })),
            name,
            engine,
            rate_limit: Vec::new(),
            worker: None,
        }
    }

    /// A handle to swap the device's image while it is paused; take it before boxing.
    pub fn control(&self) -> BlockControl {
        BlockControl {
            backing: self.backing.clone(),
            name: self.name.clone(),
        }
    }

    fn image(&self) -> Arc<dyn DiskImage> {
        lock(&self.backing).image.clone()
    }

    /// Charges every request to each of `budgets` (1 operation, and its data bytes for reads
    /// and writes; flush and GET_ID are free). The budgets outlive driver resets.
    pub fn with_rate_limit(mut self, budgets: Vec<Budget>) -> Self {
        self.rate_limit = budgets;
        self
    }

    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let put = |c: &mut [u8; 60], at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(&mut c, 0, &(self.image().size() / SECTOR).to_le_bytes());
        put(&mut c, 12, &SEG_MAX.to_le_bytes());
        put(&mut c, 20, &(SECTOR as u32).to_le_bytes());
        put(&mut c, 34, &1u16.to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 40, &1u32.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        types::BLOCK
    }
    fn name(&self) -> String {
        format!("block {}", self.name)
    }
    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Block(BlockState {
            id: self.id.clone(),
        })
    }
    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        match state {
            // The serial the guest read at probe time stays, whatever file the disk is now.
            crate::DeviceState::Block(b) if b.id.len() <= DEVICE_ID_LEN => {
                self.id = b.id.clone();
                Ok(())
            }
            crate::DeviceState::Block(b) => Err(format!(
                "a block device ID of {} bytes (at most {DEVICE_ID_LEN})",
                b.id.len()
            )),
            other => Err(format!("{} state for a block device", other.kind())),
        }
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH;
        if self.image().read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let (Some(queue), Some(event)) = (ctx.queues.pop(), ctx.queue_events.pop()) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        let mut engine_config = self.engine;
        if engine_config.thread_start.is_none() {
            engine_config.thread_start = ctx.hooks.block_io;
        }
        // Held until the thread runs: a replacement cannot slip in between.
        let mut backing = lock(&self.backing);
        let image = backing.image.clone();
        let engine = IoEngine::new(image.clone(), engine_config)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let mut sources = vec![
            (event.as_raw_fd(), TOKEN_QUEUE),
            (engine.completion_fd().as_raw_fd(), TOKEN_DONE),
        ];
        let limiter = if self.rate_limit.iter().all(|b| b.config().is_unlimited()) {
            None
        } else {
            let l = RateLimiter::with_budgets(self.rate_limit.clone())
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
            sources.push((l.as_raw_fd(), TOKEN_RATE));
            Some(l)
        };
        let handler = BlockHandler {
            mem: ctx.mem,
            queue,
            event,
            engine,
            interrupt: ctx.interrupt.clone(),
            id: self.id.clone(),
            read_only: image.read_only(),
            capacity: image.size(),
            inflight: Vec::new(),
            active: 0,
            throttled: false,
            limiter,
        };
        self.worker = Some(
            Worker::spawn(
                format!("virtio-blk {}", self.name),
                sources,
                handler,
                ctx.interrupt,
                ctx.hooks.device,
            )
            .map_err(ActivateError::Thread)?,
        );
        backing.running = true;
        Ok(())
    }
    fn reset(&mut self) {
        // Dropping the worker drops the engine, which finishes queued requests first.
        self.worker = None;
        lock(&self.backing).running = false;
    }
    fn pause(&mut self) -> Vec<(usize, Queue)> {
        // The thread drains the engine and flushes the image before it hands back the
        // handler; the engine (no requests left) goes with the handler here.
        let queues = self
            .worker
            .take()
            .and_then(Worker::pause)
            .map(|h| vec![(0, h.queue)])
            .unwrap_or_default();
        lock(&self.backing).running = false;
        queues
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_DONE: u64 = 1;
const TOKEN_RATE: u64 = 2;

/// Guest buffers as plain (address, length) pairs, so a request can outlive the chain.
#[derive(Debug, Default)]
struct Regions(Vec<(u64, u32)>);

impl Regions {
    fn len(&self) -> u64 {
        self.0.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// Copies `buf.len()` bytes starting `skip` bytes into the regions; false if they do
    /// not fit or lie outside guest memory.
    fn read(&self, mem: &GuestMemory, mut skip: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        for &(addr, len) in &self.0 {
            if done == buf.len() {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(buf.len() - done);
            let Some(a) = addr.checked_add(skip) else {
                return false;
            };
            if mem
                .read_slice(&mut buf[done..done + n], GuestAddress(a))
                .is_err()
            {
                return false;
            }
            done += n;
            skip = 0;
        }
        done == buf.len()
    }

    fn write(&self, mem: &GuestMemory, mut skip: u64, buf: &[u8]) -> bool {
        let mut done = 0;
        for &(addr, len) in &self.0 {
            if done == buf.len() {
                break;
            }
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(buf.len() - done);
            let Some(a) = addr.checked_add(skip) else {
                return false;
            };
            if mem
                .write_slice(&buf[done..done + n], GuestAddress(a))
                .is_err()
            {
                return false;
            }
            done += n;
            skip = 0;
        }
        done == buf.len()
    }
}

/// A request waiting for the engine.
struct InFlight {
    head: u16,
    /// Where read data goes (the writable regions minus the status byte).
    data_out: Regions,
    status: u64,
    is_read: bool,
}

struct BlockHandler {
    mem: GuestMemory,
    queue: Queue,
    event: EventFd,
    engine: IoEngine,
    interrupt: Arc<dyn VirtioInterrupt>,
    id: String,
    read_only: bool,
    capacity: u64,
    /// Slots indexed by `user_data`; `None` when free.
    inflight: Vec<Option<InFlight>>,
    /// Requests with the engine now.
    active: usize,
    /// The queue was left unread because `active` hit the limit.
    throttled: bool,
    /// When it is blocked, the queue is left unread until its timer fires.
    limiter: Option<RateLimiter>,
}

/// What parsing a chain decided.
enum Parsed {
    /// Finish now with this status and this many bytes written to the guest.
    Done { status: u8, written: u32 },
    /// Hand to the engine.
    Submit(RequestKind, u64, Vec<Vec<u8>>),
}

impl BlockHandler {
    fn queue_err(e: virtio_queue::Error) -> DeviceError {
        DeviceError::Queue {
            queue: 0,
            source: e,
        }
    }

    fn serve_queue(&mut self) -> Result<(), DeviceError> {
        let _ = self.event.read();
        if self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            // The timer brings us back; the driver's requests wait in the ring.
            return Ok(());
        }
        let mut completed = false;
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(Self::queue_err)?;
            let mut popped = 0usize;
            loop {
                // A driver cannot have more requests outstanding than its queue holds; one
                // that republishes heads still in flight waits for completions instead of
                // growing host memory. Completions call back in here.
                if self.active >= usize::from(QUEUE_MAX_SIZE) {
                    self.throttled = true;
                    if completed {
                        self.notify()?;
                    }
                    return Ok(());
                }
                let chain = {
                    let mut it = self.queue.iter(&self.mem).map_err(Self::queue_err)?;
                    it.next()
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let mut readable = Regions::default();
                let mut writable = Regions::default();
                let mut order_ok = true;
                for d in chain {
                    if d.is_write_only() {
                        writable.0.push((d.addr().0, d.len()));
                    } else {
                        // Device-readable buffers must come before device-writable ones.
                        order_ok &= writable.0.is_empty();
                        readable.0.push((d.addr().0, d.len()));
                    }
                }
                if !self.charge(&readable, &writable)? {
                    // Over budget: put the request back and wait for the limiter's timer.
                    self.queue.go_to_previous_position();
                    if completed {
                        self.notify()?;
                    }
                    return Ok(());
                }
                popped += 1;
                completed |= self.start(head, readable, writable, order_ok)?;
            }
            if !crate::rearm(&mut self.queue, &self.mem, 0, popped)? {
                break;
            }
        }
        if completed {
            self.notify()?;
        }
        Ok(())
    }

    /// Charges a request to the rate limiter: false if it must wait (the limiter's timer is
    /// armed). Reads and writes cost their data bytes and one operation; flush and GET_ID
    /// are free; anything else (discard, write-zeroes, garbage) costs one operation.
    fn charge(&mut self, readable: &Regions, writable: &Regions) -> Result<bool, DeviceError> {
        let Some(limiter) = &mut self.limiter else {
            return Ok(true);
        };
        let mut hdr = [0u8; 4];
        let kind = if readable.read(&self.mem, 0, &mut hdr) {
            Some(u32::from_le_bytes(hdr))
        } else {
            None
        };
        let (bytes, ops) = match kind {
            Some(T_IN) => (writable.len().saturating_sub(1), 1),
            Some(T_OUT) => (readable.len().saturating_sub(HEADER_LEN as u64), 1),
            Some(T_FLUSH | T_GET_ID) => (0, 0),
            _ => (0, 1),
        };
        limiter
            .consume_request(bytes, ops)
            .map_err(|e| DeviceError::Backend(e.to_string()))
    }

    /// The limiter's timer fired: take the requests left waiting.
    fn rate_timer(&mut self) -> Result<(), DeviceError> {
        if let Some(l) = &mut self.limiter {
            l.event_handled()
                .map_err(|e| DeviceError::Backend(e.to_string()))?;
        }
        self.serve_queue()
    }

    /// Parses and starts one request; returns true if it completed at once.
    fn start(
        &mut self,
        head: u16,
        readable: Regions,
        mut writable: Regions,
        order_ok: bool,
    ) -> Result<bool, DeviceError> {
        // The status byte is the last writable byte; without one there is nowhere to report.
        let Some(status) = split_status(&mut writable) else {
            self.queue
                .add_used(&self.mem, head, 0)
                .map_err(Self::queue_err)?;
            return Ok(true);
        };
        let parsed = if order_ok {
            self.parse(&readable, &writable)
        } else {
            Parsed::Done {
                status: S_IOERR,
                written: 0,
            }
        };
        match parsed {
            Parsed::Done { status: s, written } => {
                self.finish(head, status, s, written)?;
                Ok(true)
            }
            Parsed::Submit(kind, offset, buffers) => {
                let slot = match self.inflight.iter().position(Option::is_none) {
                    Some(i) => i,
                    None => {
                        self.inflight.push(None);
                        self.inflight.len() - 1
                    }
                };
                let is_read = kind == RequestKind::Read;
                let request = Request {
                    kind,
                    offset,
                    buffers,
                    user_data: slot as u64,
                };
                match self.engine.submit(request) {
                    Ok(()) => {
                        self.active += 1;
                        self.inflight[slot] = Some(InFlight {
                            head,
                            data_out: writable,
                            status,
                            is_read,
                        });
                        Ok(false)
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk: cannot queue a request: {e}");
                        self.finish(head, status, S_IOERR, 0)?;
                        Ok(true)
                    }
                }
            }
        }
    }

    fn parse(&self, readable: &Regions, writable: &Regions) -> Parsed {
        let fail = |status| Parsed::Done { status, written: 0 };
        let mut hdr = [0u8; HEADER_LEN];
        if !readable.read(&self.mem, 0, &mut hdr) {
            return fail(S_IOERR);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        let payload = readable.len() - HEADER_LEN as u64;
        let offset = match sector.checked_mul(SECTOR) {
            Some(o) => o,
            None => return fail(S_IOERR),
        };
        let in_range = |len: u64| offset.checked_add(len).is_some_and(|e| e <= self.capacity);
        match kind {
            T_IN => {
                let len = writable.len();
                if !len.is_multiple_of(SECTOR) || len as usize > MAX_TRANSFER || !in_range(len) {
                    return fail(S_IOERR);
                }
                Parsed::Submit(RequestKind::Read, offset, vec![vec![0u8; len as usize]])
            }
            T_OUT => {
                if self.read_only {
                    return fail(S_IOERR);
                }
                if !payload.is_multiple_of(SECTOR)
                    || payload as usize > MAX_TRANSFER
                    || !in_range(payload)
                {
                    return fail(S_IOERR);
                }
                let mut buf = vec![0u8; payload as usize];
                if !readable.read(&self.mem, HEADER_LEN as u64, &mut buf) {
                    return fail(S_IOERR);
                }
                Parsed::Submit(RequestKind::Write, offset, vec![buf])
            }
            T_FLUSH => Parsed::Submit(RequestKind::Flush, 0, Vec::new()),
            T_GET_ID => {
                let mut id = [0u8; DEVICE_ID_LEN];
                let b = self.id.as_bytes();
                let n = b.len().min(DEVICE_ID_LEN);
                id[..n].copy_from_slice(&b[..n]);
                let n = (writable.len() as usize).min(DEVICE_ID_LEN);
                if !writable.write(&self.mem, 0, &id[..n]) {
                    return fail(S_IOERR);
                }
                Parsed::Done {
                    status: S_OK,
                    written: n as u32,
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    return fail(S_IOERR);
                }
                // One segment: sector u64, num_sectors u32, flags u32.
                if payload != 16 {
                    return fail(S_UNSUPP);
                }
                let mut seg = [0u8; 16];
                if !readable.read(&self.mem, HEADER_LEN as u64, &mut seg) {
                    return fail(S_IOERR);
                }
                let mut s8 = [0u8; 8];
                s8.copy_from_slice(&seg[..8]);
                let start = u64::from_le_bytes(s8);
                let count = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                // Only the "unmap" flag (bit 0) is defined, and only for write-zeroes.
                if flags & !1 != 0 || (kind == T_DISCARD && flags != 0) {
                    return fail(S_UNSUPP);
                }
                let (Some(off), Some(len)) = (start.checked_mul(SECTOR), count.checked_mul(SECTOR))
                else {
                    return fail(S_IOERR);
                };
                if off.checked_add(len).is_none_or(|e| e > self.capacity) {
                    return fail(S_IOERR);
                }
                let kind = if kind == T_DISCARD {
                    RequestKind::Discard { len }
                } else {
                    RequestKind::WriteZeroes { len }
                };
                Parsed::Submit(kind, off, Vec::new())
            }
            _ => fail(S_UNSUPP),
        }
    }

    fn finish(&mut self, head: u16, status: u64, s: u8, written: u32) -> Result<(), DeviceError> {
        // A status byte outside guest memory cannot be written; the used entry still goes.
        let ok = self.mem.write_obj(s, GuestAddress(status)).is_ok();
        let len = if ok {
            written.saturating_add(1)
        } else {
            written
        };
        self.queue
            .add_used(&self.mem, head, len)
            .map_err(Self::queue_err)
    }

    fn complete(&mut self) -> Result<(), DeviceError> {
        if !self.reap()? {
            return Ok(());
        }
        self.notify()?;
        if std::mem::take(&mut self.throttled) {
            self.serve_queue()?;
        }
        Ok(())
    }

    /// Finishes the requests the engine completed; false if there were none.
    fn reap(&mut self) -> Result<bool, DeviceError> {
        let done = self.engine.take_completions();
        if done.is_empty() {
            return Ok(false);
        }
        for c in done {
            let Some(req) = self
                .inflight
                .get_mut(c.user_data as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            self.active = self.active.saturating_sub(1);
            let (status, written) = match &c.result {
                Ok(_) if !req.is_read => (S_OK, 0),
                Ok(_) => {
                    let mut written = 0u32;
                    let mut ok = true;
                    let mut off = 0u64;
                    for b in &c.buffers {
                        ok &= req.data_out.write(&self.mem, off, b);
                        off += b.len() as u64;
                        written = written.saturating_add(b.len() as u32);
                    }
                    if ok {
                        (S_OK, written)
                    } else {
                        (S_IOERR, 0)
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-blk: request failed: {e}");
                    (S_IOERR, 0)
                }
            };
            self.finish(req.head, req.status, status, written)?;
        }
        Ok(true)
    }

    /// Waits until the engine has completions (or `deadline` passes: an error).
    fn wait_engine(&self, deadline: Instant) -> Result<(), DeviceError> {
        let mut pfd = libc::pollfd {
            fd: self.engine.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DeviceError::Backend(format!(
                "{} requests still in flight after {DRAIN_TIMEOUT:?}",
                self.active
            )));
        }
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd on the stack, count 1; poll writes only its revents.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        Ok(())
    }

    /// Pausing: completes every request in flight, then flushes the image.
    fn drain(&mut self) -> Result<(), DeviceError> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        self.throttled = false;
        while self.active > 0 {
            self.wait_engine(deadline)?;
            if self.reap()? {
                self.notify()?;
            }
        }
        if self.read_only {
            return Ok(());
        }
        let flush = Request {
            kind: RequestKind::Flush,
            offset: 0,
            buffers: Vec::new(),
            user_data: u64::MAX,
        };
        let failed = |e: String| DeviceError::Backend(format!("flushing the image: {e}"));
        self.engine
            .submit(flush)
            .map_err(|e| failed(e.to_string()))?;
        loop {
            self.wait_engine(deadline)?;
            for c in self.engine.take_completions() {
                if c.user_data == u64::MAX {
                    return c.result.map(|_| ()).map_err(|e| failed(e.to_string()));
                }
            }
        }
    }

    fn notify(&mut self) -> Result<(), DeviceError> {
        if self
            .queue
            .needs_notification(&self.mem)
            .map_err(Self::queue_err)?
        {
            self.interrupt.signal_queue(0);
        }
        Ok(())
    }
}

/// Takes the last writable byte off `writable`; returns its guest address.
fn split_status(writable: &mut Regions) -> Option<u64> {
    while let Some(&(addr, len)) = writable.0.last() {
        if len == 0 {
            writable.0.pop();
            continue;
        }
        let status = addr.checked_add(u64::from(len) - 1)?;
        if len == 1 {
            writable.0.pop();
        } else if let Some(last) = writable.0.last_mut() {
            last.1 = len - 1;
        }
        return Some(status);
    }
    None
}

impl EventHandler for BlockHandler {
    fn handle(&mut self, token: u64) -> Result<(), DeviceError> {
        match token {
            TOKEN_QUEUE => self.serve_queue(),
            TOKEN_RATE => self.rate_timer(),
            _ => self.complete(),
        }
    }
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        self.drain()
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
