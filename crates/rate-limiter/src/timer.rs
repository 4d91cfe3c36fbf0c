//! A one-shot, non-blocking `CLOCK_MONOTONIC` timerfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

#[derive(Debug)]
pub(crate) struct Timer {
    fd: OwnedFd,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10⁹: fits every c_long.
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

impl Timer {
    pub(crate) fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (at least 1 ns: a zero time would disarm it).
    pub(crate) fn arm(&self, after: Duration) -> io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: timespec(Duration::ZERO),
            it_value: timespec(after.max(Duration::from_nanos(1))),
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; the old value is not
        // asked for (null), and the fd is ours.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry, if there was one; never blocks.
    pub(crate) fn clear(&self) -> io::Result<()> {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into `n`, which is 8 bytes long and lives across
        // the call.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut n as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Time left before it fires; `None` when disarmed (or fired).
    pub(crate) fn remaining(&self) -> io::Result<Option<Duration>> {
        let mut spec = libc::itimerspec {
            it_interval: timespec(Duration::ZERO),
            it_value: timespec(Duration::ZERO),
        };
        // SAFETY: the kernel writes one itimerspec into `spec`, which lives across the call.
        let r = unsafe { libc::timerfd_gettime(self.fd.as_raw_fd(), &mut spec) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let v = spec.it_value;
        if v.tv_sec == 0 && v.tv_nsec == 0 {
            return Ok(None);
        }
        let secs = u64::try_from(v.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(v.tv_nsec).unwrap_or(0);
        Ok(Some(Duration::new(secs, nanos)))
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
