//! Guest memory restored on demand, and checked as it arrives.
//!
//! A restored VM's RAM is fresh anonymous memory registered with userfaultfd: nothing of the
//! snapshot's memory part is read when the VM starts. The first touch of a page (by a vCPU
//! through KVM, a device thread, or the kernel on the VMM's behalf) waits while the pager
//! thread reads the page's chunk (`keel_snapshot::CHUNK`) from the part into a buffer of its
//! own, checks it against the chunk digest the snapshot's state lists, and fills the
//! [`WINDOW`] around the page from that buffer (non-zero pages copied, zero pages mapped to
//! the shared zero page). The last few checked chunks stay in buffers, so the next faults on
//! them cost a copy only; a chunk read again later is checked again. A chunk that does not
//! match stops the VM: no byte the check did not pass reaches the guest, and changing the
//! memory file under a running VM changes nothing the guest sees.
//!
//! Nothing is copied before the guest asks, so a restore costs the same for any guest size.
//! Which pages were filled is kept (a bit per page): one filled and missing again was given
//! back through the balloon and reads as zeros, and a snapshot of the VM takes the pages never
//! filled from the part. Beside the guest, a checker thread goes through every chunk, checks
//! it and fills what the guest has not touched: a corrupted snapshot is still refused within
//! moments of its start even where the guest never looks, and no page stays missing longer
//! than that pass.

use crate::exit::ExitReason;
use crate::memory::GuestRam;
use crate::runner::StopState;
use keel_snapshot::{read_chunk, CHUNK, PAGE};
use keel_uffd::{Fault, Uffd};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

/// Bytes filled around a faulting page (aligned, within its chunk and RAM range).
const WINDOW: u64 = 32 * PAGE as u64;
/// Checked chunks kept in buffers for the next faults on them.
const CACHED_CHUNKS: usize = 2;

/// One guest RAM range: where the VMM maps it and where it sits in the memory part.
#[derive(Clone, Copy, Debug)]
struct Segment {
    host: u64,
    file: u64,
    len: u64,
    gpa: u64,
}

/// A checked chunk's bytes (holes zeroed).
struct Cached {
    chunk: u64,
    buf: Vec<u8>,
}

struct Loader {
    /// By chunk: read and checked by the pager (or found bad): the checker skips it.
    checked: Vec<bool>,
    /// By page of the part, a bit each: put in guest memory once (copied or zero-mapped).
    filled: Vec<u64>,
    /// Recently checked chunks, the most recent last.
    cache: Vec<Cached>,
    /// Buffers for chunks to come (faulted in before they are needed).
    spare: Vec<Vec<u8>>,
}

/// Bit `page` of a page bitmap (`None` past its end).
pub(crate) fn page_bit(bits: &[u64], page: u64) -> Option<bool> {
    bits.get((page / 64) as usize)
        .map(|w| w & (1 << (page % 64)) != 0)
}

fn set_page_bits(bits: &mut [u64], pages: std::ops::Range<u64>) {
    for p in pages {
        if let Some(w) = bits.get_mut((p / 64) as usize) {
            *w |= 1 << (p % 64);
        }
    }
}

/// The memory of a VM restored from a snapshot, served on first use.
pub(crate) struct LazyMemory {
    uffd: Uffd,
    file: File,
    len: u64,
    digests: Vec<[u8; 32]>,
    segments: Vec<Segment>,
    loader: Mutex<Loader>,
    failure: OnceLock<String>,
    stop: OnceLock<Arc<StopState>>,
    faults: AtomicU64,
    chunks_loaded: AtomicU64,
    bytes_copied: AtomicU64,
    busy_ns: AtomicU64,
    /// Microseconds the checker took (`u64::MAX` until it finished).
    checked_in_us: AtomicU64,
}

impl LazyMemory {
    /// Registers `ram` (fresh, untouched anonymous memory laid out like the part) to be
    /// filled from the memory part `file` on first use, each chunk checked against
    /// `digests`. Nothing is read yet; faults wait until [`LazyMemory::serve`] runs.
    pub(crate) fn new(
        file: File,
        ram: &GuestRam,
        digests: Vec<[u8; 32]>,
    ) -> Result<Arc<LazyMemory>, String> {
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut segments = Vec::new();
        let mut offset = 0u64;
        for region in ram.all.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| e.to_string())? as u64;
            segments.push(Segment {
                host,
                file: offset,
                len: region.len(),
                gpa: region.start_addr().0,
            });
            offset += region.len();
        }
        if offset != len {
            return Err(format!(
                "the memory part is {len} bytes; the VM's memory needs {offset}"
            ));
        }
        let chunks = keel_snapshot::chunk_count(len);
        if digests.len() as u64 != chunks {
            return Err(format!(
                "{} chunk digests for a memory part of {chunks} chunks",
                digests.len()
            ));
        }
        let uffd = Uffd::new().map_err(|e| e.to_string())?;
        for s in &segments {
            uffd.register(s.host, s.len).map_err(|e| e.to_string())?;
        }
        Ok(Arc::new(LazyMemory {
            uffd,
            file,
            len,
            digests,
            segments,
            loader: Mutex::new(Loader {
                checked: vec![false; chunks as usize],
                filled: vec![0; (len / PAGE as u64).div_ceil(64) as usize],
                cache: Vec::new(),
                spare: Vec::new(),
            }),
            failure: OnceLock::new(),
            stop: OnceLock::new(),
            faults: AtomicU64::new(0),
            chunks_loaded: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            checked_in_us: AtomicU64::new(u64::MAX),
        }))
    }

    /// From now on a failed check stops the VM through `stop` (and one before did already).
    pub(crate) fn attach(&self, stop: Arc<StopState>) {
        let stop = self.stop.get_or_init(|| stop);
        if let Some(f) = self.failure.get() {
            stop.request(ExitReason::SnapshotMemory { error: f.clone() });
        }
    }

    /// Why the memory cannot be trusted, if a check failed.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// What the pager did so far (`info` reports it).
    pub(crate) fn stats(&self) -> keel_api::PagerInfo {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        keel_api::PagerInfo {
            faults: g(&self.faults),
            chunks_loaded: g(&self.chunks_loaded),
            chunks: self.digests.len() as u64,
            bytes_copied: g(&self.bytes_copied),
            busy_us: g(&self.busy_ns) / 1000,
            checked_in_us: Some(g(&self.checked_in_us)).filter(|&us| us != u64::MAX),
        }
    }

    fn fail(&self, error: String) {
        if self.failure.set(error.clone()).is_ok() {
            tracing::error!("{error}; stopping the VM");
            if let Some(stop) = self.stop.get() {
                stop.request(ExitReason::SnapshotMemory { error });
            }
        }
    }

    fn corrupted(&self, chunk: u64) -> String {
        let start = chunk * CHUNK;
        let end = (start + CHUNK).min(self.len);
        format!(
            "snapshot memory is corrupted: chunk {chunk} (bytes {start:#x}..{end:#x} of the \
             memory part) does not match its digest"
        )
    }

    /// Serves faults until `quit` is readable. Whoever touches guest memory must be done
    /// before `quit` is written (a fault after it waits until the descriptor is closed).
    pub(crate) fn serve(&self, quit: &EventFd) {
        // A chunk buffer, its pages faulted in before the first fault needs them (on a
        // nested host a fresh page costs microseconds: a 4 MiB buffer, milliseconds).
        {
            let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
            if loader.cache.is_empty() && loader.spare.is_empty() {
                let mut buf = vec![0u8; CHUNK as usize];
                for p in buf.chunks_mut(PAGE) {
                    // SAFETY: a volatile write of one byte inside the buffer, so the
                    // compiler keeps the touch of a page that already holds zeros.
                    unsafe { std::ptr::write_volatile(p.as_mut_ptr(), 0) };
                }
                loader.spare.push(buf);
            }
        }
        loop {
            match self.uffd.wait(Some(quit.as_raw_fd()), -1) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => return self.fail(format!("the memory pager stopped: {e}")),
            }
            loop {
                match self.uffd.next_fault() {
                    Ok(Some(f)) => self.handle(f),
                    Ok(None) => break,
                    Err(e) => return self.fail(format!("the memory pager stopped: {e}")),
                }
            }
        }
    }

    /// The segment holding host address `addr`.
    fn segment(&self, addr: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| (s.host..s.host + s.len).contains(&addr))
    }

    fn handle(&self, fault: Fault) {
        let t = Instant::now();
        self.faults.fetch_add(1, Ordering::Relaxed);
        let page = fault.address & !(PAGE as u64 - 1);
        let Some(seg) = self.segment(page).copied() else {
            // Registered memory is exactly the segments: cannot happen; do not leave the
            // faulting thread waiting.
            let _ = self.uffd.zeropage(page, PAGE as u64);
            return;
        };
        let offset = seg.file + (page - seg.host);
        let chunk = offset / CHUNK;
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        let result = if page_bit(&loader.filled, offset / PAGE as u64) == Some(true) {
            // Filled once and missing again: the balloon gave it back. Zeros, as for any
            // fresh page.
            self.uffd
                .zeropage(page, PAGE as u64)
                .map_err(|e| e.to_string())
        } else {
            self.fill_window(&mut loader, &seg, offset)
        };
        drop(loader);
        if let Err(e) = result {
            self.fail(format!("cannot fill guest memory at {page:#x}: {e}"));
            let _ = self.uffd.zeropage(page, PAGE as u64);
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        tracing::debug!(
            "memory pager: {} fault at {:#x} (chunk {chunk}) served in {} us",
            if fault.write { "write" } else { "read" },
            seg.gpa + (page - seg.host),
            ns / 1000
        );
    }

    /// The cache slot of chunk `chunk`, read and checked if it is not there; `None` if it
    /// failed its check (the VM is stopping).
    fn cached(&self, loader: &mut Loader, chunk: u64, on_fault: bool) -> Option<usize> {
        if let Some(i) = loader.cache.iter().position(|c| c.chunk == chunk) {
            let c = loader.cache.remove(i);
            loader.cache.push(c);
            return Some(loader.cache.len() - 1);
        }
        let mut buf = match loader.spare.pop() {
            Some(b) => b,
            None if loader.cache.len() >= CACHED_CHUNKS => loader.cache.remove(0).buf,
            None => vec![0; CHUNK as usize],
        };
        let digest = read_chunk(&self.file, self.len, chunk, &mut buf);
        let first = match loader.checked.get_mut(chunk as usize) {
            Some(c) => !std::mem::replace(c, true),
            None => false,
        };
        match digest {
            Ok(d) if self.digests.get(chunk as usize) == Some(&d) => {
                if first && on_fault {
                    self.chunks_loaded.fetch_add(1, Ordering::Relaxed);
                }
                loader.cache.push(Cached { chunk, buf });
                Some(loader.cache.len() - 1)
            }
            other => {
                loader.spare.push(buf);
                self.fail(match other {
                    Err(e) => format!("cannot read snapshot memory chunk {chunk}: {e}"),
                    Ok(_) => self.corrupted(chunk),
                });
                None
            }
        }
    }

    /// Fills the [`WINDOW`] around part offset `offset` (in segment `seg`) from its checked
    /// chunk, skipping pages filled before; zeros if the chunk failed its check.
    fn fill_window(&self, loader: &mut Loader, seg: &Segment, offset: u64) -> Result<(), String> {
        let chunk = offset / CHUNK;
        let page = PAGE as u64;
        let start = (offset - offset % WINDOW).max(seg.file);
        let end = (start + WINDOW).min(seg.file + seg.len).min(self.len);
        let slot = self.cached(loader, chunk, true);
        let Loader { filled, cache, .. } = loader;
        let bytes_of = |off: u64| -> Option<&[u8]> {
            let c = cache.get(slot?)?;
            let at = (off - chunk * CHUNK) as usize;
            c.buf.get(at..at + PAGE)
        };
        // Runs of pages not filled yet, split where zero and non-zero pages meet.
        let mut run: Option<(u64, bool)> = None;
        let mut data: Vec<u8> = Vec::new();
        let mut off = start;
        while off <= end {
            let next = if off < end {
                if page_bit(filled, off / page) == Some(true) {
                    None
                } else {
                    let bytes = bytes_of(off);
                    Some(bytes.is_none_or(keel_snapshot::is_zero_page))
                }
            } else {
                None
            };
            // Close the open run when this page does not continue it.
            if let Some((from, zero)) = run {
                if next != Some(zero) {
                    let host = seg.host + (from - seg.file);
                    if zero {
                        self.uffd
                            .zeropage(host, off - from)
                            .map_err(|e| e.to_string())?;
                    } else {
                        let n = self.uffd.copy(host, &data).map_err(|e| e.to_string())?;
                        self.bytes_copied.fetch_add(n, Ordering::Relaxed);
                    }
                    set_page_bits(filled, from / page..off / page);
                    data.clear();
                    run = None;
                }
            }
            if let Some(zero) = next {
                if run.is_none() {
                    run = Some((off, zero));
                }
                if !zero {
                    data.extend_from_slice(bytes_of(off).unwrap_or_default());
                }
            }
            off += page;
        }
        Ok(())
    }

    /// On the checker thread: checks every chunk and fills what the guest has not touched
    /// yet, chunk by chunk, until `quit`. Beside the lazy start this bounds how long any
    /// page stays missing: after it, guest memory is all in place (and a corrupted chunk
    /// found even where the guest never looks).
    pub(crate) fn check_unused(&self, quit: &AtomicBool) {
        let t = Instant::now();
        let page = PAGE as u64;
        for chunk in 0..self.digests.len() as u64 {
            if quit.load(Ordering::Relaxed) || self.failure.get().is_some() {
                return;
            }
            // One chunk at a time under the loader: a fault meanwhile waits for a chunk's
            // worth of copying at most.
            let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
            if self.cached(&mut loader, chunk, false).is_none() {
                return; // failed its check: the VM is stopping
            }
            let (start, end) = (chunk * CHUNK, ((chunk + 1) * CHUNK).min(self.len));
            let segments: Vec<Segment> = self
                .segments
                .iter()
                .filter(|s| s.file < end && start < s.file + s.len)
                .copied()
                .collect();
            for seg in segments {
                let mut off = start.max(seg.file);
                let last = end.min(seg.file + seg.len);
                while off < last {
                    if let Err(e) = self.fill_window(&mut loader, &seg, off) {
                        return self.fail(format!("cannot fill guest memory: {e}"));
                    }
                    off = (off - off % WINDOW + WINDOW).max(off + page);
                }
            }
        }
        let took = t.elapsed();
        self.checked_in_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
        tracing::info!(
            "snapshot memory checked and filled beside the guest in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
    }

    /// By page of the part, a bit each: whether it was ever put in guest memory (for a
    /// snapshot of the VM, taken with the vCPUs and devices paused: the others are still
    /// only in the part).
    pub(crate) fn filled_pages(&self) -> Vec<u64> {
        let loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        loader.filled.clone()
    }

    /// Reads chunk `chunk` of the part into `buf` and checks it (for a snapshot of the VM:
    /// what it copies from the part must be what this VM was restored from). Only the
    /// bytes in `extents` (the chunk's data) are read; the rest are zeros.
    pub(crate) fn read_checked(
        &self,
        chunk: u64,
        buf: &mut [u8],
        extents: &mut Vec<std::ops::Range<usize>>,
    ) -> std::io::Result<()> {
        let d = keel_snapshot::read_chunk_data(&self.file, self.len, chunk, buf, extents)?;
        if self.digests.get(chunk as usize) != Some(&d) {
            return Err(std::io::Error::other(self.corrupted(chunk)));
        }
        Ok(())
    }
}

/// The pager and checker threads of a running VM; stopped and joined on drop (after every
/// other thread that may touch guest memory).
pub(crate) struct PagerThreads {
    quit: Arc<EventFd>,
    quit_check: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    lazy: Arc<LazyMemory>,
}

impl PagerThreads {
    /// Starts the pager (and the checker) on `lazy`, each under the pager seccomp filter.
    pub(crate) fn start(
        lazy: Arc<LazyMemory>,
        stop: Arc<StopState>,
        seccomp: bool,
    ) -> Result<PagerThreads, crate::VmmError> {
        lazy.attach(stop);
        let quit =
            Arc::new(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| crate::VmmError::Io {
                    what: "pager eventfd",
                    source,
                })?,
            );
        let quit_check = Arc::new(AtomicBool::new(false));
        let mut me = PagerThreads {
            quit: quit.clone(),
            quit_check: quit_check.clone(),
            threads: Vec::new(),
            lazy: lazy.clone(),
        };
        let spawn = |name: &str, nice: i32, f: Box<dyn FnOnce() + Send>| {
            let l = lazy.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if nice != 0 {
                        // SAFETY: setpriority on this thread (its tid) with a plain nice value.
                        unsafe {
                            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as u32, nice)
                        };
                    }
                    // Unconfined it must not run: the VM stops instead.
                    if let Err(e) = crate::confine::apply(seccomp, keel_seccomp::ThreadKind::Pager)
                    {
                        return l.fail(e);
                    }
                    f()
                })
                .map_err(|source| crate::VmmError::Io {
                    what: "spawning the memory pager",
                    source,
                })
        };
        let l = lazy.clone();
        me.threads
            .push(spawn("pager", 0, Box::new(move || l.serve(&quit)))?);
        // Behind the guest: the check only has to finish soon, not first.
        let l = lazy.clone();
        me.threads.push(spawn(
            "mem-check",
            10,
            Box::new(move || l.check_unused(&quit_check)),
        )?);
        Ok(me)
    }
}

impl Drop for PagerThreads {
    fn drop(&mut self) {
        self.quit_check.store(true, Ordering::Relaxed);
        let _ = self.quit.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = self.lazy.stats();
        tracing::info!(
            "memory pager: {} faults, {} of {} chunks loaded on first use ({} MiB), {:.1} ms serving",
            s.faults,
            s.chunks_loaded,
            s.chunks,
            s.bytes_copied >> 20,
            s.busy_us as f64 / 1000.0
        );
    }
}

#[cfg(test)]
#[path = "lazy_tests.rs"]
mod tests;
