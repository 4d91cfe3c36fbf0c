use std::path::PathBuf;

/// Why a VM could not be built or run. Messages name the input at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("--cpus must be at least 1")]
    NoVcpus,
    #[error("--cpus {asked} is more than this host's KVM allows ({max})")]
    TooManyVcpus { asked: u32, max: usize },
    #[error("--memory {asked} is too small: a VM needs at least {min}")]
    TooLittleMemory { asked: String, min: String },
    #[error("--memory {asked} is more than this host has ({host})")]
    TooMuchMemory { asked: String, host: String },
    #[error("kernel {path}: {source}")]
    KernelFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    InitrdFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: keel_arch::boot::BootError,
    },
    #[error("{0}")]
    Hypervisor(#[from] keel_hypervisor::Error),
    #[error("cannot allocate {size} of guest memory: {reason}")]
    GuestMemory { size: String, reason: String },
    #[error("ACPI tables: {0}")]
    Acpi(#[from] keel_arch::acpi::AcpiError),
    #[error("MP table: {0}")]
    MpTable(#[from] keel_arch::mptable::MpTableError),
    #[error("boot page tables: {0}")]
    BootTables(#[from] keel_arch::regs::RegsError),
    #[error("CPUID: {0}")]
    Cpuid(#[from] keel_arch::cpu::CpuidError),
    #[error("boot MSRs: {0}")]
    Msrs(#[from] keel_arch::cpu::MsrListError),
    #[error("device set-up: {0}")]
    Bus(#[from] keel_devices::BusError),
    #[error("PCI: {0}")]
    Pci(#[from] keel_pci::PciError),
    #[error("{name}: {reason}")]
    Device { name: String, reason: String },
    #[error("cgroup limits: {0}")]
    Cgroup(#[from] keel_cgroup::CgroupError),
    #[error("seccomp: {0} (run with --no-seccomp to debug without filters)")]
    Seccomp(#[from] keel_seccomp::Error),
    #[error("--net: {reason}")]
    Net { reason: String },
    #[error("--api-socket {path}: {reason}")]
    ApiSocket { path: PathBuf, reason: String },
    #[error("--disk {path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: keel_block::Error,
    },
    /// A snapshot that cannot be restored (its contents do not fit this VM or host).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A migration that cannot go on (the stream, the key, or what it carries).
    #[error("migration: {0}")]
    Migration(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// True when the user's request was at fault (exit status 2), not the host.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            VmmError::NoVcpus
                | VmmError::TooManyVcpus { .. }
                | VmmError::TooLittleMemory { .. }
                | VmmError::TooMuchMemory { .. }
                | VmmError::KernelFile { .. }
                | VmmError::InitrdFile { .. }
                | VmmError::Kernel { .. }
                | VmmError::Disk { .. }
                | VmmError::ApiSocket { .. }
                | VmmError::Cgroup(keel_cgroup::CgroupError::BadLimit(_))
                | VmmError::Net { .. }
                | VmmError::Snapshot(_)
                | VmmError::Migration(_)
        )
    }
}
