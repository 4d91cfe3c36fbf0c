//! The io_uring engine for raw images: requests become kernel submissions, completions are
//! reaped on the device thread when the ring's registered `EventFd` fires.
//!
//! Buffer lifetime is the whole soundness story here: the kernel writes into (reads from)
//! a request's buffers until its completion is reaped. Each in-flight request lives in a
//! slot of `State::slots` — the slot owns the `Vec<u8>` buffers and the `iovec` array that
//! point into them — and leaves it only when its completion has been reaped. Dropping the
//! engine waits for every in-flight completion; if the ring fails while waiting, the
//! remaining buffers are leaked rather than freed under the kernel.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, register::Probe, squeue, types, IoUring};

use crate::engine::{execute, validate, Completion, Request, RequestKind, Shared};
use crate::{Error, Result};

/// Ring size, and so the most requests in flight in the kernel at once; more wait in
/// `State::pending`. The completion ring is twice this, so it cannot overflow.
const ENTRIES: u32 = 128;
/// `IOV_MAX`: longer requests run synchronously.
const MAX_IOVECS: usize = 1024;

pub(crate) struct Uring {
    shared: Arc<Shared>,
    fd: RawFd,
    state: Mutex<State>,
}

struct State {
    ring: IoUring,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    pending: VecDeque<Request>,
}

struct InFlight {
    req: Request,
    /// Bytes the request covers.
    total: u64,
    /// Bytes transferred so far (a short read/write is resubmitted for the rest).
    done: u64,
    /// Describes the not yet transferred part of `req.buffers`; read by the kernel.
    iovecs: IoVecs,
}

/// `iovec`s pointing into the buffers of the same [`InFlight`].
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers refer only to heap buffers owned by the same `InFlight` (moving it
// between threads moves neither), and they are dereferenced only by the kernel, never by
// this process, so no thread-affine state is involved.
unsafe impl Send for IoVecs {}

impl Uring {
    /// Sets up a ring for `shared.image`, or says why not.
    pub fn new(shared: Arc<Shared>) -> std::result::Result<Self, String> {
        let fd = shared
            .image
            .raw_file_fd()
            .ok_or("the image is not a raw file opened without O_DIRECT and with format=raw")?;
        let ring = IoUring::new(ENTRIES).map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("io_uring probe: {e}"))?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Fallocate::CODE, "fallocate"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("the kernel's io_uring lacks {name}"));
            }
        }
        ring.submitter()
            .register_eventfd(shared.eventfd.as_raw_fd())
            .map_err(|e| format!("io_uring eventfd registration: {e}"))?;
        Ok(Uring {
            shared,
            fd,
            state: Mutex::new(State {
                ring,
                slots: (0..ENTRIES).map(|_| None).collect(),
                free: (0..ENTRIES as usize).rev().collect(),
                pending: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn submit(&self, mut req: Request) {
        let total = match validate(self.shared.image.as_ref(), &req) {
            Ok(t) => t,
            Err(e) => return self.finish(req, Err(e)),
        };
        let empty_io = matches!(req.kind, RequestKind::Read | RequestKind::Write) && total == 0;
        if empty_io || (req.kind == RequestKind::Flush && self.shared.image.read_only()) {
            return self.finish(req, Ok(0));
        }
        if req.buffers.len() > MAX_IOVECS {
            let result = execute(self.shared.image.as_ref(), &mut req);
            return self.finish(req, result);
        }
        let mut st = self.lock();
        st.pending.push_back(req);
        self.start_pending(&mut st);
    }

    /// Reaps finished submissions; resubmits short transfers; starts waiting requests.
    pub fn reap(&self) {
        let mut st = self.lock();
        let cqes: Vec<(u64, i32)> = st
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            let Some(mut op) = st.slots.get_mut(slot as usize).and_then(Option::take) else {
                tracing::warn!("io_uring: completion for unknown slot {slot}");
                continue;
            };
            match self.settle(&mut op, res) {
                Some(result) => {
                    st.free.push(slot as usize);
                    self.finish(op.req, result);
                }
                None => {
                    // Short transfer: go again for the rest, in the same slot.
                    if let Err(e) = self.push(&mut st, slot as usize, op) {
                        tracing::warn!("io_uring: resubmission failed: {e}");
                    }
                }
            }
        }
        self.start_pending(&mut st);
    }

    /// What a completion means for its request: `Some(result)` when it is finished.
    fn settle(&self, op: &mut InFlight, res: i32) -> Option<Result<usize>> {
        let image = || format!("disk {}", self.shared.image.id());
        let at = op.req.offset + op.done;
        let fail =
            |what, errno: i32| Error::io(&image(), what, at, io::Error::from_raw_os_error(errno));
        let unsupported = |errno: i32| {
            matches!(
                errno,
                libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV
            )
        };
        Some(match op.req.kind {
            RequestKind::Read | RequestKind::Write => {
                let what = if op.req.kind == RequestKind::Read {
                    "read"
                } else {
                    "write"
                };
                if res < 0 {
                    Err(fail(what, -res))
                } else if res == 0 {
                    Err(Error::io(
                        &image(),
                        what,
                        at,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early"),
                    ))
                } else {
                    op.done += res as u64;
                    if op.done < op.total {
                        return None;
                    }
                    Ok(op.total as usize)
                }
            }
            RequestKind::Flush if res < 0 => Err(fail("flush", -res)),
            RequestKind::Flush => Ok(0),
            // Nothing to deallocate with: discard is advisory.
            RequestKind::Discard { len } if res >= 0 || unsupported(-res) => Ok(len as usize),
            RequestKind::Discard { .. } => Err(fail("discard", -res)),
            RequestKind::WriteZeroes { len } if res >= 0 => Ok(len as usize),
            // No ZERO_RANGE here: let the image fall back (punch hole, or write zeros).
            RequestKind::WriteZeroes { len } if unsupported(-res) => self
                .shared
                .image
                .write_zeroes(op.req.offset, len)
                .map(|()| len as usize),
            RequestKind::WriteZeroes { .. } => Err(fail("write zeroes", -res)),
        })
    }

    fn start_pending(&self, st: &mut State) {
        while !st.pending.is_empty() {
            let Some(slot) = st.free.pop() else {
                break;
            };
            let Some(req) = st.pending.pop_front() else {
                st.free.push(slot);
                break;
            };
            let total = match req.kind {
                RequestKind::Read | RequestKind::Write => {
                    req.buffers.iter().map(|b| b.len() as u64).sum()
                }
                RequestKind::Discard { len } | RequestKind::WriteZeroes { len } => len,
                RequestKind::Flush => 0,
            };
            let op = InFlight {
                req,
                total,
                done: 0,
                iovecs: IoVecs(Vec::new()),
            };
            if let Err(e) = self.push(st, slot, op) {
                tracing::warn!("io_uring: submission failed: {e}");
            }
        }
        // Hands over new requests and resubmissions of short transfers alike.
        if !st.ring.submission().is_empty() {
            if let Err(e) = st.ring.submit() {
                tracing::warn!("io_uring: submit: {e}");
            }
        }
    }

    /// Puts `op` in `slot` and queues its submission entry. On failure the request completes
    /// with the error and the slot is freed.
    fn push(&self, st: &mut State, slot: usize, op: InFlight) -> io::Result<()> {
        let Some(cell) = st.slots.get_mut(slot) else {
            self.finish(op.req, Err(Error::EngineStopped));
            return Ok(());
        };
        let op = cell.insert(op);
        let fd = types::Fd(self.fd);
        let off = op.req.offset + op.done;
        let entry: squeue::Entry = match op.req.kind {
            RequestKind::Read | RequestKind::Write => {
                op.iovecs = IoVecs(iovecs_after(&mut op.req.buffers, op.done));
                let (ptr, n) = (op.iovecs.0.as_ptr(), op.iovecs.0.len() as u32);
                if op.req.kind == RequestKind::Read {
                    opcode::Readv::new(fd, ptr, n).offset(off).build()
                } else {
                    opcode::Writev::new(fd, ptr, n).offset(off).build()
                }
            }
            RequestKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            RequestKind::Discard { len } => opcode::Fallocate::new(fd, len)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            RequestKind::WriteZeroes { len } => opcode::Fallocate::new(fd, len)
                .offset(off)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        let entry = entry.user_data(slot as u64);
        // The entry points at `op.iovecs`, which point into `op.req.buffers`; the fd is kept
        // open by `shared.image`, which outlives the ring.
        // SAFETY: both buffers are owned by slot `slot` of `st.slots`, unmoved and unfreed until
        // this entry's completion is reaped (`reap`) or `Drop` has waited for it.
        let pushed = unsafe { st.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The queue is full of entries not yet handed to the kernel: hand them over.
            st.ring.submit()?;
            // SAFETY: as above.
            let again = unsafe { st.ring.submission().push(&entry) };
            if again.is_err() {
                let op = st.slots.get_mut(slot).and_then(Option::take);
                st.free.push(slot);
                if let Some(op) = op {
                    self.finish(op.req, Err(Error::EngineStopped));
                }
                return Err(io::Error::other("submission queue full"));
            }
        }
        Ok(())
    }

    fn finish(&self, req: Request, result: Result<usize>) {
        if let Err(e) = &result {
            tracing::debug!("block request {:?} at {} failed: {e}", req.kind, req.offset);
        }
        self.shared.complete(Completion {
            user_data: req.user_data,
            result,
            buffers: req.buffers,
        });
    }
}

impl Drop for Uring {
    /// Waits until the kernel is done with every buffer in flight.
    fn drop(&mut self) {
        let mut st = self.lock();
        loop {
            // Requests still waiting for a slot run too: they were accepted.
            self.start_pending(&mut st);
            let cqes: Vec<u64> = st.ring.completion().map(|c| c.user_data()).collect();
            for slot in cqes {
                if let Some(cell) = st.slots.get_mut(slot as usize) {
                    if cell.take().is_some() {
                        st.free.push(slot as usize);
                    }
                }
            }
            if st.slots.iter().all(Option::is_none) {
                if st.pending.is_empty() {
                    return;
                }
                // Slots are free again: start the waiting requests before waiting.
                continue;
            }
            match st.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!("io_uring: cannot wait for in-flight I/O ({e}): leaking it");
                    for cell in st.slots.iter_mut() {
                        std::mem::forget(cell.take());
                    }
                    return;
                }
            }
        }
    }
}

/// `iovec`s for `buffers` past their first `skip` bytes.
fn iovecs_after(buffers: &mut [Vec<u8>], mut skip: u64) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(buffers.len());
    for b in buffers.iter_mut() {
        let len = b.len() as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        let rest = b.get_mut(skip as usize..).unwrap_or_default();
        skip = 0;
        if !rest.is_empty() {
            out.push(libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            });
        }
    }
    out
}
