//! The SIGSYS report: a thread that makes a system call outside its filter traps here. The
//! handler writes one line naming the thread, its filter and the call, then lets SIGSYS
//! kill the process (default action), so the VM stops and the exit status says why.
//!
//! Async-signal-safe: it formats into a stack buffer from static data (the syscall name
//! table, the thread's name recorded in a plain thread-local byte array when its filter was
//! applied) and calls only write, rt_sigaction, rt_sigprocmask, gettid and tgkill, which
//! every filter allows.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

thread_local! {
    /// The thread's name (NUL-padded) and filter kind, set by `apply`.
    static THREAD: Cell<([u8; 16], &'static str)> = const { Cell::new(([0; 16], "none")) };
}

/// This process's pid as the filters know it (tgkill is allowed to it only).
static PID: AtomicI32 = AtomicI32::new(0);

pub(crate) fn record_thread(name: &str, kind: &'static str) {
    let mut buf = [0u8; 16];
    for (d, s) in buf.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    THREAD.with(|t| t.set((buf, kind)));
}

/// A fixed-size line being formatted on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, n: u64) {
        let mut digits = [0u8; 16];
        let mut len = 0;
        let mut v = n;
        loop {
            let d = (v & 0xf) as u8;
            digits[15 - len] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            len += 1;
            v >>= 4;
            if v == 0 || len == 16 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[16 - len..]);
    }

    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Offset of `si_syscall` in a SIGSYS siginfo_t on 64-bit Linux: three ints, padding, then
/// `_sigsys { void *_call_addr; int _syscall; unsigned int _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// `si_code` of a SIGSYS raised by a seccomp filter (SYS_SECCOMP).
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    if code != SYS_SECCOMP {
        // Sent by a process (kill -SYS), not by a filter: no syscall to name; die all the same.
        line.push(b"keel: SIGSYS sent to the VMM (not from its seccomp filter); stopping\n");
        die(&line);
    }
    // SAFETY: for SIGSYS from seccomp (checked above) the siginfo_t holds the `_sigsys`
    // member read here (an aligned int within the struct).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let (name, kind) = THREAD.with(|t| t.get());
    line.push(b"keel: seccomp: thread '");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(name.get(..end).unwrap_or(&[]));
    line.push(b"' (");
    line.push(kind.as_bytes());
    line.push(b" filter) made forbidden syscall ");
    let call = usize::try_from(nr)
        .ok()
        .and_then(|i| crate::names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown");
    line.push(call.as_bytes());
    line.push(b" (");
    line.push_num(u64::from(nr.unsigned_abs()));
    line.push(b")");
    if !ctx.is_null() {
        // SAFETY: for an SA_SIGINFO handler the kernel passes a valid ucontext_t; the
        // trapped call's first arguments are in rdi, rsi and rdx (an ioctl's request in rsi).
        let args = unsafe {
            let g = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
            [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX].map(|r| {
                usize::try_from(r)
                    .ok()
                    .and_then(|i| g.get(i))
                    .map_or(0, |&v| v as u64)
            })
        };
        line.push(b" with arguments ");
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                line.push(b", ");
            }
            line.push_hex(*a);
        }
    }
    line.push(b"; stopping the VM\n");
    die(&line);
}

/// A syscall number x86_64 Linux does not have, so every filter's default action (trap)
/// applies to it.
const NO_SUCH_SYSCALL: libc::c_long = 1023;

/// Writes `line` to stderr and dies by SIGSYS. Async-signal-safe.
fn die(line: &Line) -> ! {
    // SAFETY: write(2), sigaction, sigprocmask and raw tgkill are async-signal-safe; every
    // pointer is to a live stack value of the right type.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        // A syscall no filter allows makes the kernel force SIGSYS on this thread, now with
        // the default action: that kills even the init process of a PID namespace (a jailed
        // VMM), which ignores a SIGSYS it sends itself.
        libc::syscall(NO_SUCH_SYSCALL);
        // Without a filter on this thread (the call just failed with ENOSYS): send it.
        let tid = libc::syscall(libc::SYS_gettid);
        libc::syscall(
            libc::SYS_tgkill,
            PID.load(Ordering::Relaxed),
            tid,
            libc::SIGSYS,
        );
        // Not reached: the pending SIGSYS kills the process when the call returns.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Installs the SIGSYS handler for the whole process.
pub(crate) fn install() -> std::io::Result<()> {
    PID.store(std::process::id() as i32, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with a valid handler, SA_SIGINFO and an empty mask.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_format_without_allocating() {
        let mut l = Line {
            buf: [0; 256],
            len: 0,
        };
        l.push_num(0);
        l.push(b" ");
        l.push_num(41);
        l.push(b" ");
        l.push_num(u64::MAX);
        assert_eq!(&l.buf[..l.len], b"0 41 18446744073709551615");
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let mut l = Line {
            buf: [0; 256],
            len: 0,
        };
        for _ in 0..100 {
            l.push(b"abcdef");
        }
        assert_eq!(l.len, 256);
    }
}
