//! The system calls each thread kind makes, found with `strace -f` on kit guests and a Linux
//! boot with every device (see docs/security.md). Threads inherit the filter of the thread
//! that created them and stacked filters intersect, so the event loop's list ("vmm") must
//! hold everything the device, I/O and API threads it starts need.

use crate::{ioctls, ThreadKind};
use libc::c_long;
use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

pub(crate) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Every thread: memory, locks, signals (the SIGSYS report itself: rt_sigaction, gettid,
/// tgkill), time, logging, closing what it owns, leaving.
const COMMON: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
];

/// vCPU threads: guest exits go to devices in-process; a device reset stops its thread
/// (join, close), a driver start clones the queue eventfds (F_DUPFD_CLOEXEC) and drains them.
const VCPU: &[c_long] = &[libc::SYS_read];

/// Device threads (virtio queues, tap, vsock Unix sockets, io_uring completions, balloon
/// page release, rate-limit timers).
const DEVICE: &[c_long] = &[
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_getsockopt,
    libc::SYS_io_uring_enter,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_statx,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_writev,
];

/// Block I/O workers: positional I/O on the image files, flushes, discards.
const BLOCK_IO: &[c_long] = &[
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_statx,
];

/// The control socket: accept, read a line, answer; `pause` kicks the vCPU threads; the
/// balloon target is a config interrupt (an eventfd write); the RSS comes from a /proc file
/// opened before the filter.
const API: &[c_long] = &[
    libc::SYS_accept4,
    // `pause` kicks the vCPU threads: glibc's pthread_kill asks getpid for tgkill.
    libc::SYS_getpid,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_read,
    libc::SYS_recvfrom,
    // Requests that bring descriptors (a snapshot's files).
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
];

/// The pager of a restored VM: waits on its userfaultfd, reads fault messages, reads chunks
/// of the memory part (SEEK_DATA/SEEK_HOLE, pread); the checker does the reads only.
const PAGER: &[c_long] = &[
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_read,
    // Post-copy's pager: pages from the source and requests to it, over the connection.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// The event loop (and the process's main thread after the VM ends): polls, starts and
/// stops device threads (clone3, io_uring and eventfd set-up, filters for the new threads),
/// kicks vCPUs, and tears the VM down (image locks, socket files, the cgroup).
const VMM: &[c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_flock,
    libc::SYS_getpid,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_openat,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_seccomp,
    // A restored VM's memory checker lowers its own priority before its filter.
    libc::SYS_setpriority,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

fn cond(arg: u8, value: u64) -> SeccompCondition {
    // Conditions are built from constants: they cannot fail for arguments 0..6.
    SeccompCondition::new(arg, Len::Dword, Op::Eq, value).unwrap_or_else(|_| unreachable!())
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).unwrap_or_else(|_| unreachable!())
}

fn allow(m: &mut Rules, list: &[c_long]) {
    for &nr in list {
        // An empty rule list allows the call whatever its arguments; it wins over rules.
        m.insert(nr, Vec::new());
    }
}

fn allow_if(m: &mut Rules, nr: c_long, conds: Vec<SeccompCondition>) {
    if let Some(rules) = m.get_mut(&nr) {
        if rules.is_empty() {
            return;
        }
    }
    m.entry(nr).or_default().push(rule(conds));
}

fn ioctls(m: &mut Rules, requests: &[u64]) {
    for &r in requests {
        allow_if(m, libc::SYS_ioctl, vec![cond(1, r)]);
    }
}

/// The rules of `kind` for a process whose pid is `pid`.
/// Calls that fail with `EACCES` instead of trapping on every thread but the event loop's: a
/// second filter ([`refusals`]) turns them into an error, and each kind's list lets them
/// through to it (stacked filters take the stricter action: errno over allow). glibc's
/// allocator opens /proc/sys/vm/overcommit_memory the first time it shrinks a thread's heap,
/// on whichever thread frees memory, and copes when the open fails; no Keel thread but the
/// event loop opens files.
pub(crate) const REFUSED: &[c_long] = &[libc::SYS_openat, libc::SYS_open];

/// The rules of the refusal filter: [`REFUSED`], matched unconditionally.
pub(crate) fn refusals() -> Rules {
    let mut m = Rules::new();
    allow(&mut m, REFUSED);
    m
}

pub(crate) fn rules(kind: ThreadKind, pid: u32) -> Rules {
    let mut m = Rules::new();
    allow(&mut m, COMMON);
    // The event loop opens files (teardown); elsewhere the refusal filter installed beside
    // this one turns these into EACCES.
    allow(&mut m, REFUSED);
    // Signals only to this process's own threads: the SIGSYS report, vCPU kicks.
    allow_if(&mut m, libc::SYS_tgkill, vec![cond(0, u64::from(pid))]);
    // The SIGSYS report puts the default action back before re-raising.
    allow_if(
        &mut m,
        libc::SYS_rt_sigaction,
        vec![cond(0, libc::SIGSYS as u64)],
    );
    // Duplicating a descriptor (EventFd::try_clone) and reading/setting its flags.
    for op in [
        libc::F_DUPFD_CLOEXEC,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_GETFD,
    ] {
        allow_if(&mut m, libc::SYS_fcntl, vec![cond(1, op as u64)]);
    }
    match kind {
        ThreadKind::Vcpu => {
            allow(&mut m, VCPU);
            ioctls(&mut m, ioctls::VCPU);
        }
        ThreadKind::Device => {
            allow(&mut m, DEVICE);
            unix_sockets(&mut m);
            ioctls(&mut m, ioctls::DEVICE);
        }
        ThreadKind::BlockIo => allow(&mut m, BLOCK_IO),
        ThreadKind::Api => {
            allow(&mut m, API);
            ioctls(&mut m, ioctls::API);
        }
        ThreadKind::Pager => {
            allow(&mut m, PAGER);
            ioctls(&mut m, keel_uffd::HANDLER_IOCTLS);
        }
        ThreadKind::Vmm => {
            for list in [VCPU, DEVICE, BLOCK_IO, API, PAGER, VMM] {
                allow(&mut m, list);
            }
            unix_sockets(&mut m);
            // Any signal handler: the stop signals and the vCPU kick are set up here.
            m.insert(libc::SYS_rt_sigaction, Vec::new());
            // Threads it starts name themselves, then install their own filter.
            for op in [
                libc::PR_SET_NAME,
                libc::PR_GET_NAME,
                libc::PR_SET_NO_NEW_PRIVS,
            ] {
                allow_if(&mut m, libc::SYS_prctl, vec![cond(0, op as u64)]);
            }
            let mut all: Vec<u64> = ioctls::VMM.to_vec();
            all.extend_from_slice(ioctls::VCPU);
            all.extend_from_slice(ioctls::DEVICE);
            all.extend_from_slice(ioctls::API);
            all.extend_from_slice(keel_uffd::HANDLER_IOCTLS);
            all.sort_unstable();
            all.dedup();
            ioctls(&mut m, &all);
        }
    }
    m
}

/// vsock: Unix stream sockets only (a guest connection to `PATH_<port>`).
fn unix_sockets(m: &mut Rules) {
    allow_if(m, libc::SYS_socket, vec![cond(0, libc::AF_UNIX as u64)]);
}
