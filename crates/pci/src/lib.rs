//! A PCI root complex for Keel guests: configuration space (port I/O 0xCF8/0xCFC and an ECAM
//! window), BAR allocation and dispatch, and MSI-X.
//!
//! Devices implement [`PciDevice`]; the [`PciRoot`] owns bus 0 and exposes three bus devices
//! the VMM maps: [`PciConfigIo`] on the port-I/O bus, and [`PciConfigMmio`] (ECAM) and
//! [`PciBarWindow`] (BAR accesses) on the MMIO bus. Every value here comes from the guest and
//! is treated as hostile: odd sizes, offsets and patterns are ignored, never trusted.

mod config;
mod host_bridge;
mod msix;
mod root;
mod state;

pub use config::{BarKind, BarRegion, PciConfiguration, PciHeader};
pub use host_bridge::HostBridge;
/// Rate-limited warnings for what a guest can trigger at will (see `keel_devices::log`).
pub use keel_devices::guest_warn;
pub use msix::{KvmMsiRouter, MsiRouter, MsixConfig, MsixState, MSIX_ENTRY_SIZE};
pub use root::{BarAllocator, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot};
pub use state::PciConfigState;

/// Errors building the PCI topology.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free PCI slot on bus 0 (32 devices at most)")]
    NoFreeSlot,
    #[error("no room for a {size:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace { size: u64 },
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
    #[error("BAR {0} is out of range or already in use")]
    BadBarIndex(usize),
    #[error("no room for a {0}-byte capability in configuration space")]
    NoCapabilitySpace(usize),
    #[error("setting up an MSI-X vector: {0}")]
    Msi(String),
    #[error("saved PCI state does not fit this device: {0}")]
    BadState(String),
}

/// A PCI function on bus 0.
///
/// Configuration-space reads and writes arrive already split into naturally aligned
/// accesses of 1, 2 or 4 bytes inside the 4 KiB space; BAR accesses arrive with the BAR index
/// and the offset into it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// A guest read of configuration space at `offset`.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// A guest write to configuration space at `offset`.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The guest moved BAR `bar` or switched its decoding: `old`/`new` are the guest-physical
    /// base addresses while decoding, `None` while it is off. Devices that registered
    /// ioeventfds inside the BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}
