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
    /// The digest of each chunk of the memory part (hex, `keel_snapshot::CHUNK` bytes each),
    /// which together make the part's digest: a restore checks each chunk as the guest
    /// first uses it.
    pub memory_chunks: Vec<String>,
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

/// Most MSRs a saved vCPU may carry (KVM saves about a hundred).
const MAX_MSRS: usize = 4096;
/// Most PCI functions a saved VM may have (bus 0 has 32 slots).
const MAX_DEVICES: usize = 32;
/// Most layers a saved disk chain may have.
pub const MAX_LAYERS: usize = 64;

/// Parses and checks the state part: its shape must fit the configuration it carries
/// (untrusted input: every count is bounded before it is used).
pub fn parse_state(bytes: &[u8]) -> Result<SavedVm, String> {
    let saved = parse_machine(bytes)?;
    memory_chunks(&saved)?;
    Ok(saved)
}

/// A migrating VM's state (the last message of a migration stream): checked like
/// [`parse_state`], with no memory chunks (its memory came as pages).
pub fn parse_migration_state(bytes: &[u8]) -> Result<SavedVm, String> {
    let saved = parse_machine(bytes)?;
    if !saved.memory_chunks.is_empty() {
        return Err("a migrating VM's state lists memory chunks".into());
    }
    Ok(saved)
}

fn parse_machine(bytes: &[u8]) -> Result<SavedVm, String> {
    let saved: SavedVm =
        serde_json::from_slice(bytes).map_err(|e| format!("{STATE_PART} is malformed: {e}"))?;
    let c = &saved.config;
    if c.vcpus == 0 || c.vcpus > 254 || saved.vcpus.len() != c.vcpus as usize {
        return Err(format!(
            "{STATE_PART}: {} vCPU states for a VM of {} vCPUs",
            saved.vcpus.len(),
            c.vcpus
        ));
    }
    if c.memory < keel_arch::layout::MIN_MEMORY || c.memory > 1 << 44 {
        return Err(format!("{STATE_PART}: a memory size of {} bytes", c.memory));
    }
    if !["IntelVtx", "AmdSvm", "Pvm", "Unknown"].contains(&saved.host_kind.as_str()) {
        return Err(format!(
            "{STATE_PART}: unknown host kind {:?}",
            saved.host_kind
        ));
    }
    if let Some(v) = saved.vcpus.iter().find(|v| v.msrs.len() > MAX_MSRS) {
        return Err(format!("{STATE_PART}: a vCPU with {} MSRs", v.msrs.len()));
    }
    if saved.devices.len() > MAX_DEVICES || c.disks.len() > MAX_DEVICES {
        return Err(format!("{STATE_PART}: {} devices", saved.devices.len()));
    }
    if saved.serial.in_buffer.len() > 64 {
        return Err(format!(
            "{STATE_PART}: the serial port holds more than its FIFO"
        ));
    }
    Ok(saved)
}

/// The memory part's chunk digests, checked against the memory size.
pub fn memory_chunks(saved: &SavedVm) -> Result<Vec<[u8; 32]>, String> {
    let want = keel_snapshot::chunk_count(super::memory::file_size(saved.config.memory));
    if saved.memory_chunks.len() as u64 != want {
        return Err(format!(
            "{STATE_PART}: {} memory chunk digests for a memory part of {want} chunks",
            saved.memory_chunks.len()
        ));
    }
    saved
        .memory_chunks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            keel_snapshot::parse_digest(d).ok_or_else(|| {
                format!("{STATE_PART}: memory chunk digest {i} is not 64 hex digits")
            })
        })
        .collect()
}

/// Parses and checks the disks part against the machine (`disks` configured disks) and the
/// manifest (every layer must be one of its disk-layer parts).
pub fn parse_disks(
    bytes: &[u8],
    disks: usize,
    manifest: &keel_snapshot::Manifest,
) -> Result<SavedDisks, String> {
    let saved: SavedDisks =
        serde_json::from_slice(bytes).map_err(|e| format!("{DISKS_PART} is malformed: {e}"))?;
    if saved.disks.len() != disks {
        return Err(format!(
            "{DISKS_PART} lists {} disks; the VM has {disks}",
            saved.disks.len()
        ));
    }
    for (i, d) in saved.disks.iter().enumerate() {
        if d.index != i {
            return Err(format!(
                "{DISKS_PART}: disk {i} is listed as disk {}",
                d.index
            ));
        }
        if d.layers.len() > MAX_LAYERS {
            return Err(format!(
                "disk {i}: {} layers (at most {MAX_LAYERS})",
                d.layers.len()
            ));
        }
        if keel_block::ImageFormat::from_name(&d.base.format).is_none() {
            return Err(format!(
                "disk {i}: unknown image format {:?}",
                d.base.format
            ));
        }
        if !d.base.path.is_absolute() {
            return Err(format!(
                "disk {i}: its image path {} is not absolute",
                d.base.path.display()
            ));
        }
        for name in &d.layers {
            let is_layer = manifest
                .parts
                .iter()
                .any(|p| &p.name == name && p.kind == keel_snapshot::PartKind::DiskLayer);
            if !is_layer {
                return Err(format!(
                    "disk {i}: layer {name} is not a disk layer of the snapshot"
                ));
            }
        }
    }
    Ok(saved)
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
