//! What a snapshot directory holds besides its manifest (`docs/snapshot-format.md`).

use crate::VmConfig;
use keel_api::{FileIdentity, Layer};
use serde::{Deserialize, Serialize};

/// Guest memory: every range of the VM's memory map back to back, zero pages as holes.
pub const MEMORY_PART: &str = "memory";
/// The machine: [`SavedVm`] as JSON.
pub const STATE_PART: &str = "state.json";
/// The disks: [`SavedDisks`] as JSON (written by whoever froze the layers).
pub const DISKS_PART: &str = "disks.json";

/// The name of disk `index`'s frozen layer `depth` (1 = the first overlay above the image
/// the VM started on) in a snapshot directory.
pub fn layer_part(index: usize, depth: usize) -> String {
    format!("disk{index}.{depth}.qcow2")
}

/// Everything about the machine but its memory and disks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVm {
    /// The configuration the VM was started with (paths as the host knows them).
    pub config: VmConfig,
    /// The KVM kind of the host it ran on ("IntelVtx", "AmdSvm", "Pvm"): vCPU state does
    /// not move between kinds.
    pub host_kind: String,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    /// By vCPU id.
    pub vcpus: Vec<keel_hypervisor::VcpuState>,
    pub vm: keel_hypervisor::VmState,
    /// The PCI functions after the host bridge, in slot order.
    pub devices: Vec<keel_virtio::VirtioPciState>,
    pub serial: keel_devices::serial::SerialSnapshot,
}

/// The disks of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDisks {
    pub disks: Vec<SavedDisk>,
}

/// One disk: the image the VM was started on (outside the snapshot, never written again
/// by Keel once a snapshot froze it) and Keel's frozen overlays above it, inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDisk {
    pub index: usize,
    pub read_only: bool,
    pub base: Layer,
    /// The base image's identity when frozen: a restore refuses a base that changed since.
    pub base_identity: FileIdentity,
    /// Part names of the frozen overlays, bottom first ([`layer_part`]).
    pub layers: Vec<String>,
}

/// The identity of an open file.
pub fn identity(file: &std::fs::File) -> std::io::Result<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok(FileIdentity {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}
