//! Asynchronous block I/O: requests run on worker threads, completions come back through a
//! queue and an `EventFd` the device thread polls.
//!
//! ## Buffers
//!
//! A [`Request`] owns its buffers (`Vec<u8>`), and the [`Completion`] hands them back. The
//! device copies guest memory into write buffers before submitting and copies read buffers
//! back into guest memory when the completion arrives. This is the sound choice here:
//!
//! - a borrowed `vm_memory::VolatileSlice<'a>` cannot cross to a worker thread (the request
//!   would have to outlive the borrow of guest memory), and turning it into a raw pointer
//!   would make this crate trust that the mapping outlives every in-flight request, through
//!   VM teardown and memory hot-unplug, with nothing to enforce it;
//! - the guest can rewrite its memory while a request is in flight; with a private copy the
//!   image code (qcow2 copy-on-write in particular) always sees one consistent buffer.
//!
//! The cost is one memcpy per request. A zero-copy path would pass an owned, reference
//! counted guest-memory handle plus guest addresses, resolved by the worker; it can be added
//! behind the same `Request` shape later.
//!
//! ## Engines
//!
//! The thread pool ([`EngineKind::ThreadPool`]) works on any [`DiskImage`]: each worker
//! takes the next request, runs it with the image's positional I/O and queues the completion.
//! It always exists and is the fallback.
//!
//! io_uring ([`EngineKind::IoUring`], cargo feature `io-uring`, on by default) serves raw
//! images that offer their file descriptor ([`DiskImage::raw_file_fd`]): requests become
//! `readv`/`writev`/`fsync`/`fallocate` submissions on a ring whose completions signal the
//! same `EventFd`; no worker threads. [`EngineKind::Auto`] takes it when the host's kernel
//! has io_uring with those operations (probed at run time) and the image allows it.
//!
//! Either way, requests in flight at the same time may complete in any order, as virtio
//! allows; a `Flush` covers the writes that *completed* before it was submitted.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{DiskImage, Error, Result};

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Fill the buffers, in order, from `offset`.
    Read,
    /// Write the buffers, in order, at `offset`.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Discard {
        /// Bytes.
        len: u64,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Bytes.
        len: u64,
    },
}

/// One block request. The buffers are owned (see the module docs for why).
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Data buffers, used in order (empty for flush/discard/write-zeroes).
    pub buffers: Vec<Vec<u8>>,
    /// Opaque to the engine, returned in the completion (e.g. the descriptor chain head).
    pub user_data: u64,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// Bytes transferred (reads, writes) or covered (discard, write-zeroes; 0 for flush).
    pub result: Result<usize>,
    /// The request's buffers, filled for reads.
    pub buffers: Vec<Vec<u8>>,
}

/// Which engine to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring when this host and image allow it, else the thread pool.
    #[default]
    Auto,
    /// Worker threads calling the image's positional I/O.
    ThreadPool,
    /// io_uring, or an error saying why it cannot be used here.
    IoUring,
}

/// Runs first thing on a thread the engine starts, before it takes any request: the VMM
/// confines the thread there (its seccomp filter). An error ends the thread at once.
pub type ThreadHook = fn() -> std::result::Result<(), String>;

/// Engine settings.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Which engine.
    pub kind: EngineKind,
    /// Worker threads for the thread pool (at least 1).
    pub workers: usize,
    /// Run first on each worker thread; `None`: nothing.
    pub thread_start: Option<ThreadHook>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Auto,
            workers: 4,
            thread_start: None,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) image: Arc<dyn DiskImage>,
    /// Finished requests waiting for `take_completions`.
    pub(crate) done: Mutex<VecDeque<Completion>>,
    pub(crate) eventfd: EventFd,
}

impl Shared {
    /// Queues a completion and signals the event fd.
    pub(crate) fn complete(&self, c: Completion) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(c);
        if let Err(e) = self.eventfd.write(1) {
            tracing::warn!("block engine: cannot signal a completion: {e}");
        }
    }
}

enum Backend {
    Pool {
        tx: Option<Sender<Request>>,
        workers: Vec<JoinHandle<()>>,
    },
    #[cfg(feature = "io-uring")]
    Uring(Box<crate::uring::Uring>),
}

/// Runs block requests on an image off the calling thread.
pub struct IoEngine {
    // Dropped first: the backend finishes in-flight I/O before the image goes.
    backend: Backend,
    shared: Arc<Shared>,
}

impl IoEngine {
    /// Starts an engine on `image`.
    pub fn new(image: Arc<dyn DiskImage>, config: EngineConfig) -> Result<Self> {
        let eventfd =
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("block engine", "eventfd", 0, e))?;
        let shared = Arc::new(Shared {
            image,
            done: Mutex::new(VecDeque::new()),
            eventfd,
        });
        let backend = match config.kind {
            EngineKind::ThreadPool => start_pool(&shared, &config)?,
            EngineKind::IoUring => Self::uring(&shared).map_err(|why| {
                Error::InvalidArgument(format!("the io_uring block engine cannot be used: {why}"))
            })?,
            EngineKind::Auto => match Self::uring(&shared) {
                Ok(b) => b,
                Err(why) => {
                    tracing::debug!("block engine: io_uring not used ({why}): thread pool");
                    start_pool(&shared, &config)?
                }
            },
        };
        Ok(IoEngine { backend, shared })
    }

    #[cfg(feature = "io-uring")]
    fn uring(shared: &Arc<Shared>) -> std::result::Result<Backend, String> {
        crate::uring::Uring::new(shared.clone()).map(|u| Backend::Uring(Box::new(u)))
    }

    #[cfg(not(feature = "io-uring"))]
    fn uring(_: &Arc<Shared>) -> std::result::Result<Backend, String> {
        Err("keel-block was built without the io-uring feature".into())
    }

    /// Queues a request. Its completion arrives later through [`IoEngine::take_completions`]
    /// (invalid requests too: they complete with an error).
    pub fn submit(&self, request: Request) -> Result<()> {
        match &self.backend {
            Backend::Pool { tx, .. } => tx
                .as_ref()
                .ok_or(Error::EngineStopped)?
                .send(request)
                .map_err(|_| Error::EngineStopped),
            #[cfg(feature = "io-uring")]
            Backend::Uring(u) => {
                u.submit(request);
                Ok(())
            }
        }
    }

    /// Becomes readable when completions are waiting. Register it with the device's poll
    /// loop, then call [`IoEngine::take_completions`].
    pub fn completion_fd(&self) -> &EventFd {
        &self.shared.eventfd
    }

    /// Takes all finished requests (resetting the event fd first, so a completion that
    /// arrives meanwhile signals again).
    pub fn take_completions(&self) -> Vec<Completion> {
        let _ = self.shared.eventfd.read();
        #[cfg(feature = "io-uring")]
        if let Backend::Uring(u) = &self.backend {
            u.reap();
        }
        let mut done = self.shared.done.lock().unwrap_or_else(|p| p.into_inner());
        done.drain(..).collect()
    }

    /// The engine in use: `"thread-pool"` or `"io_uring"`.
    pub fn engine_name(&self) -> &'static str {
        match &self.backend {
            Backend::Pool { .. } => "thread-pool",
            #[cfg(feature = "io-uring")]
            Backend::Uring(_) => "io_uring",
        }
    }

    /// The image requests run on.
    pub fn image(&self) -> &Arc<dyn DiskImage> {
        &self.shared.image
    }
}

impl Drop for IoEngine {
    /// Stops taking requests and finishes those already submitted (the thread pool runs its
    /// queue dry; io_uring waits for the kernel to finish with every buffer).
    #[allow(irrefutable_let_patterns)] // without the io-uring feature
    fn drop(&mut self) {
        if let Backend::Pool { tx, workers } = &mut self.backend {
            *tx = None;
            for w in workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

fn start_pool(shared: &Arc<Shared>, config: &EngineConfig) -> Result<Backend> {
    let (n, hook) = (config.workers, config.thread_start);
    let (tx, rx) = mpsc::channel::<Request>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for i in 0..n.max(1) {
        let (shared, rx) = (shared.clone(), rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("blk-worker{i}"))
            .spawn(move || {
                if let Some(hook) = hook {
                    if let Err(e) = hook() {
                        // Requests fail (the engine stops) once every worker has left.
                        tracing::error!("block I/O worker: {e}; this worker stops");
                        return;
                    }
                }
                worker(&shared, &rx)
            });
        match spawned {
            Ok(h) => workers.push(h),
            Err(e) => {
                drop(tx);
                for w in workers {
                    let _ = w.join();
                }
                return Err(Error::io("block engine", "spawn worker", 0, e));
            }
        }
    }
    Ok(Backend::Pool {
        tx: Some(tx),
        workers,
    })
}

fn worker(shared: &Shared, rx: &Mutex<Receiver<Request>>) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(mut req) = next else {
            return;
        };
        let result = execute(shared.image.as_ref(), &mut req);
        if let Err(e) = &result {
            tracing::debug!("block request {:?} at {} failed: {e}", req.kind, req.offset);
        }
        shared.complete(Completion {
            user_data: req.user_data,
            result,
            buffers: req.buffers,
        });
    }
}

/// Checks a request against the image (range, read-only) before any I/O; returns the
/// bytes it covers. A multi-buffer write that would fail on its last buffer fails whole.
pub(crate) fn validate(image: &dyn DiskImage, req: &Request) -> Result<u64> {
    let name = || format!("disk {}", image.id());
    let len = match req.kind {
        RequestKind::Read | RequestKind::Write => req.buffers.iter().map(|b| b.len() as u64).sum(),
        RequestKind::Flush => return Ok(0),
        RequestKind::Discard { len } | RequestKind::WriteZeroes { len } => len,
    };
    if req.kind != RequestKind::Read && image.read_only() {
        return Err(Error::ReadOnly { image: name() });
    }
    crate::check_range(&name(), req.offset, len, image.size())?;
    Ok(len)
}

/// Runs one request to the end.
pub(crate) fn execute(image: &dyn DiskImage, req: &mut Request) -> Result<usize> {
    let total = validate(image, req)?;
    match req.kind {
        RequestKind::Read | RequestKind::Write => {
            let mut off = req.offset;
            for b in &mut req.buffers {
                if req.kind == RequestKind::Read {
                    image.read_at(b, off)?;
                } else {
                    image.write_at(b, off)?;
                }
                off += b.len() as u64;
            }
        }
        RequestKind::Flush => image.flush()?,
        RequestKind::Discard { len } => image.discard(req.offset, len)?,
        RequestKind::WriteZeroes { len } => image.write_zeroes(req.offset, len)?,
    }
    Ok(total as usize)
}
