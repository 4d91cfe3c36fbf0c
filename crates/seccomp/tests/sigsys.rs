//! A thread that makes a system call outside its filter kills the process with SIGSYS, and
//! the report on stderr names the thread, its filter and the call. Each case re-executes
//! this test binary as a child that confines one thread and then misbehaves.

use keel_seccomp::ThreadKind;
use libtest_mimic::{Arguments, Failed, Trial};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD: &str = "KEEL_SECCOMP_TEST_CHILD";

/// In the child: confine a thread named `victim` with `kind`, then run `act` on it.
fn child(case: &str) -> ! {
    let (kind, act): (ThreadKind, fn()) = match case {
        "vcpu-socket" => (ThreadKind::Vcpu, || {
            // SAFETY: plain socket(2) call; the filter traps it before the kernel runs it.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }),
        "api-socket" => (ThreadKind::Api, || {
            // SAFETY: plain socket(2) call; the filter traps it before the kernel runs it.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        }),
        "api-open-refused" => (ThreadKind::Api, || {
            // Opening a file fails (EACCES) instead of killing: glibc's allocator may try.
            match std::fs::File::open("/etc/hostname") {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => eprintln!("open refused"),
                other => eprintln!("open: {other:?}"),
            }
        }),
        "device-inet-socket" => (ThreadKind::Device, || {
            // A device thread may open Unix sockets (vsock), never an Internet one.
            // SAFETY: plain socket(2) call; the filter traps it before the kernel runs it.
            unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) };
        }),
        "vcpu-allowed" => (ThreadKind::Vcpu, || {
            // Only what a vCPU thread may do: memory, a write to stderr, a futex.
            let v = vec![0u8; 1 << 20];
            eprintln!("allowed calls only ({} bytes)", v.len());
        }),
        other => {
            eprintln!("unknown case {other}");
            std::process::exit(2)
        }
    };
    if let Err(e) = keel_seccomp::prepare() {
        eprintln!("prepare: {e}");
        std::process::exit(3);
    }
    let t = std::thread::Builder::new()
        .name("victim".into())
        .spawn(move || {
            if let Err(e) = keel_seccomp::apply(kind) {
                eprintln!("apply: {e}");
                std::process::exit(4);
            }
            act();
        })
        .unwrap_or_else(|e| {
            eprintln!("spawn: {e}");
            std::process::exit(5)
        });
    let _ = t.join();
    std::process::exit(0)
}

fn run_case(case: &str) -> Result<(std::process::ExitStatus, String), Failed> {
    run_case_in(case, false)
}

/// `pid1`: run the child as the init process of a new PID namespace, as a jailed VMM is
/// (init ignores a SIGSYS it sends itself; the report must kill it all the same).
fn run_case_in(case: &str, pid1: bool) -> Result<(std::process::ExitStatus, String), Failed> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = if pid1 {
        // util-linux's unshare --fork re-raises the signal its child died of.
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--kill-child"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let out = cmd
        .env(CHILD, case)
        .output()
        .map_err(|e| format!("cannot run the child: {e}"))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn expect_sigsys(case: &str, kind: &str, call: &str) -> Result<(), Failed> {
    expect_sigsys_in(case, kind, call, false)
}

fn expect_sigsys_in(case: &str, kind: &str, call: &str, pid1: bool) -> Result<(), Failed> {
    let (status, err) = run_case_in(case, pid1)?;
    if status.signal() != Some(libc::SIGSYS) {
        return Err(format!(
            "{case}: expected death by SIGSYS (31), got {status:?}; stderr:\n{err}"
        )
        .into());
    }
    let want =
        format!("keel: seccomp: thread 'victim' ({kind} filter) made forbidden syscall {call}");
    if !err.contains(&want) {
        return Err(format!("{case}: stderr lacks {want:?}:\n{err}").into());
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("*** SKIPPING the PID-namespace case: it needs root (CAP_SYS_ADMIN) ***");
    }
    root
}

fn main() {
    if let Ok(case) = std::env::var(CHILD) {
        child(&case);
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("vcpu_thread_calling_socket_dies_by_sigsys", || {
            // socket(AF_INET, SOCK_STREAM, 0): the report shows the call's arguments.
            expect_sigsys(
                "vcpu-socket",
                "vcpu",
                "socket (41) with arguments 0x2, 0x1, 0x0;",
            )
        }),
        Trial::test("api_thread_making_a_socket_dies_by_sigsys", || {
            expect_sigsys(
                "api-socket",
                "api",
                "socket (41) with arguments 0x1, 0x1, 0x0;",
            )
        }),
        Trial::test("a_thread_opening_a_file_gets_eacces_and_lives", || {
            let (status, err) = run_case("api-open-refused")?;
            if status.code() != Some(0) || !err.contains("open refused") {
                return Err(format!("status {status:?}, stderr:\n{err}").into());
            }
            Ok(())
        }),
        Trial::test(
            "device_thread_opening_an_inet_socket_dies_by_sigsys",
            || expect_sigsys("device-inet-socket", "device", "socket (41)"),
        ),
        Trial::test("as_init_of_a_pid_namespace_it_still_dies_by_sigsys", || {
            expect_sigsys_in("vcpu-socket", "vcpu", "socket (41)", true)
        })
        .with_ignored_flag(!is_root()),
        Trial::test("a_thread_within_its_filter_runs_to_the_end", || {
            let (status, err) = run_case("vcpu-allowed")?;
            if status.code() != Some(0) || !err.contains("allowed calls only") {
                return Err(format!("status {status:?}, stderr:\n{err}").into());
            }
            Ok(())
        }),
    ];
    libtest_mimic::run(&args, trials).exit();
}
