//! Device state for snapshots: what a virtio-pci device saves when paused and takes back
//! on a fresh device built from the same configuration ([`crate::VirtioPciDevice::pause`],
//! `save_state`, `restore_state`, `resume`). Everything here is plain serde data and is
//! untrusted on the way in: every index, size, vector and address is checked.

use keel_pci::{MsixState, PciConfigState};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// Everything needed to rebuild a virtio-pci device: the transport (PCI configuration
/// space, MSI-X, the virtio common configuration, queues with their positions) and the
/// device's own state. Opaque to the VMM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VirtioPciState {
    /// Virtio device type ([`crate::types`]).
    pub device_type: u32,
    pub pci: PciConfigState,
    pub msix: MsixState,
    pub status: u8,
    pub isr: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<SavedQueue>,
    /// Ring addresses as the driver wrote them (descriptor, driver, device), per queue.
    pub ring_addrs: Vec<[u64; 3]>,
    /// The driver started the device (`DRIVER_OK` with accepted features): restoring
    /// restarts its data path on the next `resume`.
    pub activated: bool,
    pub device: DeviceState,
}

/// One virtqueue: virtio-queue's [`QueueState`] with serde.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A device's own state beyond its queues.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// Nothing beyond the queues (rng).
    Stateless,
    Block(crate::block::BlockState),
    Net(crate::net::NetState),
    Balloon(Box<crate::balloon::BalloonState>),
    Vsock(crate::vsock::VsockState),
}

impl DeviceState {
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Stateless => "stateless",
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Balloon(_) => "balloon",
            DeviceState::Vsock(_) => "vsock",
        }
    }
}

/// Why a device cannot be paused, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{device}: the saved state is for a virtio device of type {found}, this one is type \
         {expected}: the VM configuration differs from the snapshot's (devices in another order?)"
    )]
    WrongDevice {
        device: String,
        expected: u32,
        found: u32,
    },
    #[error(
        "{device}: the saved state has {found} queues, the device has {expected}: the VM \
         configuration differs from the snapshot's"
    )]
    QueueCount {
        device: String,
        expected: usize,
        found: usize,
    },
    #[error("{device}: saved queue {queue}: {why}")]
    Queue {
        device: String,
        queue: usize,
        why: String,
    },
    #[error("{device}: saved state: {why}")]
    Invalid { device: String, why: String },
    #[error("{device}: saved PCI state: {source}")]
    Pci {
        device: String,
        #[source]
        source: keel_pci::PciError,
    },
    #[error("{device}: the device is running: pause it first")]
    NotPaused { device: String },
    #[error("{device}: the device was already started: restore onto a freshly built device")]
    AlreadyStarted { device: String },
    #[error(
        "{device}: the new image is {new} bytes, the current one {old}: a replacement must \
         have the same size"
    )]
    ImageSize { device: String, old: u64, new: u64 },
    #[error(
        "{device}: the new image is {}, the current one {}: a replacement must match",
        mode(*.new_read_only), mode(*.old_read_only)
    )]
    ImageMode {
        device: String,
        old_read_only: bool,
        new_read_only: bool,
    },
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}
