use super::*;
use seccompiler::sock_filter;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;

/// A tiny interpreter for the classic-BPF subset seccompiler emits: what the filter returns
/// for syscall `nr` with arguments `args` (x86_64).
fn run(prog: &[sock_filter], nr: i64, args: [u64; 6]) -> u32 {
    let mut data = [0u32; 16];
    data[0] = nr as u32;
    data[1] = 0xc000_003e; // AUDIT_ARCH_X86_64
    for (i, a) in args.iter().enumerate() {
        data[4 + 2 * i] = *a as u32;
        data[5 + 2 * i] = (*a >> 32) as u32;
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let ins = &prog[pc];
        pc += 1;
        match ins.code {
            BPF_LD_W_ABS => acc = data[ins.k as usize / 4],
            BPF_JEQ_K => pc += if acc == ins.k { ins.jt } else { ins.jf } as usize,
            0x25 => pc += if acc > ins.k { ins.jt } else { ins.jf } as usize, // JGT
            0x35 => pc += if acc >= ins.k { ins.jt } else { ins.jf } as usize, // JGE
            0x45 => pc += if acc & ins.k != 0 { ins.jt } else { ins.jf } as usize, // JSET
            0x05 => pc += ins.k as usize,                                     // JA
            0x54 => acc &= ins.k,                                             // AND
            BPF_RET_K => return ins.k,
            other => panic!("unexpected BPF opcode {other:#x} at {}", pc - 1),
        }
    }
}

fn allowed(kind: ThreadKind, nr: i64, args: [u64; 6]) -> bool {
    let prog = program(kind).unwrap();
    match run(&prog, nr, args) {
        SECCOMP_RET_ALLOW => true,
        SECCOMP_RET_TRAP => false,
        other => panic!("unexpected action {other:#x}"),
    }
}

#[test]
fn every_kind_compiles_to_bpf() {
    let _ = SECCOMP_DATA_NR;
    for kind in ThreadKind::ALL {
        let prog = program(kind).unwrap();
        assert!(
            !prog.is_empty() && prog.len() < 4096,
            "{kind:?}: {} instructions",
            prog.len()
        );
    }
}

#[test]
fn the_vcpu_filter_denies_what_a_vcpu_never_does() {
    for nr in [
        libc::SYS_socket,
        libc::SYS_execve,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_fork,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_connect,
        libc::SYS_io_uring_setup,
    ] {
        assert!(
            !allowed(ThreadKind::Vcpu, nr, [0; 6]),
            "vcpu allows {}",
            syscall_name(nr)
        );
    }
    assert!(allowed(
        ThreadKind::Vcpu,
        libc::SYS_ioctl,
        [9, ioctls::KVM_RUN, 0, 0, 0, 0]
    ));
    assert!(allowed(
        ThreadKind::Vcpu,
        libc::SYS_write,
        [1, 0, 1, 0, 0, 0]
    ));
    // ioctls by request number: not KVM_CREATE_VCPU, not TUNSETIFF.
    assert!(!allowed(
        ThreadKind::Vcpu,
        libc::SYS_ioctl,
        [9, 0xae41, 0, 0, 0, 0]
    ));
    assert!(!allowed(
        ThreadKind::Vcpu,
        libc::SYS_ioctl,
        [9, 0x4004_54ca, 0, 0, 0, 0]
    ));
}

#[test]
fn only_the_vmm_thread_starts_threads() {
    for kind in ThreadKind::ALL {
        let may = allowed(kind, libc::SYS_clone3, [0; 6]);
        assert_eq!(may, kind == ThreadKind::Vmm, "{kind:?}");
    }
}

#[test]
fn sockets_are_unix_only_and_only_where_vsock_runs() {
    let unix = [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
    let inet = [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
    assert!(allowed(ThreadKind::Device, libc::SYS_socket, unix));
    assert!(!allowed(ThreadKind::Device, libc::SYS_socket, inet));
    assert!(!allowed(ThreadKind::Api, libc::SYS_socket, unix));
    assert!(!allowed(ThreadKind::BlockIo, libc::SYS_socket, unix));
}

#[test]
fn the_vmm_filter_holds_every_filter_it_hands_down() {
    // Intersection semantics: a call a child kind allows but the vmm filter does not would
    // still kill the child.
    let interesting = (0..=450i64).collect::<Vec<_>>();
    for kind in ThreadKind::ALL {
        for &nr in &interesting {
            if allowed(kind, nr, [libc::AF_UNIX as u64, 0, 0, 0, 0, 0]) {
                assert!(
                    allowed(ThreadKind::Vmm, nr, [libc::AF_UNIX as u64, 0, 0, 0, 0, 0]),
                    "{kind:?} allows {} but vmm does not",
                    syscall_name(nr)
                );
            }
        }
        for req in ioctls::VCPU.iter().chain(ioctls::DEVICE).chain(ioctls::API) {
            assert!(allowed(
                ThreadKind::Vmm,
                libc::SYS_ioctl,
                [0, *req, 0, 0, 0, 0]
            ));
        }
    }
}

#[test]
fn rate_limiter_timers_are_allowed_on_device_threads() {
    for nr in [
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_clock_gettime,
    ] {
        assert!(allowed(ThreadKind::Device, nr, [0; 6]));
    }
}

#[test]
fn syscall_names_come_from_the_table() {
    assert_eq!(syscall_name(41), "socket");
    assert_eq!(syscall_name(0), "read");
    assert_eq!(syscall_name(-1), "unknown");
    assert_eq!(syscall_name(400), "unknown");
}

const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

/// What a thread of `kind` gets for `nr`: the stricter of its own filter and, on every
/// thread but the event loop's, the refusal filter (as the kernel combines stacked filters).
fn outcome(kind: ThreadKind, nr: i64) -> u32 {
    let own = run(&program(kind).unwrap(), nr, [0; 6]);
    if kind == ThreadKind::Vmm {
        return own;
    }
    let refusal = run(&refusal_program().unwrap(), nr, [0; 6]);
    // Lower action values take precedence (TRAP 0x0003_0000 < ERRNO 0x0005_0000 < ALLOW).
    let (a, b) = (own & 0xffff_0000, refusal & 0xffff_0000);
    if a <= b {
        own
    } else {
        refusal
    }
}

#[test]
fn opening_files_fails_with_eacces_except_on_the_event_loop() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::BlockIo,
        ThreadKind::Api,
    ] {
        for nr in [libc::SYS_openat, libc::SYS_open] {
            assert_eq!(
                outcome(kind, nr),
                SECCOMP_RET_ERRNO | libc::EACCES as u32,
                "{kind:?} {}",
                syscall_name(nr)
            );
        }
        // The refusal filter changes nothing else: a forbidden call still traps, an allowed
        // one still runs.
        assert_eq!(outcome(kind, libc::SYS_execve), SECCOMP_RET_TRAP);
        assert_eq!(outcome(kind, libc::SYS_futex), SECCOMP_RET_ALLOW);
    }
    assert_eq!(
        outcome(ThreadKind::Vmm, libc::SYS_openat),
        SECCOMP_RET_ALLOW
    );
}
