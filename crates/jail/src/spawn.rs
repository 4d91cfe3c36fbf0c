//! Starting the VMM as a child in new namespaces, and supervising it from the host.

use crate::{sys, Result};
use std::sync::atomic::{AtomicI32, Ordering};

/// What [`spawn`] returned, in each of the two processes.
pub enum Spawned {
    /// This is the supervisor; the VMM is process `pid` (in the host's PID namespace).
    Supervisor(Supervisor),
    /// This is the VMM, isolated (step 1 done); it sets itself up and then calls
    /// [`crate::confine`].
    Child(Child),
}

/// The in-child token: proof that step 1 ran.
pub struct Child(());

/// The supervisor's handle on the VMM process.
pub struct Supervisor {
    pid: libc::pid_t,
}

/// How the VMM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Killed(i32),
}

/// Forks the VMM into new PID, mount, IPC and UTS namespaces. In the supervisor,
/// `before_start(pid)` runs while the child waits (e.g. to put it into its cgroup before it
/// allocates anything); if it fails the child is killed and the error returned. In the child
/// every inherited fd but 0-2 is closed, the environment is cleared, all mounts are made
/// private (nothing mounted later reaches the host) and the hostname is `keel`.
///
/// Call it while the process is single-threaded: the child continues running this program.
pub fn spawn(before_start: impl FnOnce(u32) -> Result<()>) -> Result<Spawned> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(sys("pipe2"));
    }
    let [rd, wr] = fds;
    // The child is the first process of a new PID namespace (its PID 1).
    // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWPID affects only the
    // children created afterwards, not this process.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        close_pair(rd, wr);
        return Err(sys("unshare(CLONE_NEWPID)"));
    }
    // SAFETY: the process is single-threaded (documented precondition), so the child may go
    // on running Rust code: no lock can be held by a thread that does not exist there.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        close_pair(rd, wr);
        return Err(sys("fork"));
    }
    if pid == 0 {
        // SAFETY: `wr` is this process's copy of the pipe's write end.
        unsafe { libc::close(wr) };
        wait_for_release(rd);
        isolate()?;
        return Ok(Spawned::Child(Child(())));
    }
    // SAFETY: `rd` is this process's copy of the pipe's read end.
    unsafe { libc::close(rd) };
    let sup = Supervisor { pid };
    if let Err(e) = before_start(pid as u32) {
        // SAFETY: `wr` is open; closing it without writing makes the child exit.
        unsafe { libc::close(wr) };
        sup.kill();
        let _ = sup.wait();
        return Err(e);
    }
    let go = [1u8];
    // SAFETY: writing one byte from a valid buffer to the open write end.
    let n = unsafe { libc::write(wr, go.as_ptr().cast(), 1) };
    // SAFETY: `wr` is open and not used again.
    unsafe { libc::close(wr) };
    if n != 1 {
        let e = sys("releasing the VMM process");
        sup.kill();
        let _ = sup.wait();
        return Err(e);
    }
    Ok(Spawned::Supervisor(sup))
}

fn close_pair(a: i32, b: i32) {
    // SAFETY: both are fds this function's caller owns and does not use again.
    unsafe {
        libc::close(a);
        libc::close(b);
    }
}

/// Blocks until the supervisor says go; exits if it goes away instead.
fn wait_for_release(rd: i32) {
    let mut b = [0u8];
    loop {
        // SAFETY: reading one byte into a valid buffer from the open read end.
        let n = unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            break;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // The supervisor failed (or died) before releasing us: nothing to report here,
        // it does.
        // SAFETY: _exit ends this process without running anything else.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: `rd` is open and not used again.
    unsafe { libc::close(rd) };
}

/// Step 1 of the confinement, in the child.
fn isolate() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; the process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(sys("unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)"));
    }
    // SAFETY: the strings are NUL-terminated literals; a null fs type and data are allowed
    // for a propagation change.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(sys("making the mounts private"));
    }
    let name = b"keel";
    // SAFETY: `name` is a valid buffer of the given length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(sys("sethostname"));
    }
    close_inherited_fds()?;
    // Nothing below reads the environment any more (the log filter is read at start).
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    Ok(())
}

/// Closes every fd from 3 up: whatever the caller inherited is not the VM's business.
fn close_inherited_fds() -> Result<()> {
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded process
    // holds one of fds >= 3 that it will use again (the release pipe is closed already).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Before Linux 5.9: close what /proc lists.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|source| crate::JailError::Path {
            path: "/proc/self/fd".into(),
            source,
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above; the read_dir handle is already closed, a stale number is EBADF.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

// The VMM's PID, for the signal handler that forwards stop signals.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our child (not yet reaped).
        unsafe { libc::kill(pid, sig) };
    }
}

impl Supervisor {
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Passes SIGINT, SIGTERM and SIGHUP on to the VMM, which stops its guest on them.
    pub fn forward_stop_signals(&self) -> Result<()> {
        CHILD.store(self.pid, Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installing a handler that only calls async-signal-safe kill(2).
            let prev = unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
            if prev == libc::SIG_ERR {
                return Err(sys("installing a signal handler"));
            }
        }
        Ok(())
    }

    pub fn kill(&self) {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// Waits for the VMM to end.
    pub fn wait(&self) -> Result<Ended> {
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid int for waitpid to fill.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(sys("waiting for the VMM process"));
            }
        }
        CHILD.store(0, Ordering::SeqCst);
        Ok(if libc::WIFSIGNALED(status) {
            Ended::Killed(libc::WTERMSIG(status))
        } else {
            Ended::Exited(libc::WEXITSTATUS(status))
        })
    }
}
