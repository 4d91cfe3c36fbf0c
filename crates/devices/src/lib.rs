//! Emulated platform devices for Keel guests and the buses they sit on.
//!
//! Devices see only offsets into their own register window and plain bytes; they never see
//! KVM. A device that needs the VMM to act (power off, reset) says so through
//! [`PlatformEvents`]; a device that raises an interrupt does so through an `EventFd` the VMM
//! wired to the in-kernel irqchip.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod debug_port;
pub mod i8042;
pub mod log;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

/// Why the guest wants the VM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopRequest {
    /// Power-off (ACPI S5).
    PowerOff,
    /// Reset / reboot.
    Reset,
}

/// The VMM's side of device-initiated platform events.
pub trait PlatformEvents: Send + Sync {
    /// The guest asked to power off or reset; `source` names the mechanism ("ACPI S5", "i8042").
    fn request_stop(&self, request: StopRequest, source: &'static str);
}
