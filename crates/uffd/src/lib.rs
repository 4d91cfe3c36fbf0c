//! userfaultfd(2) for Keel: register anonymous memory so that the first touch of a missing
//! page (by the guest through KVM, a device thread, or the kernel copying into it) waits
//! until a handler thread fills it with [`Uffd::copy`] or [`Uffd::zeropage`].
//!
//! Only what Keel uses: `MISSING` mode on private anonymous memory, page-fault events, copy,
//! zero page and wake. The kernel ABI (`include/uapi/linux/userfaultfd.h`) is small and
//! stable, so it is spelled out here rather than generated: the `userfaultfd` crate builds
//! its bindings with bindgen and libclang, a build cost out of proportion to five ioctls.
//!
//! A descriptor made without `UFFD_USER_MODE_ONLY` also catches faults the kernel takes on
//! the process's behalf (KVM's guest page faults, `read(2)` into the range); making one needs
//! `CAP_SYS_PTRACE` (or `vm.unprivileged_userfaultfd = 1`), so it is made before a VMM drops
//! its privileges and keeps working after.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const UFFDIO: u64 = 0xaa;
const WRITE: u64 = 1;
const READ: u64 = 2;
const UFFD_API: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `/dev/userfaultfd`'s ioctl that makes a new descriptor (Linux 6.1+).
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an event byte, padding, then (for a page fault) flags and address.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    _ptid: u64,
}

pub const UFFDIO_API: u64 = ioc(READ | WRITE, 0x3f, std::mem::size_of::<UffdioApi>());
pub const UFFDIO_REGISTER: u64 = ioc(READ | WRITE, 0x00, std::mem::size_of::<UffdioRegister>());
pub const UFFDIO_UNREGISTER: u64 = ioc(READ, 0x01, std::mem::size_of::<UffdioRange>());
pub const UFFDIO_WAKE: u64 = ioc(READ, 0x02, std::mem::size_of::<UffdioRange>());
pub const UFFDIO_COPY: u64 = ioc(READ | WRITE, 0x03, std::mem::size_of::<UffdioCopy>());
pub const UFFDIO_ZEROPAGE: u64 = ioc(READ | WRITE, 0x04, std::mem::size_of::<UffdioZeropage>());

/// The ioctls a handler thread makes (for its seccomp filter).
pub const HANDLER_IOCTLS: &[u64] = &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE];

/// The page size userfaultfd works in here.
pub const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a userfaultfd: {0} (Keel needs CAP_SYS_PTRACE or /dev/userfaultfd for lazily restored memory)")]
    Create(#[source] std::io::Error),
    #[error("the userfaultfd API handshake failed: {0}")]
    Api(#[source] std::io::Error),
    #[error("cannot register {len:#x} bytes at {start:#x} with userfaultfd: {source}")]
    Register {
        start: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel cannot fill missing pages by copy and zero page (ioctls {0:#x})")]
    Unsupported(u64),
    #[error("{what} of {len:#x} bytes at {dst:#x} failed: {source}")]
    Fill {
        what: &'static str,
        dst: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the userfaultfd: {0}")]
    Read(#[source] std::io::Error),
    #[error("range {start:#x}+{len:#x} is not page-aligned")]
    Unaligned { start: u64, len: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A fault on a missing page of registered memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (not page-aligned).
    pub address: u64,
    pub write: bool,
}

/// A userfaultfd: non-blocking, close-on-exec. Closing it (dropping) lets every fault still
/// waiting, and every later one, be served by the kernel as if nothing was registered
/// (anonymous memory: a zero page).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn aligned(start: u64, len: u64) -> Result<()> {
    if !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(Error::Unaligned { start, len });
    }
    Ok(())
}

impl Uffd {
    /// Makes a userfaultfd that also catches faults the kernel takes for this process.
    pub fn new() -> Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes only flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as RawFd
        } else {
            let err = std::io::Error::last_os_error();
            // Without CAP_SYS_PTRACE a full-mode descriptor may still come from the device
            // node, when its permissions let this process open it.
            Self::from_device(flags).map_err(|_| Error::Create(err))?
        };
        // SAFETY: `fd` is a descriptor this function just created and owns alone.
        let uffd = Uffd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API on our descriptor with a pointer to a live UffdioApi of the size
        // the request number encodes; the kernel writes only into that struct.
        let r = unsafe { libc::ioctl(uffd.fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r != 0 {
            return Err(Error::Api(std::io::Error::last_os_error()));
        }
        Ok(uffd)
    }

    fn from_device(flags: i32) -> std::io::Result<RawFd> {
        let dev = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW on the device node takes the flags by value and returns
        // a new descriptor or -1; no memory is passed.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Registers `[start, start+len)` (page-aligned, private anonymous memory of this
    /// process) for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> Result<()> {
        aligned(start, len)?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a pointer to a live UffdioRegister; the kernel checks
        // that the range is mapped in this process and writes only the `ioctls` field.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if r != 0 {
            return Err(Error::Register {
                start,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        // _UFFDIO_COPY is bit 3, _UFFDIO_ZEROPAGE bit 4, _UFFDIO_WAKE bit 2.
        let need = (1 << 2) | (1 << 3) | (1 << 4);
        if reg.ioctls & need != need {
            return Err(Error::Unsupported(reg.ioctls));
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: for ever) for the descriptor to become readable, or for
    /// `also` to; returns whether `also` is readable.
    pub fn wait(&self, also: Option<RawFd>, timeout_ms: i32) -> Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: also.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on an array of two initialised pollfds (a negative fd is ignored).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::Read(e));
        }
        Ok(also.is_some() && fds[1].revents != 0)
    }

    /// The next page fault, if one is waiting (the descriptor is non-blocking). Events other
    /// than page faults (none are asked for) are skipped.
    pub fn next_fault(&self) -> Result<Option<Fault>> {
        loop {
            let mut msg = UffdMsg::default();
            let size = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most `size` bytes into a live, writable UffdMsg.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(None),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => Err(Error::Read(e)),
                };
            }
            if n as usize != size {
                return Err(Error::Read(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short userfaultfd message: {n} bytes"),
                )));
            }
            if msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(Fault {
                    address: msg.address,
                    write: msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                }));
            }
        }
    }

    /// Fills the missing pages of `[dst, dst+len)` with `src` (the same length) and wakes
    /// whoever waits on them; returns how many bytes it copied. Pages that are already there
    /// (another fault filled them, or they were never missing) are left as they are.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<u64> {
        let len = src.len() as u64;
        aligned(dst, len)?;
        let filled = self.fill("UFFDIO_COPY", dst, len, |at, left| {
            let mut c = UffdioCopy {
                dst: at,
                src: src.as_ptr() as u64 + (at - dst),
                len: left,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `c.len` bytes from `c.src` (inside the live slice
            // `src`: `fill` keeps `at + left` within `dst + len`) and writes them only into
            // registered memory of this process, through the kernel; it writes back `c.copy`.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            (r, c.copy)
        })?;
        self.wake(dst, len)?;
        Ok(filled)
    }

    /// Maps the zero page at the missing pages of `[dst, dst+len)` and wakes the waiters.
    pub fn zeropage(&self, dst: u64, len: u64) -> Result<()> {
        aligned(dst, len)?;
        self.fill("UFFDIO_ZEROPAGE", dst, len, |at, left| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: at,
                    len: left,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE on our descriptor with a live struct; it maps the zero
            // page into registered memory only and writes back only `z.zeropage`.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
            (r, z.zeropage)
        })?;
        self.wake(dst, len)
    }

    /// Runs a filling ioctl over `[dst, dst+len)` until it is done: `op(at, left)` fills
    /// from `at` and returns the ioctl's result and its count (bytes filled, or -errno).
    /// A page that exists already is stepped over; a partial fill goes on where it stopped.
    /// Returns the bytes actually filled.
    fn fill(
        &self,
        what: &'static str,
        dst: u64,
        len: u64,
        mut op: impl FnMut(u64, u64) -> (libc::c_int, i64),
    ) -> Result<u64> {
        let mut done = 0u64;
        let mut filled = 0u64;
        while done < len {
            let (r, count) = op(dst + done, len - done);
            let n = u64::try_from(count).unwrap_or(0).min(len - done);
            filled += n;
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            done += n;
            match e.raw_os_error() {
                // The page at `done` exists already: step over it.
                Some(libc::EEXIST) if n == 0 => done += PAGE,
                Some(libc::EEXIST) | Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => {
                    return Err(Error::Fill {
                        what,
                        dst: dst + done,
                        len: len - done,
                        source: e,
                    })
                }
            }
        }
        Ok(filled)
    }

    /// Wakes whoever waits on a fault in `[start, start+len)` (after the pages were filled
    /// by a call that skipped some).
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a live UffdioRange; it touches no memory of ours.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if r != 0 {
            return Err(Error::Fill {
                what: "UFFDIO_WAKE",
                dst: start,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
