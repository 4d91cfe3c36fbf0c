//! Post-copy, the destination's side: the VM runs here before all of its memory is here.
//! The pages the source still holds ("stale": written there since they were last sent) are
//! dropped here and marked; guest memory stays registered with userfaultfd, so the first
//! touch of any missing page stops its thread until it is served: a stale page is asked for
//! (`Want`) and placed when it arrives (`UFFDIO_COPY` wakes whoever waits), any other missing
//! page was never written on the source and gets the zero page. Meanwhile the source pushes
//! every stale page; once the last is in (`Complete`), the userfaultfd is closed and memory
//! is plain memory again.
//!
//! Before the jail a thread of the set-up serves faults and takes pages while the VM is built
//! and until the source's `Go` (`serve_until_go`); once the VM runs, two confined threads do
//! (`PostcopyThreads`): one takes pages, one serves faults. If the source goes away first,
//! the VM stops (`ExitReason::MigrationLost`): its memory is split between the hosts.

use super::pages::Filler;
use crate::exit::ExitReason;
use crate::runner::StopState;
use keel_migration::{Channel, ChannelRx, ChannelTx, Incoming, Message, PAGE};
use keel_uffd::{Fault, Uffd};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest pages the source still holds, one bit per guest-physical page.
pub(crate) struct Stale {
    bits: Vec<AtomicU64>,
    left: AtomicU64,
}

impl Stale {
    pub(crate) fn new(end_page: u64) -> Stale {
        Stale {
            bits: (0..end_page.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            left: AtomicU64::new(0),
        }
    }

    fn word(&self, page: u64) -> Option<(&AtomicU64, u64)> {
        let w = self.bits.get(usize::try_from(page / 64).ok()?)?;
        Some((w, 1u64 << (page % 64)))
    }

    /// Marks `count` pages from `first` (inside guest RAM: the caller checked).
    pub(crate) fn mark(&self, first: u64, count: u64) {
        for p in first..first.saturating_add(count) {
            if let Some((w, bit)) = self.word(p) {
                if w.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                    self.left.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Clears `count` pages from `first` (they arrived).
    pub(crate) fn clear(&self, first: u64, count: u64) {
        for p in first..first.saturating_add(count) {
            if let Some((w, bit)) = self.word(p) {
                if w.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    self.left.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    pub(crate) fn contains(&self, page: u64) -> bool {
        self.word(page)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    pub(crate) fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }
}

/// Guest memory while post-copy runs.
pub(crate) struct Remote {
    pub filler: Filler,
    uffd: Arc<Uffd>,
    pub stale: Stale,
    /// (host address, guest-physical address, length) of each region.
    regions: Vec<(u64, u64, u64)>,
    /// The source said every stale page was sent.
    complete: AtomicBool,
}

impl Remote {
    pub(crate) fn new(filler: Filler, stale: Stale) -> Result<Remote, String> {
        let uffd = filler
            .uffd()
            .cloned()
            .ok_or("post-copy needs userfaultfd on the destination, which this host refuses")?;
        let regions = filler
            .mem()
            .iter()
            .map(|r| {
                let host = r
                    .get_host_address(MemoryRegionAddress(0))
                    .map_err(|e| e.to_string())?;
                Ok((host as u64, r.start_addr().0, r.len()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Remote {
            filler,
            uffd,
            stale,
            regions,
            complete: AtomicBool::new(false),
        })
    }

    /// Serves one fault: a stale page is asked for with `want`, any other gets the zero
    /// page.
    fn serve(
        &self,
        fault: Fault,
        want: &mut dyn FnMut(u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let host_page = fault.address & !(PAGE as u64 - 1);
        let Some(&(host, gpa, _)) = self
            .regions
            .iter()
            .find(|(h, _, len)| (*h..h + len).contains(&host_page))
        else {
            return Err(format!("a fault at {host_page:#x}, outside guest memory"));
        };
        let page = (gpa + (host_page - host)) / PAGE as u64;
        if self.stale.contains(page) {
            return want(page);
        }
        self.uffd
            .zeropage(host_page, PAGE as u64)
            .map_err(|e| format!("page {page:#x}: {e}"))
    }

    /// Serves every fault waiting.
    fn serve_all(&self, want: &mut dyn FnMut(u64) -> Result<(), String>) -> Result<(), String> {
        while let Some(f) = self.uffd.next_fault().map_err(|e| e.to_string())? {
            self.serve(f, want)?;
        }
        Ok(())
    }

    /// Takes one message from the source: pages are placed (and no longer stale),
    /// `Complete` noted; anything else is returned.
    fn take(&self, m: Incoming<'_>) -> Result<Option<Message>, String> {
        match m {
            Incoming::Pages { first_page, data } => {
                let n = self.filler.apply(&Incoming::Pages { first_page, data })?;
                self.stale.clear(first_page, n);
                Ok(None)
            }
            Incoming::Other(Message::Complete) => {
                self.complete.store(true, Ordering::Release);
                Ok(None)
            }
            Incoming::Other(m) => Ok(Some(m)),
        }
    }

    /// Every stale page is in.
    pub(crate) fn done(&self) -> bool {
        self.stale.left() == 0
    }
}

fn readable(fds: &[i32], timeout_ms: i32) -> Result<Vec<bool>, String> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll on a live array of initialised pollfds, its length passed with it.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(format!("poll: {e}"));
    }
    Ok(p.iter().map(|f| f.revents != 0).collect())
}

/// What the receiving thread tells the set-up server once the VM is built.
pub(crate) enum Built {
    Pending,
    Ok,
    Failed,
}

/// Before the jail, while the receiving thread builds the VM: serves faults, takes pages;
/// once `built` says the VM is built, says `Ready` and returns on the source's `Go`.
pub(crate) fn serve_until_go(
    remote: &Remote,
    ch: &mut Channel<TcpStream>,
    built: &Mutex<Built>,
    wake: &EventFd,
) -> Result<(), String> {
    let e = |e: keel_migration::Error| e.to_string();
    let sock = ch.get_ref().as_raw_fd();
    loop {
        let r = readable(&[remote.uffd.as_raw_fd(), sock, wake.as_raw_fd()], -1)?;
        if r[0] {
            remote.serve_all(&mut |page| {
                ch.send(&Message::Want { page })
                    .and_then(|()| ch.flush())
                    .map_err(e)
            })?;
        }
        if r[2] {
            let _ = wake.read();
            match *built.lock().unwrap_or_else(|p| p.into_inner()) {
                Built::Pending => {}
                Built::Failed => return Err("the VM could not be built".into()),
                Built::Ok => ch
                    .send(&Message::Ready)
                    .and_then(|()| ch.flush())
                    .map_err(e)?,
            }
        }
        if r[1] {
            let m = ch.recv_incoming().map_err(e)?;
            match remote.take(m)? {
                None => {}
                Some(Message::Go) => return Ok(()),
                Some(Message::Abort(why)) => return Err(format!("the sender gave up: {why}")),
                Some(other) => return Err(format!("unexpected {other:?} during post-copy")),
            }
        }
    }
}

/// The source went away with pages the VM needs: it cannot go on, and cannot even be torn
/// down in order (a vCPU or device thread may wait on a page that will never come, and
/// waking it with anything but that page would let it use memory that is not the VM's: a
/// device could write it to a disk). The process ends here, saying why; the supervisor
/// cleans up after it.
fn lost(error: String) -> ! {
    // Both threads may find the loss at once; exit(3) is not safe to race, _exit(2) is.
    static ONCE: AtomicBool = AtomicBool::new(false);
    if !ONCE.swap(true, Ordering::AcqRel) {
        let reason = ExitReason::MigrationLost { error };
        let why = reason.describe();
        tracing::error!("{why}");
        eprintln!("keel: {why}");
        // SAFETY: _exit ends the process without running anything of it: no destructor,
        // atexit handler or lock another thread may hold is involved.
        unsafe { libc::_exit(reason.exit_code()) };
    }
    loop {
        std::thread::park();
    }
}

/// The two threads that finish post-copy once the VM runs (confined like the snapshot
/// pager). Dropping this (after the vCPUs stopped) ends them, and closes the userfaultfd.
pub(crate) struct PostcopyThreads {
    quit: Arc<EventFd>,
    /// Set before the connection is shut down at teardown: the reader's error then is ours.
    ending: Arc<AtomicBool>,
    /// The connection, shut down on drop so the receiving thread's read ends.
    sock: TcpStream,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PostcopyThreads {
    pub(crate) fn start(
        remote: Arc<Remote>,
        tx: Arc<Mutex<ChannelTx<TcpStream>>>,
        mut rx: ChannelRx<TcpStream>,
        stop: Arc<StopState>,
        seccomp: bool,
    ) -> Result<PostcopyThreads, crate::VmmError> {
        let io = |source| crate::VmmError::Io {
            what: "post-copy eventfd",
            source,
        };
        let quit = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io)?);
        let sock = rx
            .get_ref()
            .try_clone()
            .map_err(|source| crate::VmmError::Io {
                what: "the post-copy connection",
                source,
            })?;
        let arrived = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io)?);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>, stop: Arc<StopState>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Err(e) = crate::confine::apply(seccomp, keel_seccomp::ThreadKind::Pager)
                    {
                        stop.request(ExitReason::MigrationLost { error: e });
                        return;
                    }
                    f()
                })
                .map_err(|source| crate::VmmError::Io {
                    what: "spawning a post-copy thread",
                    source,
                })
        };
        let mut threads = Vec::new();
        // Pages in: placed as they come; the VM stops if the source goes away first.
        let ending = Arc::new(AtomicBool::new(false));
        let (r, a, end) = (remote.clone(), arrived.clone(), ending.clone());
        threads.push(spawn(
            "postcopy-in",
            Box::new(move || loop {
                if r.done() && r.complete.load(Ordering::Acquire) {
                    let _ = a.write(1);
                    return;
                }
                let result = rx
                    .recv_incoming()
                    .map_err(|e| e.to_string())
                    .and_then(|m| r.take(m));
                match result {
                    Ok(None) => {}
                    // The VM ended here first (its guest powered off): nothing is lost.
                    Err(_) if end.load(Ordering::Acquire) => return,
                    Ok(Some(other)) => lost(format!("the source sent {other:?} during post-copy")),
                    Err(e) => lost(format!(
                        "{e}, with {} pages still at the source",
                        r.stale.left()
                    )),
                }
            }),
            stop.clone(),
        )?);
        // Faults: until every page is in (then the userfaultfd closes with the last
        // reference), or until the VM is torn down.
        let (r, q, a, s) = (remote.clone(), quit.clone(), arrived.clone(), stop.clone());
        drop(remote);
        threads.push(spawn(
            "postcopy-faults",
            Box::new(move || {
                let e = |e: keel_migration::Error| e.to_string();
                let mut want = |page| {
                    let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
                    tx.send(&Message::Want { page })
                        .and_then(|()| tx.flush())
                        .map_err(e)
                };
                loop {
                    let ready =
                        match readable(&[r.uffd.as_raw_fd(), q.as_raw_fd(), a.as_raw_fd()], -1) {
                            Ok(ready) => ready,
                            Err(e) => return s.request(ExitReason::MigrationLost { error: e }),
                        };
                    if ready[1] {
                        return;
                    }
                    if let Err(err) = r.serve_all(&mut want) {
                        // The source is gone: stale pages cannot come.
                        lost(err);
                    }
                    if ready[2] {
                        tracing::info!("post-copy: every page is here");
                        return;
                    }
                }
            }),
            stop,
        )?);
        Ok(PostcopyThreads {
            quit,
            ending,
            sock,
            threads,
        })
    }
}

impl Drop for PostcopyThreads {
    fn drop(&mut self) {
        self.ending.store(true, Ordering::Release);
        let _ = self.quit.write(1);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
