//! A thin, typed layer over Linux KVM (`/dev/kvm`) for the rest of Keel.
//!
//! It owns three things and nothing else:
//! - [`Hypervisor`]: the open `/dev/kvm`, what the host can do ([`HostInfo`]) and VM creation;
//! - [`Vm`]: guest memory slots, the in-kernel interrupt controllers, irqfds and vCPU creation;
//! - [`Vcpu`]: register access and [`Vcpu::run`], which turns a KVM exit into a [`VcpuExit`]
//!   that owns no KVM-internal pointers.
//!
//! Everything above this crate (arch, devices, vmm) sees KVM only through these types.

mod error;
mod host;
mod irq;
mod kick;
mod state;
mod vcpu;
mod vm;

pub use error::{Error, Result};
pub use host::{Capability, HostInfo, KvmKind};
pub use irq::{IrqRouter, MsiMessage, IOAPIC_PINS};
pub use kick::{install_kick_handler, kick_signal};
pub use state::{FpuState, VcpuState, VmState};
pub use vcpu::{InternalErrorInfo, Vcpu, VcpuExit};
pub use vm::{DirtyLog, MemorySlot, Vm};

/// Re-exported so callers can name register and CPUID types without a second dependency.
pub use kvm_bindings;

use kvm_ioctls::Kvm;
use std::path::Path;

/// An open `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
    /// Probed once at open: sysfs and /proc/cpuinfo reads plus capability ioctls.
    host: HostInfo,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and checks the API version Keel is written for.
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new("/dev/kvm"))
    }

    /// Opens a KVM device node at `path` (tests and unusual hosts).
    pub fn open_path(path: &Path) -> Result<Self> {
        let kvm = Kvm::new_with_path(
            std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| {
                    Error::OpenKvm(path.into(), std::io::Error::from_raw_os_error(libc::EINVAL))
                })?
                .as_c_str(),
        )
        .map_err(|e| Error::OpenKvm(path.into(), e.into()))?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(version));
        }
        let host = HostInfo::probe(&kvm);
        Ok(Self { kvm, host })
    }

    /// What this host offers: the kind of KVM and the capabilities Keel uses.
    pub fn host_info(&self) -> &HostInfo {
        &self.host
    }

    /// The largest number of vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.host.max_vcpus
    }

    /// The CPUID entries KVM can present to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Ioctl("KVM_GET_SUPPORTED_CPUID", e.into()))
    }

    /// The MSRs KVM can save and restore for a vCPU (for [`Vcpu::save_state`]).
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(|e| Error::Ioctl("KVM_GET_MSR_INDEX_LIST", e.into()))
    }

    /// Creates an empty VM (no memory, no vCPUs).
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::Ioctl("KVM_CREATE_VM", e.into()))?;
        Ok(Vm::new(fd, self.host.clone()))
    }
}
