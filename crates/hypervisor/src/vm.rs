//! A KVM virtual machine: memory slots, in-kernel interrupt controllers, irqfds, vCPUs.

use crate::irq::IrqRouter;
use crate::{Error, HostInfo, Result, Vcpu};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// One region of host memory mapped into the guest's physical address space.
#[derive(Clone, Copy, Debug)]
pub struct MemorySlot {
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
    /// Guest writes to a read-only slot exit to the VMM as MMIO writes (ROM semantics).
    pub read_only: bool,
}

/// An open KVM VM.
pub struct Vm {
    pub(crate) fd: Arc<VmFd>,
    router: IrqRouter,
    host: HostInfo,
    next_slot: u32,
}

/// Where KVM keeps its three-page TSS for real-mode emulation (below the 4 GiB boundary, in
/// the MMIO hole, never RAM).
const TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    pub(crate) fn new(fd: VmFd, host: HostInfo) -> Self {
        let fd = Arc::new(fd);
        Vm {
            router: IrqRouter::new(fd.clone()),
            fd,
            host,
            next_slot: 0,
        }
    }

    /// The host facts this VM was created under.
    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    /// The VM's interrupt routing, irqfds and ioeventfds, for devices to keep while it runs.
    pub fn irq_router(&self) -> IrqRouter {
        self.router.clone()
    }

    /// Maps `slot` into the guest.
    ///
    /// # Safety
    /// `slot.host_addr .. slot.host_addr + slot.size` must be a mapping owned by the caller
    /// that stays valid (not unmapped or remapped) for the lifetime of this VM.
    pub unsafe fn map_memory(&mut self, slot: MemorySlot) -> Result<u32> {
        let read_only = slot.read_only && self.host.has("read-only memory slots");
        let region = kvm_userspace_memory_region {
            slot: self.next_slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: the caller guarantees the host range is a live mapping that outlives the VM
        // (this function's contract); KVM validates alignment and overlap itself.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| Error::MemorySlot {
            guest_addr: slot.guest_addr,
            size: slot.size,
            source: e.into(),
        })?;
        self.next_slot += 1;
        Ok(region.slot)
    }

    /// Creates the in-kernel PIC, IOAPIC and local APICs, and the in-kernel PIT.
    /// Must run before any vCPU is created.
    pub fn create_irqchip(&self) -> Result<()> {
        self.fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(|e| Error::Ioctl("KVM_SET_TSS_ADDR", e.into()))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| Error::Ioctl("KVM_CREATE_IRQCHIP", e.into()))?;
        let pit = kvm_pit_config {
            // The PC speaker port (0x61) is served in-kernel as a dummy: Linux polls it while
            // calibrating the TSC against PIT channel 2.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| Error::Ioctl("KVM_CREATE_PIT2", e.into()))
    }

    /// Makes every write to `evt` raise interrupt line `gsi` in the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| Error::Ioctl("KVM_IRQFD", e.into()))
    }

    /// Creates vCPU `id` (its initial APIC ID). vCPU 0 is the bootstrap processor; the others
    /// wait for INIT/SIPI from the guest when the in-kernel irqchip is in use.
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Ioctl("KVM_CREATE_VCPU", e.into()))?;
        Ok(Vcpu::new(fd, id))
    }
}
