//! What kind of KVM this host has, and which of the capabilities Keel relies on it offers.

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// How `/dev/kvm` executes guests on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KvmKind {
    /// Intel VT-x (`kvm_intel`).
    IntelVtx,
    /// AMD-V / SVM (`kvm_amd`).
    AmdSvm,
    /// PVM (`kvm_pvm`): software-assisted KVM without hardware virtualisation. Guest
    /// kernel-mode code is emulated; stock kernels need guest-side workarounds.
    Pvm,
    /// A KVM whose backing module Keel does not recognise.
    Unknown,
}

impl KvmKind {
    /// Detects the kind from the loaded KVM vendor module (sysfs) and the CPU flags.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    fn detect_in(modules: &Path, cpuinfo: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            return KvmKind::Pvm;
        }
        if modules.join("kvm_intel").exists() {
            return KvmKind::IntelVtx;
        }
        if modules.join("kvm_amd").exists() {
            return KvmKind::AmdSvm;
        }
        // Built-in vendor modules have no sysfs directory with parameters on some kernels:
        // fall back to the CPU flags.
        let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let has_flag = |f: &str| {
            flags
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == f))
        };
        if has_flag("vmx") {
            KvmKind::IntelVtx
        } else if has_flag("svm") {
            KvmKind::AmdSvm
        } else {
            KvmKind::Unknown
        }
    }

    /// True when guests run on hardware virtualisation extensions.
    pub fn is_hardware(self) -> bool {
        matches!(self, KvmKind::IntelVtx | KvmKind::AmdSvm)
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmKind::IntelVtx => "hardware (Intel VT-x, kvm_intel)",
            KvmKind::AmdSvm => "hardware (AMD-V, kvm_amd)",
            KvmKind::Pvm => "PVM (kvm_pvm: software-assisted, no VT-x/AMD-V)",
            KvmKind::Unknown => "unknown KVM backend",
        })
    }
}

/// A KVM capability Keel uses, and whether Keel cannot run without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: &'static str,
    pub required: bool,
    pub present: bool,
}

/// The capabilities Keel checks, in the order `host-check` prints them.
const CAPABILITIES: &[(&str, Cap, bool)] = &[
    ("user memory", Cap::UserMemory, true),
    ("in-kernel irqchip", Cap::Irqchip, true),
    ("PIT2", Cap::Pit2, true),
    ("irqfd", Cap::Irqfd, true),
    ("immediate exit", Cap::ImmediateExit, true),
    ("set TSS address", Cap::SetTssAddr, true),
    ("irq routing", Cap::IrqRouting, false),
    ("ioeventfd", Cap::Ioeventfd, false),
    ("read-only memory slots", Cap::ReadonlyMem, false),
    ("split irqchip", Cap::SplitIrqchip, false),
    ("x2APIC API", Cap::X2ApicApi, false),
    ("TSC deadline timer", Cap::TscDeadlineTimer, false),
    ("XSAVE", Cap::Xsave, false),
    ("XCRS", Cap::Xcrs, false),
    ("adjust clock", Cap::AdjustClock, false),
    ("dirty-log ring", Cap::DirtyLogRing, false),
    ("signal MSI", Cap::SignalMsi, false),
    ("nested state", Cap::NestedState, false),
];

/// A snapshot of the host's KVM.
#[derive(Clone, Debug, Serialize)]
pub struct HostInfo {
    pub kind: KvmKind,
    pub api_version: i32,
    pub max_vcpus: usize,
    pub recommended_vcpus: usize,
    pub capabilities: Vec<Capability>,
}

impl HostInfo {
    pub(crate) fn probe(kvm: &Kvm) -> Self {
        let capabilities = CAPABILITIES
            .iter()
            .map(|&(name, cap, required)| Capability {
                name,
                required,
                present: kvm.check_extension(cap),
            })
            .collect();
        HostInfo {
            kind: KvmKind::detect(),
            api_version: kvm.get_api_version(),
            max_vcpus: kvm.get_max_vcpus(),
            recommended_vcpus: kvm.get_nr_vcpus(),
            capabilities,
        }
    }

    /// Whether the named capability is present.
    pub fn has(&self, name: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.name == name && c.present)
    }

    /// The first required capability that is missing, if any.
    pub fn missing_required(&self) -> Option<&'static str> {
        self.capabilities
            .iter()
            .find(|c| c.required && !c.present)
            .map(|c| c.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keel-host-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn detects_pvm_before_hardware_modules() {
        let d = tmp("pvm");
        std::fs::create_dir_all(d.join("kvm_pvm")).unwrap();
        std::fs::create_dir_all(d.join("kvm_intel")).unwrap();
        assert_eq!(KvmKind::detect_in(&d, &d.join("none")), KvmKind::Pvm);
    }

    #[test]
    fn falls_back_to_cpu_flags() {
        let d = tmp("flags");
        std::fs::write(d.join("cpuinfo"), "processor : 0\nflags : fpu svm sse\n").unwrap();
        assert_eq!(KvmKind::detect_in(&d, &d.join("cpuinfo")), KvmKind::AmdSvm);
        std::fs::write(d.join("cpuinfo"), "flags : fpu sse\n").unwrap();
        assert_eq!(KvmKind::detect_in(&d, &d.join("cpuinfo")), KvmKind::Unknown);
        assert!(!KvmKind::Unknown.is_hardware());
        assert!(KvmKind::IntelVtx.is_hardware());
    }
}
