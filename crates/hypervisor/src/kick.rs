//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! A stop request must reach a vCPU that is blocked inside `KVM_RUN` (a halted guest) or about
//! to enter it. The vCPU thread publishes its `kvm_run` page in a thread-local; the signal
//! handler sets `immediate_exit` there, so a signal that lands just before `KVM_RUN` still
//! makes the next `KVM_RUN` return `EINTR` at once, and one that lands during it interrupts it.

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal Keel uses to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never allocates or panics for a const-initialised Cell without a destructor.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: `ptr` points at the `immediate_exit` byte of this thread's mapped `kvm_run`
            // page; it is published by `Vcpu::publish_immediate_exit` and cleared before the
            // mapping goes away (`Vcpu::drop`). A volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

/// Installs the kick handler once per process. Idempotent; a failure is reported to every
/// caller, not only the first.
pub fn install_kick_handler() -> crate::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| e.errno())
    });
    r.map_err(|errno| {
        crate::Error::Ioctl(
            "sigaction(kick signal)",
            std::io::Error::from_raw_os_error(errno),
        )
    })
}

pub(crate) fn publish(ptr: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(ptr));
}
