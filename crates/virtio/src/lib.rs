//! Virtio devices and their PCI transport.
//!
//! A device ([`VirtioDevice`]) knows its queues, features and configuration space, and does
//! its work on a thread of its own once the driver activates it. The transport
//! ([`VirtioPciDevice`]) is what the guest sees: a PCI function with the virtio 1.x
//! capabilities, MSI-X, and one ioeventfd per queue so notifications never wait on a vCPU
//! thread. Everything the guest puts in its rings is hostile input: a malformed request
//! fails, a malformed ring marks the device broken (`DEVICE_NEEDS_RESET`), nothing panics.

pub mod balloon;
pub mod block;
mod block_control;
mod device;
pub mod net;
pub mod pci;
pub mod rng;
pub mod state;
#[cfg(test)]
pub mod test_util;
pub mod vsock;
mod worker;

pub use device::{
    process_queue, read_config_bytes, rearm, run_hook, ActivateContext, ActivateError,
    ActivationJob, Activator, Chain, DeviceError, InlineActivator, ThreadHook, ThreadHooks,
    VirtioDevice, VirtioInterrupt, QUEUE_MAX_SIZE,
};
pub use pci::{DeviceRuntime, IoEvents, VirtioPciDevice};
pub use state::{DeviceState, SavedQueue, StateError, VirtioPciState};
pub use worker::{EventHandler, Worker};

/// Guest memory as every device sees it. Every write through it marks the pages it touched
/// in the region's bitmap: live migration's pre-copy resends what devices wrote (KVM's dirty
/// log sees only the guest's own writes).
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A descriptor chain's device-readable buffers in [`GuestMemory`].
pub type Reader<'a> = virtio_queue::Reader<'a, vm_memory::bitmap::MS<'a, GuestMemory>>;
/// A descriptor chain's device-writable buffers in [`GuestMemory`] (writes mark the bitmap).
pub type Writer<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::MS<'a, GuestMemory>>;

/// Virtio device types (virtio 1.2 §5).
pub mod types {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Feature bits every Keel device offers through the transport.
pub mod features {
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}
