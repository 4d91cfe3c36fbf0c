//! The PCI side of a VM: the root bus, its configuration and BAR windows on the buses, and
//! the virtio devices the configuration asks for.

use crate::{VmConfig, VmmError};
use keel_arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use keel_devices::Bus;
use keel_hypervisor::Vm;
use keel_pci::{
    BarAllocator, KvmMsiRouter, MsiRouter, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot,
};
use keel_virtio::{IoEvents, VirtioDevice, VirtioPciDevice};
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;

/// Host-side handles on devices that the VMM's control plane drives while the VM runs.
#[derive(Default)]
pub(crate) struct DeviceHandles {
    /// Names of the PCI devices, in slot order, for logs.
    pub names: Vec<String>,
}

struct Builder<'a> {
    mem: &'a GuestMemoryMmap,
    msi: Arc<dyn MsiRouter>,
    ioevents: Arc<dyn IoEvents>,
    bars: BarAllocator,
    root: PciRoot,
    handles: DeviceHandles,
}

impl Builder<'_> {
    fn add(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        let name = device.name();
        let dev = VirtioPciDevice::new(
            device,
            self.mem.clone(),
            self.msi.clone(),
            self.ioevents.clone(),
            &mut self.bars,
        )
        .map_err(|e| VmmError::Device {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        let bar = dev.bar_address().unwrap_or_default();
        let slot = self.root.add_device(Arc::new(Mutex::new(dev)))?;
        tracing::debug!("PCI 00:{slot:02x}.0: virtio {name}, BAR0 at {bar:#x}");
        self.handles.names.push(name);
        Ok(())
    }
}

/// Builds bus 0 with the configured devices and maps it: config ports on `pio`, ECAM and the
/// BAR window on `mmio`.
pub(crate) fn build_pci(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<DeviceHandles, VmmError> {
    let router = vm.irq_router();
    let mut b = Builder {
        mem,
        msi: Arc::new(KvmMsiRouter(router.clone())),
        ioevents: Arc::new(router),
        bars: BarAllocator::new(PCI_MMIO_START, PCI_MMIO_SIZE)?,
        root: PciRoot::new(),
        handles: DeviceHandles::default(),
    };
    if config.rng {
        b.add(Box::new(keel_virtio::rng::Rng::new()))?;
    }
    unsupported_yet(config)?;
    let root = Arc::new(b.root);
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        PciConfigIo::BASE.into(),
        PciConfigIo::LEN.into(),
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciBarWindow::new(root, PCI_MMIO_START))),
        PCI_MMIO_START,
        PCI_MMIO_SIZE,
    )?;
    Ok(b.handles)
}

fn unsupported_yet(config: &VmConfig) -> Result<(), VmmError> {
    let missing = [
        (!config.disks.is_empty(), "--disk"),
        (!config.nets.is_empty(), "--net"),
        (config.vsock.is_some(), "--vsock"),
        (config.balloon, "--balloon"),
    ];
    match missing.iter().find(|(asked, _)| *asked) {
        Some((_, flag)) => Err(VmmError::Device {
            name: flag.to_string(),
            reason: "not available in this build yet".into(),
        }),
        None => Ok(()),
    }
}
