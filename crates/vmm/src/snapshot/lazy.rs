//! Guest memory restored on demand, and checked as it arrives.
//!
//! A restored VM's RAM is fresh anonymous memory registered with userfaultfd: nothing of the
//! snapshot's memory part is read when the VM starts. The first touch of a page (by a vCPU
//! through KVM, a device thread, or the kernel on the VMM's behalf) waits while the pager
//! thread reads the page's whole chunk (`keel_snapshot::CHUNK`) from the part, checks it
//! against the chunk digest the snapshot's state lists, and copies its non-zero pages in
//! (zero pages get the shared zero page). A chunk that does not match stops the VM: no byte
//! the check did not pass reaches the guest, and the memory file cannot be changed under a
//! running VM either (each chunk is read once, into the VMM's buffer, and checked there).
//!
//! So a restore costs the same for any guest size; the work moves to first use. Beside the
//! guest, a checker thread reads and checks the chunks not yet used, so a corrupted snapshot
//! is still refused within moments of its start even where the guest never looks.

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

/// Bytes filled around a fault before the rest of its chunk: the faulting thread goes on
/// after these.
const WINDOW: u64 = 16 * PAGE as u64;
/// The rest of a chunk is filled in batches of this many bytes, with the faults waiting on
/// the chunk served in between.
const BATCH: u64 = 64 * PAGE as u64;

/// The host range of the [`WINDOW`] holding `page`, inside the chunk piece that holds it.
fn window(page: u64, pieces: &[(u64, usize, u64)]) -> Option<(u64, u64)> {
    let &(host, _, len) = pieces
        .iter()
        .find(|(h, _, l)| (*h..*h + *l).contains(&page))?;
    let a = (page - page % WINDOW).max(host);
    Some((a, (a + WINDOW).min(host + len)))
}

/// One guest RAM range: where the VMM maps it and where it sits in the memory part.
#[derive(Clone, Copy, Debug)]
struct Segment {
    host: u64,
    file: u64,
    len: u64,
    gpa: u64,
}

struct Loader {
    /// By chunk: read, checked and in guest memory (or the VM is stopping).
    loaded: Vec<bool>,
    buf: Vec<u8>,
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
                loaded: vec![false; chunks as usize],
                buf: vec![0; CHUNK as usize],
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
        // The chunk buffer's pages, faulted in before the first fault needs them (on a
        // nested host a fresh page costs microseconds: a 4 MiB buffer, milliseconds).
        {
            let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
            for p in loader.buf.chunks_mut(PAGE) {
                // SAFETY: a volatile write of one byte inside the buffer, so the compiler
                // keeps the touch of a page that already holds zeros.
                unsafe { std::ptr::write_volatile(p.as_mut_ptr(), 0) };
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

    /// The segment holding host address `addr`, and `addr`'s offset in the part.
    fn locate(&self, addr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| (s.host..s.host + s.len).contains(&addr))
            .map(|s| s.file + (addr - s.host))
    }

    fn handle(&self, fault: Fault) {
        // Faults met while a chunk was being filled, on other chunks.
        let mut later = vec![fault];
        while let Some(f) = later.pop() {
            self.handle_one(f, &mut later);
        }
    }

    fn handle_one(&self, fault: Fault, later: &mut Vec<Fault>) {
        let t = Instant::now();
        self.faults.fetch_add(1, Ordering::Relaxed);
        let page = fault.address & !(PAGE as u64 - 1);
        let Some(offset) = self.locate(page) else {
            // Registered memory is exactly the segments: cannot happen; do not leave the
            // faulting thread waiting.
            let _ = self.uffd.zeropage(page, PAGE as u64);
            return;
        };
        let chunk = offset / CHUNK;
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        let result = match loader.loaded.get(chunk as usize) {
            // A page of a loaded chunk that is missing again (the balloon gave it back):
            // zeros, as for any fresh page.
            Some(true) | None => self
                .uffd
                .zeropage(page, PAGE as u64)
                .map_err(|e| e.to_string()),
            Some(false) => self.load(&mut loader, chunk, page, later),
        };
        drop(loader);
        if let Err(e) = result {
            self.fail(format!("cannot fill guest memory at {page:#x}: {e}"));
            let _ = self.uffd.zeropage(page, PAGE as u64);
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns.fetch_add(ns, Ordering::Relaxed);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let gpa = self
                .segments
                .iter()
                .find(|s| (s.host..s.host + s.len).contains(&page))
                .map_or(0, |s| s.gpa + (page - s.host));
            tracing::debug!(
                "memory pager: {} fault at {gpa:#x} (chunk {chunk}) served in {} us",
                if fault.write { "write" } else { "read" },
                ns / 1000
            );
        }
    }

    /// The pieces of chunk `chunk` in guest memory: (host address, offset in the chunk, length).
    fn pieces(&self, chunk: u64) -> Vec<(u64, usize, u64)> {
        let start = chunk * CHUNK;
        let end = (start + CHUNK).min(self.len);
        self.segments
            .iter()
            .filter_map(|s| {
                let a = start.max(s.file);
                let b = end.min(s.file + s.len);
                (a < b).then(|| (s.host + (a - s.file), (a - start) as usize, b - a))
            })
            .collect()
    }

    /// Reads and checks chunk `chunk`, then copies it in (the loader is held): first the
    /// [`WINDOW`] around `page`, which lets the faulting thread go on, then the rest in
    /// [`BATCH`]es, serving faults on this chunk in between (its checked bytes are at hand)
    /// and keeping faults on other chunks in `later`.
    fn load(
        &self,
        loader: &mut Loader,
        chunk: u64,
        page: u64,
        later: &mut Vec<Fault>,
    ) -> Result<(), String> {
        let Loader { loaded, buf } = loader;
        if let Some(l) = loaded.get_mut(chunk as usize) {
            *l = true;
        }
        let digest = read_chunk(&self.file, self.len, chunk, buf);
        let good = match &digest {
            Ok(d) => self.digests.get(chunk as usize) == Some(d),
            Err(_) => false,
        };
        let pieces = self.pieces(chunk);
        if !good {
            self.fail(match digest {
                Err(e) => format!("cannot read snapshot memory chunk {chunk}: {e}"),
                Ok(_) => self.corrupted(chunk),
            });
            // The waiting thread goes on (on zeros) while the VM stops.
            for (host, _, len) in pieces {
                self.uffd.zeropage(host, len).map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        self.chunks_loaded.fetch_add(1, Ordering::Relaxed);
        let first = window(page, &pieces);
        if let Some((a, b)) = first {
            self.fill_range(buf, &pieces, a, b)?;
        }
        for &(host, _, len) in &pieces {
            let mut a = host;
            while a < host + len {
                let b = (a + BATCH).min(host + len);
                // What the first window did not fill.
                match first {
                    Some((wa, wb)) if wa < b && a < wb => {
                        self.fill_range(buf, &pieces, a, wa.max(a))?;
                        self.fill_range(buf, &pieces, wb.min(b), b)?;
                    }
                    _ => self.fill_range(buf, &pieces, a, b)?,
                }
                self.serve_during(chunk, buf, &pieces, later)?;
                a = b;
            }
        }
        Ok(())
    }

    /// While chunk `chunk` (checked, in `buf`) is being copied in: serves the faults waiting
    /// on it at once, and keeps the others for later.
    fn serve_during(
        &self,
        chunk: u64,
        buf: &[u8],
        pieces: &[(u64, usize, u64)],
        later: &mut Vec<Fault>,
    ) -> Result<(), String> {
        while let Some(f) = self.uffd.next_fault().map_err(|e| e.to_string())? {
            let page = f.address & !(PAGE as u64 - 1);
            if self.locate(page).map(|o| o / CHUNK) != Some(chunk) {
                later.push(f);
                continue;
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
            if let Some((a, b)) = window(page, pieces) {
                self.fill_range(buf, pieces, a, b)?;
            }
        }
        Ok(())
    }

    /// Copies host range `[from, to)` of a chunk in from its checked bytes `buf`: runs of
    /// non-zero pages by copy, runs of zero pages as the zero page. Pages already there stay.
    fn fill_range(
        &self,
        buf: &[u8],
        pieces: &[(u64, usize, u64)],
        from: u64,
        to: u64,
    ) -> Result<(), String> {
        for &(host, at, len) in pieces {
            let (a, b) = (from.max(host), to.min(host + len));
            if a >= b {
                continue;
            }
            let lo = at + (a - host) as usize;
            let bytes = buf
                .get(lo..lo + (b - a) as usize)
                .ok_or_else(|| format!("host range {a:#x}..{b:#x} outside its chunk"))?;
            let mut run_start = 0usize;
            let mut run_zero = None;
            for (i, p) in bytes.chunks(PAGE).enumerate() {
                let zero = keel_snapshot::is_zero_page(p);
                match run_zero {
                    Some(z) if z != zero => {
                        self.fill(a, bytes, run_start, i * PAGE, z)?;
                        run_start = i * PAGE;
                    }
                    _ => {}
                }
                run_zero = Some(zero);
            }
            if let Some(z) = run_zero {
                self.fill(a, bytes, run_start, bytes.len(), z)?;
            }
        }
        Ok(())
    }

    fn fill(
        &self,
        host: u64,
        bytes: &[u8],
        from: usize,
        to: usize,
        zero: bool,
    ) -> Result<(), String> {
        let dst = host + from as u64;
        if zero {
            self.uffd.zeropage(dst, (to - from) as u64)
        } else {
            let src = bytes.get(from..to).unwrap_or_default();
            self.uffd.copy(dst, src).map(|n| {
                self.bytes_copied.fetch_add(n, Ordering::Relaxed);
            })
        }
        .map_err(|e| e.to_string())
    }

    /// On the checker thread: checks every chunk not loaded yet, until `quit`.
    pub(crate) fn check_unused(&self, quit: &AtomicBool) {
        let t = Instant::now();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut extents = Vec::new();
        let mut checked = 0u64;
        for chunk in 0..self.digests.len() as u64 {
            if quit.load(Ordering::Relaxed) || self.failure.get().is_some() {
                return;
            }
            if self.is_loaded(chunk) {
                continue;
            }
            match keel_snapshot::read_chunk_data(
                &self.file,
                self.len,
                chunk,
                &mut buf,
                &mut extents,
            ) {
                Ok(d) if self.digests.get(chunk as usize) == Some(&d) => checked += 1,
                Ok(_) => return self.fail(self.corrupted(chunk)),
                Err(e) => {
                    return self.fail(format!("cannot read snapshot memory chunk {chunk}: {e}"))
                }
            }
        }
        let took = t.elapsed();
        self.checked_in_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1),
            Ordering::Relaxed,
        );
        tracing::info!(
            "snapshot memory checked beside the guest: {checked} unused chunks in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
    }

    fn is_loaded(&self, chunk: u64) -> bool {
        let loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        loader.loaded.get(chunk as usize).copied().unwrap_or(true)
    }

    /// By chunk: whether its pages are still only in the memory part (for a snapshot of the
    /// VM, taken with the vCPUs and devices paused).
    pub(crate) fn unloaded(&self) -> Vec<bool> {
        let loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        loader.loaded.iter().map(|l| !l).collect()
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
