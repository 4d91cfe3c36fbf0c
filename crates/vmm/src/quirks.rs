//! Guest-side workarounds for KVM implementations that differ from hardware KVM.
//!
//! Only PVM (software-assisted KVM without VT-x/AMD-V) needs any today; on hardware hosts this
//! module changes nothing.

use keel_hypervisor::KvmKind;

/// Kernel parameters a Linux guest needs on PVM, each for a measured PVM behaviour
/// (`guest/README.md` and the test-bed notes have the details):
/// - `noxsave nofsgsbase nopcid noinvpcid`: the PVM instruction emulator cannot run XRSTOR64,
///   the FSGSBASE instructions or INVPCID in guest kernel mode;
/// - `clearcpuid=...`: features whose instructions the emulator lacks (CMPXCHG16B, SMAP's
///   CLAC, POPCNT, RDTSCP, SERIALIZE, RDPID, LFENCE_RDTSC) are turned off from the guest side,
///   the way the test-bed notes measured to work;
/// - `vdso32=0`: 32-bit user space enters the kernel through `int $0x80`, not the vDSO (whose
///   `syscall` path PVM breaks).
pub const PVM_CMDLINE: &str = "noxsave nofsgsbase nopcid noinvpcid \
clearcpuid=cx16,smap,popcnt,rdtscp,serialize,rdpid,114 vdso32=0";

/// Whether `kind` needs KVM's hypercall-based paravirtual features hidden from the guest
/// (PVM advertises PV IPIs and friends but spins forever on the guest's `vmcall`).
pub fn hide_hypercall_features(kind: KvmKind) -> bool {
    kind == KvmKind::Pvm
}

/// IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs a restore must not write back on `kind`. On PVM, a TSC-deadline timer armed by the
/// host (any value: past, now, or a second ahead) makes KVM deliver the guest's timer
/// interrupt without end once it first fires (measured: a restored idle Linux guest at 100%
/// CPU inside its tick handler); left disarmed, the guest's own next programming arms it and
/// it runs normally (pings, disk I/O, power-off as fast as before the snapshot). PVM also
/// keeps the guest TSC on the host's whatever IA32_TSC says, so the guest sees its TSC move
/// forward by the time it was stopped. Hardware KVM restores both, as saved.
pub fn unrestorable_msrs(kind: KvmKind) -> &'static [u32] {
    if kind == KvmKind::Pvm {
        &[MSR_TSC_DEADLINE]
    } else {
        &[]
    }
}

/// The parameters to append for `kind`, if any.
pub fn cmdline_quirks(kind: KvmKind) -> Option<&'static str> {
    (kind == KvmKind::Pvm).then_some(PVM_CMDLINE)
}

/// `cmdline` with the quirks for `kind` appended (unless already present).
pub fn apply(cmdline: &str, kind: KvmKind) -> (String, Option<&'static str>) {
    match cmdline_quirks(kind) {
        Some(q) if !cmdline.contains(q) => {
            let sep = if cmdline.is_empty() { "" } else { " " };
            (format!("{cmdline}{sep}{q}"), Some(q))
        }
        _ => (cmdline.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pvm_gets_quirks() {
        assert_eq!(
            apply("console=ttyS0", KvmKind::IntelVtx),
            ("console=ttyS0".into(), None)
        );
        let (c, q) = apply("console=ttyS0", KvmKind::Pvm);
        assert_eq!(q, Some(PVM_CMDLINE));
        assert!(c.starts_with("console=ttyS0 noxsave"));
        // Applying twice does not duplicate.
        assert_eq!(apply(&c, KvmKind::Pvm).0, c);
        assert_eq!(apply("", KvmKind::Pvm).0, PVM_CMDLINE);
        assert!(unrestorable_msrs(KvmKind::IntelVtx).is_empty());
        assert!(unrestorable_msrs(KvmKind::AmdSvm).is_empty());
        assert_eq!(unrestorable_msrs(KvmKind::Pvm), &[0x6e0]);
    }
}
