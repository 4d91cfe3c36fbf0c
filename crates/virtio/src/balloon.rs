//! virtio-balloon (virtio 1.2 §5.5, the traditional memory balloon).
//!
//! The host asks the guest to give up memory by raising `num_pages` in the configuration
//! space; the driver allocates that many 4 KiB frames and posts their PFNs on the inflate
//! queue, and the device releases the host memory behind them (`madvise`). Frames posted on
//! the deflate queue go back to the guest: anonymous memory faults back in as zeroes, so
//! deflating is only accounting. The driver reports how much it holds in `actual`.
//!
//! Statistics: the driver posts one buffer on the stats queue; the device records it and
//! holds it. Returning it (used ring + interrupt) asks the driver for fresh numbers, which
//! it sends by posting the buffer again. Refreshes happen on [`BalloonHandle::request_stats`]
//! and periodically from a timerfd in the device thread ([`BalloonHandle::set_stats_interval`],
//! off by default).
//!
//! Target limit: the balloon may take at most guest RAM minus a floor of
//! [`floor_bytes`] (half the RAM, at most 256 MiB), so a host mistake cannot starve the guest.
//!
//! Everything the guest posts is hostile: PFNs outside RAM (or in read-only or unaligned
//! regions) and duplicates are ignored and counted, partial PFNs are dropped, unreadable
//! chains are returned unused, and `madvise` only ever sees whole pages of writable RAM.

#[path = "balloon_ram.rs"]
mod ram;
use ram::{ram_regions, release, RamRegion};

use crate::device::{process_queue, read_config_bytes, Chain};
use crate::{
    features, types, ActivateContext, ActivateError, DeviceError, EventHandler, GuestMemory,
    VirtioDevice, VirtioInterrupt, Worker, QUEUE_MAX_SIZE,
};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// The stats queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;

const PAGE_SHIFT: u32 = 12;
const PAGE_MASK: usize = (1 << PAGE_SHIFT) - 1;
// Queue indices, also the device thread's tokens for their notifications.
const INFLATE: u64 = 0;
const DEFLATE: u64 = 1;
const STATS: u64 = 2;
const TOKEN_KICK: u64 = 3;
const TOKEN_TIMER: u64 = 4;
/// Most PFN bytes read from one chain (256 Ki frames, 1 GiB); Linux sends 1 KiB.
const MAX_PFN_BYTES: usize = 1 << 20;
/// Most stats bytes read from one buffer: 64 entries of (le16 tag, le64 value).
const MAX_STATS_BYTES: usize = 64 * STAT_LEN;
const STAT_LEN: usize = 10;
const FLOOR_MAX: u64 = 256 << 20;

/// Memory the guest always keeps whatever the target: a quarter of its RAM, at most 256 MiB
/// (the driver may also deflate on OOM when the device offers it).
pub fn floor_bytes(ram: u64) -> u64 {
    (ram / 4).min(FLOOR_MAX)
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon target of {target} bytes is above the limit of {max} bytes")]
    TargetTooLarge { target: u64, max: u64 },
    #[error("the guest's balloon driver is not running")]
    NotActive,
    #[error("the guest's balloon driver did not negotiate the statistics queue")]
    StatsUnavailable,
}

macro_rules! balloon_stats {
    ($($tag:literal => $field:ident,)*) => {
        /// The guest's memory statistics (virtio 1.2 §5.5.6.3; the byte counts are bytes, the
        /// others events), `None` for tags it did not send.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct BalloonStats {
            $(pub $field: Option<u64>,)*
            /// Entries with a tag this device does not know (ignored).
            pub unknown_tags: u32,
            /// When the guest sent these numbers (milliseconds since the Unix epoch).
            pub updated_unix_ms: u64,
        }

        /// Where the value of stats entry `tag` goes.
        fn stat_slot(s: &mut BalloonStats, tag: u16) -> Option<&mut Option<u64>> {
            match tag {
                $($tag => Some(&mut s.$field),)*
                _ => None,
            }
        }
    };
}

balloon_stats! {
    0 => swap_in_bytes, 1 => swap_out_bytes, 2 => major_faults, 3 => minor_faults,
    4 => free_bytes, 5 => total_bytes, 6 => available_bytes, 7 => disk_caches_bytes,
    8 => hugetlb_allocations, 9 => hugetlb_failures, 10 => oom_kills, 11 => alloc_stalls,
    12 => async_scans, 13 => direct_scans, 14 => async_reclaims, 15 => direct_reclaims,
}

/// What the device thread and the handle share.
#[derive(Default)]
struct Shared {
    num_pages: AtomicU32,
    actual: AtomicU32,
    /// Bytes of RAM the balloon can take from (0: unknown until activation).
    ram_bytes: AtomicU64,
    inflated_pages: AtomicU64,
    ignored_pfns: AtomicU64,
    madvise_calls: AtomicU64,
    stats_interval_ms: AtomicU64,
    stats_requested: AtomicBool,
    stats: Mutex<Option<BalloonStats>>,
    active: Mutex<Option<Active>>,
}

struct Active {
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Wakes the device thread: stats requested or interval changed.
    kick: EventFd,
    stats_vq: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Control of a balloon from any thread (the VMM's control socket), while the VM runs.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Asks the guest to give up `bytes` (rounded down to 4 KiB pages). Rejects more than
    /// guest RAM minus [`floor_bytes`]; before activation, when the RAM size is not known
    /// yet (see [`Balloon::set_guest_ram`]), the target is recorded and clamped at activation.
    pub fn set_target(&self, bytes: u64) -> Result<(), BalloonError> {
        let active = lock(&self.0.active);
        let max = max_target_pages(self.0.ram_bytes.load(SeqCst));
        let pages = bytes >> PAGE_SHIFT;
        if pages > u64::from(max) {
            return Err(BalloonError::TargetTooLarge {
                target: bytes,
                max: u64::from(max) << PAGE_SHIFT,
            });
        }
        self.0.num_pages.store(pages as u32, SeqCst);
        // Interrupt outside the lock: the transport takes its own locks to raise it.
        let interrupt = active.as_ref().map(|a| a.interrupt.clone());
        drop(active);
        if let Some(i) = interrupt {
            i.signal_config();
        }
        Ok(())
    }

    /// The current target in bytes.
    pub fn target(&self) -> u64 {
        u64::from(self.0.num_pages.load(SeqCst)) << PAGE_SHIFT
    }

    /// What the driver says the balloon holds (`actual`), in bytes.
    pub fn actual(&self) -> u64 {
        u64::from(self.0.actual.load(SeqCst)) << PAGE_SHIFT
    }

    /// Bytes of guest RAM currently in the balloon, as counted by the device.
    pub fn inflated_bytes(&self) -> u64 {
        self.0.inflated_pages.load(SeqCst) << PAGE_SHIFT
    }

    /// PFNs the guest posted that were ignored: outside RAM, duplicates, not inflated.
    pub fn ignored_pfns(&self) -> u64 {
        self.0.ignored_pfns.load(SeqCst)
    }

    /// The last statistics the guest sent, if any.
    pub fn stats(&self) -> Option<BalloonStats> {
        lock(&self.0.stats).clone()
    }

    /// Asks the guest for fresh statistics; they show up in [`Self::stats`] once it answers.
    pub fn request_stats(&self) -> Result<(), BalloonError> {
        let active = lock(&self.0.active);
        let a = active.as_ref().ok_or(BalloonError::NotActive)?;
        if !a.stats_vq {
            return Err(BalloonError::StatsUnavailable);
        }
        self.0.stats_requested.store(true, SeqCst);
        let _ = a.kick.write(1);
        Ok(())
    }

    /// Refreshes the statistics every `every` (zero: never). Takes effect immediately.
    pub fn set_stats_interval(&self, every: Duration) {
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let active = lock(&self.0.active);
        self.0.stats_interval_ms.store(ms, SeqCst);
        if let Some(a) = active.as_ref() {
            let _ = a.kick.write(1);
        }
    }

    pub fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.0.stats_interval_ms.load(SeqCst))
    }
}

/// Largest target in pages for `ram` bytes of RAM (0: unknown, only the config field limits).
fn max_target_pages(ram: u64) -> u32 {
    if ram == 0 {
        return u32::MAX;
    }
    let pages = (ram - floor_bytes(ram)) >> PAGE_SHIFT;
    u32::try_from(pages).unwrap_or(u32::MAX)
}

/// The virtio-balloon device model.
pub struct Balloon {
    shared: Arc<Shared>,
    deflate_on_oom: bool,
    worker: Option<Worker<BalloonHandler>>,
    /// What a paused (or restored) data path carries into its next start.
    carry: Option<Carry>,
}

/// A balloon's data-path state across a pause or a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Carry {
    /// The stats buffer the device holds (a chain taken and not yet used).
    held: Option<u16>,
    /// Frames in the balloon: sorted, disjoint runs (first PFN, count).
    inflated: Vec<(u64, u64)>,
}

/// What a snapshot keeps of a balloon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The host's target (`num_pages`) and the driver's `actual`, in 4 KiB pages.
    pub num_pages: u32,
    pub actual: u32,
    pub stats_interval_ms: u64,
    /// The stats buffer the device holds: returning it asks the driver for fresh numbers.
    pub held_stats: Option<u16>,
    /// Frames in the balloon: sorted, disjoint runs (first PFN, count).
    pub inflated: Vec<(u64, u64)>,
    pub stats: Option<BalloonStats>,
}

/// The inflated frames of `ram` as sorted runs.
fn inflated_runs(ram: &[RamRegion]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in ram {
        for i in 0..r.pages {
            let set = r
                .inflated
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0);
            if !set {
                continue;
            }
            let pfn = r.start_pfn + i;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == pfn => *n += 1,
                _ => runs.push((pfn, 1)),
            }
        }
    }
    runs
}

/// Marks `runs` (sorted, disjoint: checked on restore) inflated in `ram`; returns how many
/// frames that is. Frames outside `ram` are ignored. Work is bounded by RAM plus runs.
fn apply_runs(ram: &mut [RamRegion], runs: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    for r in ram.iter_mut() {
        let end = r.start_pfn + r.pages;
        for &(first, n) in runs {
            let (lo, hi) = (first.max(r.start_pfn), first.saturating_add(n).min(end));
            for pfn in lo..hi {
                total += u64::from(r.flip(pfn, true));
            }
        }
    }
    total
}

impl Balloon {
    pub fn new(deflate_on_oom: bool) -> (Balloon, BalloonHandle) {
        let shared = Arc::new(Shared::default());
        let dev = Balloon {
            shared: shared.clone(),
            deflate_on_oom,
            worker: None,
            carry: None,
        };
        (dev, BalloonHandle(shared))
    }

    /// Tells the device how much RAM the guest has, so targets can be checked before the
    /// driver starts. Activation recounts it from the guest memory it is given.
    pub fn set_guest_ram(&mut self, bytes: u64) {
        self.shared.ram_bytes.store(bytes, SeqCst);
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.shared.num_pages.load(SeqCst).to_le_bytes());
        c[4..].copy_from_slice(&self.shared.actual.load(SeqCst).to_le_bytes());
        c
    }
}

fn take_queue(
    queues: &mut impl Iterator<Item = Queue>,
    events: &mut impl Iterator<Item = EventFd>,
    index: usize,
) -> Result<(Queue, EventFd), ActivateError> {
    match (queues.next(), events.next()) {
        (Some(q), Some(e)) if q.ready() => Ok((q, e)),
        _ => Err(ActivateError::QueueNotReady(index)),
    }
}

/// A timerfd whose reads never block (the device thread re-arms it between wake-ups).
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let t = TimerFd::new()?;
    let fd = t.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with no pointers passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        types::BALLOON
    }
    fn name(&self) -> String {
        "balloon".into()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; 3]
    }
    fn features(&self) -> u64 {
        let oom = VIRTIO_BALLOON_F_DEFLATE_ON_OOM * u64::from(self.deflate_on_oom);
        VIRTIO_BALLOON_F_STATS_VQ | oom | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let mut c = self.config();
        for (i, &b) in data.iter().enumerate() {
            if let Some(o @ 4..=7) = offset.checked_add(i as u64) {
                c[o as usize] = b;
            }
        }
        let actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        self.shared.actual.store(actual, SeqCst);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let backend = |e: std::io::Error| ActivateError::Backend(format!("balloon: {e}"));
        let mut queues = ctx.queues.into_iter();
        let mut events = ctx.queue_events.into_iter();
        let inflate = take_queue(&mut queues, &mut events, 0)?;
        let deflate = take_queue(&mut queues, &mut events, 1)?;
        let stats = if ctx.features & VIRTIO_BALLOON_F_STATS_VQ != 0 {
            take_queue(&mut queues, &mut events, 2).ok()
        } else {
            None
        };
        let mut ram = ram_regions(&ctx.mem);
        let carry = self.carry.take().unwrap_or_default();
        let inflated = apply_runs(&mut ram, &carry.inflated);
        self.shared.inflated_pages.store(inflated, SeqCst);
        let ram_bytes: u64 = ram.iter().map(|r| r.pages << PAGE_SHIFT).sum();
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(backend)?;
        let timer = nonblocking_timer().map_err(backend)?;
        let mut sources = vec![
            (inflate.1.as_raw_fd(), INFLATE),
            (deflate.1.as_raw_fd(), DEFLATE),
            (kick.as_raw_fd(), TOKEN_KICK),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ];
        if let Some((_, e)) = &stats {
            sources.push((e.as_raw_fd(), STATS));
            // Linux posts its stats buffer and kicks before DRIVER_OK: look at it regardless.
            let _ = e.write(1);
        }
        let mut active = lock(&self.shared.active);
        self.shared.ram_bytes.store(ram_bytes, SeqCst);
        let max = max_target_pages(ram_bytes);
        if self.shared.num_pages.load(SeqCst) > max {
            tracing::warn!("balloon: target clamped to {max} pages ({ram_bytes} bytes of RAM)");
            self.shared.num_pages.store(max, SeqCst);
        }
        let mut handler = BalloonHandler {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            shared: self.shared.clone(),
            pfn_queues: [inflate, deflate],
            stats_vq: stats.is_some(),
            held: carry.held.filter(|_| stats.is_some()),
            stats,
            kick: kick.try_clone().map_err(backend)?,
            timer,
            armed_ms: 0,
            ram,
        };
        handler.rearm();
        *active = Some(Active {
            interrupt: ctx.interrupt.clone(),
            kick,
            stats_vq: handler.stats_vq,
        });
        match Worker::spawn(
            "virtio-balloon".into(),
            sources,
            handler,
            ctx.interrupt,
            ctx.hooks.device,
        ) {
            Ok(w) => self.worker = Some(w),
            Err(e) => {
                *active = None;
                return Err(ActivateError::Thread(e));
            }
        }
        Ok(())
    }
    fn reset(&mut self) {
        *lock(&self.shared.active) = None;
        self.worker = None;
        self.carry = None;
        // The guest starts over with all its memory; the host's target stays.
        self.shared.actual.store(0, SeqCst);
        self.shared.inflated_pages.store(0, SeqCst);
        self.shared.stats_requested.store(false, SeqCst);
    }
    fn pause(&mut self) -> Vec<(usize, Queue)> {
        *lock(&self.shared.active) = None;
        let Some(h) = self.worker.take().and_then(Worker::pause) else {
            return Vec::new();
        };
        self.carry = Some(Carry {
            held: h.held,
            inflated: inflated_runs(&h.ram),
        });
        let [(inflate, _), (deflate, _)] = h.pfn_queues;
        let mut queues = vec![(INFLATE as usize, inflate), (DEFLATE as usize, deflate)];
        if let Some((stats, _)) = h.stats {
            queues.push((STATS as usize, stats));
        }
        queues
    }
    fn save_state(&self) -> crate::DeviceState {
        let carry = self.carry.clone().unwrap_or_default();
        crate::DeviceState::Balloon(Box::new(BalloonState {
            num_pages: self.shared.num_pages.load(SeqCst),
            actual: self.shared.actual.load(SeqCst),
            stats_interval_ms: self.shared.stats_interval_ms.load(SeqCst),
            held_stats: carry.held,
            inflated: carry.inflated,
            stats: lock(&self.shared.stats).clone(),
        }))
    }
    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        let crate::DeviceState::Balloon(b) = state else {
            return Err(format!("{} state for a balloon", state.kind()));
        };
        if let Some(h) = b.held_stats.filter(|&h| h >= QUEUE_MAX_SIZE) {
            return Err(format!("held stats buffer {h} is outside the queue"));
        }
        let mut end = 0u64;
        for &(first, n) in &b.inflated {
            if first < end || n == 0 {
                return Err("inflated frames are not sorted, disjoint runs".into());
            }
            end = first
                .checked_add(n)
                .ok_or("an inflated run overflows the frame numbers")?;
        }
        self.shared.num_pages.store(b.num_pages, SeqCst);
        self.shared.actual.store(b.actual, SeqCst);
        self.shared
            .stats_interval_ms
            .store(b.stats_interval_ms, SeqCst);
        *lock(&self.shared.stats) = b.stats.clone();
        self.carry = Some(Carry {
            held: b.held_stats,
            inflated: b.inflated.clone(),
        });
        Ok(())
    }
}

/// Inflates or deflates the frames listed in `chain` (le32 PFNs).
fn balloon_chain(
    chain: Chain<'_>,
    mem: &GuestMemory,
    ram: &mut [RamRegion],
    shared: &Shared,
    inflate: bool,
) {
    let Ok(mut reader) = chain.reader(mem) else {
        return; // descriptors outside guest memory: drop the request
    };
    let mut left = reader.available_bytes().min(MAX_PFN_BYTES) & !3;
    let (mut changed, mut ignored) = (0u64, 0u64);
    let mut run: Option<(usize, u64, u64)> = None; // (region, first pfn, pages)
    let mut buf = [0u8; 4096];
    let mut region = 0usize;
    while left > 0 {
        let n = left.min(buf.len());
        if reader.read_exact(&mut buf[..n]).is_err() {
            break;
        }
        left -= n;
        let mut pfns: Vec<u64> = buf[..n]
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        pfns.sort_unstable();
        for pfn in pfns {
            if !ram.get(region).is_some_and(|r| r.contains(pfn)) {
                match ram.iter().position(|r| r.contains(pfn)) {
                    Some(i) => region = i,
                    None => {
                        ignored += 1;
                        continue;
                    }
                }
            }
            if !ram[region].flip(pfn, inflate) {
                ignored += 1;
                continue;
            }
            changed += 1;
            if !inflate {
                continue;
            }
            run = match run {
                Some((r, first, len)) if r == region && first + len == pfn => {
                    Some((r, first, len + 1))
                }
                Some((r, first, len)) => {
                    release(mem, &ram[r], first, len, shared);
                    Some((region, pfn, 1))
                }
                None => Some((region, pfn, 1)),
            };
        }
    }
    if let Some((r, first, len)) = run {
        release(mem, &ram[r], first, len, shared);
    }
    if inflate {
        shared.inflated_pages.fetch_add(changed, SeqCst);
    } else {
        shared.inflated_pages.fetch_sub(changed, SeqCst);
    }
    shared.ignored_pfns.fetch_add(ignored, SeqCst);
}

/// Parses a stats buffer; `None` if it cannot be read at all.
fn parse_stats(chain: Chain<'_>, mem: &GuestMemory) -> Option<BalloonStats> {
    let mut reader = chain.reader(mem).ok()?;
    let n = reader.available_bytes().min(MAX_STATS_BYTES);
    let mut buf = vec![0u8; n];
    reader.read_exact(&mut buf).ok()?;
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    let mut s = BalloonStats {
        updated_unix_ms: since_epoch.map_or(0, |d| d.as_millis() as u64),
        ..BalloonStats::default()
    };
    for e in buf.chunks_exact(STAT_LEN) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..]);
        match stat_slot(&mut s, tag) {
            Some(slot) => *slot = Some(u64::from_le_bytes(v)),
            None => s.unknown_tags = s.unknown_tags.saturating_add(1),
        }
    }
    Some(s)
}

struct BalloonHandler {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
    /// Inflate and deflate queues.
    pfn_queues: [(Queue, EventFd); 2],
    stats: Option<(Queue, EventFd)>,
    stats_vq: bool,
    /// The stats buffer the device holds until it wants fresh numbers.
    held: Option<u16>,
    kick: EventFd,
    timer: TimerFd,
    armed_ms: u64,
    ram: Vec<RamRegion>,
}

impl BalloonHandler {
    fn queue_err(queue: u16) -> impl Fn(virtio_queue::Error) -> DeviceError {
        move |source| DeviceError::Queue { queue, source }
    }

    /// Arms the refresh timer with the handle's interval, if it changed.
    fn rearm(&mut self) {
        let ms = self.shared.stats_interval_ms.load(SeqCst);
        if ms == self.armed_ms || !self.stats_vq {
            return;
        }
        let every = Duration::from_millis(ms);
        let res = if ms == 0 {
            self.timer.clear()
        } else {
            self.timer.reset(every, Some(every))
        };
        match res {
            Ok(()) => self.armed_ms = ms,
            Err(e) => tracing::warn!("balloon: cannot arm the stats timer: {e}"),
        }
    }

    /// Takes new stats buffers: records them and holds the newest.
    fn stats_posted(&mut self) -> Result<(), DeviceError> {
        let Some((queue, event)) = self.stats.as_mut() else {
            return Ok(());
        };
        let _ = event.read();
        let (mem, err) = (&self.mem, Self::queue_err(STATS as u16));
        let mut used_any = false;
        loop {
            queue.disable_notification(mem).map_err(&err)?;
            let mut popped = 0usize;
            loop {
                let chain = queue.iter(mem).map_err(&err)?.next();
                let Some(chain) = chain else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                if let Some(stats) = parse_stats(chain, mem) {
                    *lock(&self.shared.stats) = Some(stats);
                }
                // A driver posting several buffers gets the older ones back at once.
                if let Some(old) = self.held.replace(head) {
                    queue.add_used(mem, old, 0).map_err(&err)?;
                    used_any = true;
                }
            }
            if !crate::rearm(queue, mem, STATS as u16, popped)? {
                break;
            }
        }
        if used_any && queue.needs_notification(mem).map_err(&err)? {
            self.interrupt.signal_queue(STATS as u16);
        }
        Ok(())
    }

    /// Gives the held stats buffer back so the driver refills it.
    fn refresh_stats(&mut self) -> Result<(), DeviceError> {
        let (Some((queue, _)), Some(head)) = (self.stats.as_mut(), self.held) else {
            return Ok(());
        };
        let err = Self::queue_err(STATS as u16);
        queue.add_used(&self.mem, head, 0).map_err(&err)?;
        self.held = None;
        if queue.needs_notification(&self.mem).map_err(&err)? {
            self.interrupt.signal_queue(STATS as u16);
        }
        Ok(())
    }
}

impl EventHandler for BalloonHandler {
    fn handle(&mut self, token: u64) -> Result<(), DeviceError> {
        match token {
            INFLATE | DEFLATE => {
                let (queue, event) = &mut self.pfn_queues[token as usize];
                let _ = event.read();
                let (mem, ram, shared) = (&self.mem, &mut self.ram, &*self.shared);
                process_queue(queue, token as u16, mem, &*self.interrupt, |chain| {
                    balloon_chain(chain, mem, ram, shared, token == INFLATE);
                    Some(0)
                })
            }
            STATS => self.stats_posted(),
            TOKEN_KICK => {
                let _ = self.kick.read();
                self.rearm();
                if self.shared.stats_requested.swap(false, SeqCst) {
                    self.refresh_stats()?;
                }
                Ok(())
            }
            // Non-blocking read: nothing to do if a re-arm already consumed the expiry.
            TOKEN_TIMER => match self.timer.wait() {
                Ok(n) if n > 0 => self.refresh_stats(),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;
