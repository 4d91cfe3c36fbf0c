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
    }
}
