//! A virtual CPU: registers and the run loop's single step, `KVM_RUN`.

use crate::{kick, Error, Result};
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, CpuId, Msrs,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

/// Why `KVM_RUN` returned, in the terms Keel acts on.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from `port`: fill `data` before the next run.
    IoIn(u16, &'a mut [u8]),
    /// `out` to `port`.
    IoOut(u16, &'a [u8]),
    /// A read from unbacked guest-physical `addr`: fill `data` before the next run.
    MmioRead(u64, &'a mut [u8]),
    /// A write to unbacked or read-only guest-physical `addr`.
    MmioWrite(u64, &'a [u8]),
    /// The guest executed HLT and KVM does not handle it in-kernel (no in-kernel LAPIC).
    Hlt,
    /// Triple fault: the x86 way of resetting the machine.
    Shutdown,
    /// The guest asked for power-off (e.g. PSCI or an in-kernel device).
    SystemShutdown,
    /// The guest asked for a reset.
    SystemReset,
    /// The guest reported a crash.
    SystemCrash,
    /// `KVM_RUN` was interrupted by a signal (a kick) before or while running the guest.
    Interrupted,
    /// KVM could not continue the guest, e.g. an instruction it cannot emulate.
    InternalError(InternalErrorInfo),
    /// The hardware refused to enter the guest.
    FailEntry { reason: u64, cpu: u32 },
    /// Any other exit, named.
    Unexpected(String),
}

/// The detail KVM gives with `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InternalErrorInfo {
    /// 1 = emulation failure, 2 = simultaneous exceptions, 3 = delivery event, 4 = unexpected exit reason.
    pub suberror: u32,
    pub data: Vec<u64>,
}

impl InternalErrorInfo {
    fn from_raw(suberror: u32, ndata: u32, data: &[u64]) -> Self {
        let n = (ndata as usize).min(data.len());
        InternalErrorInfo {
            suberror,
            data: data.get(..n).unwrap_or_default().to_vec(),
        }
    }

    /// A short human name for the suberror.
    pub fn describe(&self) -> &'static str {
        match self.suberror {
            1 => "instruction emulation failed",
            2 => "exception while delivering an exception",
            3 => "event delivery failed",
            4 => "unexpected exit reason",
            _ => "unknown internal error",
        }
    }
}

/// A KVM vCPU. Owned by the one thread that runs it.
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    id: u32,
}

macro_rules! passthrough {
    ($(#[$m:meta])* $get:ident, $set:ident, $ty:ty, $gname:literal, $sname:literal) => {
        $(#[$m])*
        pub fn $get(&self) -> Result<$ty> {
            self.fd.$get().map_err(|e| Error::Ioctl($gname, e.into()))
        }
        $(#[$m])*
        pub fn $set(&self, v: &$ty) -> Result<()> {
            self.fd.$set(v).map_err(|e| Error::Ioctl($sname, e.into()))
        }
    };
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u32) -> Self {
        Vcpu { fd, id }
    }

    /// The vCPU index (and initial APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    passthrough!(get_regs, set_regs, kvm_regs, "KVM_GET_REGS", "KVM_SET_REGS");
    passthrough!(
        get_sregs,
        set_sregs,
        kvm_sregs,
        "KVM_GET_SREGS",
        "KVM_SET_SREGS"
    );
    passthrough!(get_fpu, set_fpu, kvm_fpu, "KVM_GET_FPU", "KVM_SET_FPU");
    passthrough!(
        get_lapic,
        set_lapic,
        kvm_lapic_state,
        "KVM_GET_LAPIC",
        "KVM_SET_LAPIC"
    );

    pub fn get_mp_state(&self) -> Result<kvm_mp_state> {
        self.fd
            .get_mp_state()
            .map_err(|e| Error::Ioctl("KVM_GET_MP_STATE", e.into()))
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<()> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(|e| Error::Ioctl("KVM_SET_CPUID2", e.into()))
    }

    /// Sets all of `msrs`; fails if KVM accepted fewer than all of them.
    pub fn set_msrs(&self, msrs: &Msrs) -> Result<()> {
        let n = self
            .fd
            .set_msrs(msrs)
            .map_err(|e| Error::Ioctl("KVM_SET_MSRS", e.into()))?;
        if n != msrs.as_slice().len() {
            let bad = msrs.as_slice().get(n).map(|m| m.index).unwrap_or_default();
            return Err(Error::Ioctl(
                "KVM_SET_MSRS",
                std::io::Error::other(format!("KVM rejected MSR {bad:#x}")),
            ));
        }
        Ok(())
    }

    /// Translates a guest-virtual (linear) address with the vCPU's current paging mode.
    pub fn translate(&self, linear: u64) -> Option<u64> {
        let t = self.fd.translate_gva(linear).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }

    /// Lets [`crate::kick_signal`] delivered to the calling thread interrupt this vCPU.
    /// Call on the thread that runs the vCPU, before the first [`Vcpu::run`].
    pub fn publish_immediate_exit(&mut self) {
        let run = self.fd.get_kvm_run();
        kick::publish(&mut run.immediate_exit as *mut u8);
    }

    /// Enters the guest until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        // The kvm_run page is a fixed mapping owned by `fd`; keep a raw pointer to it for the
        // two exits that need more than kvm-ioctls hands back (the borrow of `run()`'s result
        // would otherwise lock `self`).
        let run_page: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn(port, data),
                KvmExit::IoOut(port, data) => VcpuExit::IoOut(port, data),
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
                KvmExit::Hlt => VcpuExit::Hlt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::Intr => VcpuExit::Interrupted,
                KvmExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::SystemShutdown,
                    KVM_SYSTEM_EVENT_RESET => VcpuExit::SystemReset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuExit::SystemCrash,
                    other => VcpuExit::Unexpected(format!("system event {other}")),
                },
                KvmExit::FailEntry(reason, cpu) => VcpuExit::FailEntry { reason, cpu },
                KvmExit::InternalError => {
                    // SAFETY: `run_page` is the live kvm_run mapping of `fd` (see above), and
                    // KVM filled its `internal` union member: the exit reason is
                    // KVM_EXIT_INTERNAL_ERROR. It is plain integers.
                    let internal = unsafe { (*run_page).__bindgen_anon_1.internal };
                    VcpuExit::InternalError(InternalErrorInfo::from_raw(
                        internal.suberror,
                        internal.ndata,
                        &internal.data,
                    ))
                }
                other => VcpuExit::Unexpected(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `run_page` is the live kvm_run mapping of `fd`; no other reference to
                // it is alive here (the failed run returned no borrow).
                unsafe { (*run_page).immediate_exit = 0 };
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(Error::Ioctl("KVM_RUN", e.into())),
        }
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // The kvm_run page is unmapped with `fd`: make sure a late kick on this thread
        // cannot write into it.
        kick::publish(std::ptr::null_mut());
    }
}
