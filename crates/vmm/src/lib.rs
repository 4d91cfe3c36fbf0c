//! The Keel VMM: builds a VM from a [`VmConfig`] and runs it to its end ([`Outcome`]).
//!
//! ```text
//! VmConfig ──Vmm::new──▶ guest memory + ACPI + kernel + devices + vCPUs ──Vmm::run──▶ Outcome
//! ```
//! `Vmm::run` starts one thread per vCPU. Each loops on `KVM_RUN` and dispatches port I/O and
//! MMIO exits to the device buses; the calling thread feeds console input and waits for a stop
//! (guest power-off/reset, a vCPU failure, a signal, or a [`StopHandle`]).

mod activator;
mod api;
pub mod config;
mod confine;
pub mod device_config;
mod devices;
mod error;
pub mod exit;
mod memory;
pub mod migration;
mod pause;
pub mod quirks;
mod report;
mod runner;
pub mod snapshot;
mod vm;

pub use config::{parse_size, VmConfig};
pub use devices::default_vsock_socket_path;
pub use error::VmmError;
pub use exit::{ExitReason, ExitStats, Outcome};
pub use runner::install_stop_signal_handlers;
pub use vm::{BootInfo, HostPath, StopHandle, VmIo, Vmm};
