//! A KVM virtual machine: memory slots, in-kernel interrupt controllers, irqfds, vCPUs.

use crate::irq::IrqRouter;
use crate::{Error, HostInfo, Result, Vcpu};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
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
    /// Every slot as KVM has it (dirty logging changes their flags).
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
}

/// The pages the guest wrote in one memory slot: bit `i` of `bitmap` (word `i / 64`, bit
/// `i % 64`) is page `guest_addr / 4096 + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    pub guest_addr: u64,
    pub size: u64,
    pub bitmap: Vec<u64>,
}

impl DirtyLog {
    /// Guest-physical addresses of the dirty pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.iter().enumerate().flat_map(move |(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| self.guest_addr + ((w as u64) * 64 + b) * 4096)
        })
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }
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
            slots: Mutex::new(Vec::new()),
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
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(region);
        Ok(region.slot)
    }

    /// Starts (`true`) or stops KVM's log of the pages the guest writes, on every writable
    /// slot. Starting it write-protects guest memory: each first write after that (and after
    /// each [`Vm::take_dirty_log`]) costs the guest a fault that KVM handles itself. Writes
    /// the VMM makes from the host side are not in the log.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for r in slots.iter_mut().filter(|r| r.flags & KVM_MEM_READONLY == 0) {
            let mut changed = *r;
            if on {
                changed.flags |= KVM_MEM_LOG_DIRTY_PAGES;
            } else {
                changed.flags &= !KVM_MEM_LOG_DIRTY_PAGES;
            }
            // SAFETY: the same slot over the same host mapping as `map_memory` registered
            // (whose caller keeps it valid for the VM's life); only the flags change.
            unsafe { self.fd.set_user_memory_region(changed) }.map_err(|e| Error::MemorySlot {
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
                source: e.into(),
            })?;
            *r = changed;
        }
        Ok(())
    }

    /// The pages the guest wrote in each logged slot since logging started or since the last
    /// call, which clears the log (and write-protects those pages again).
    pub fn take_dirty_log(&self) -> Result<Vec<DirtyLog>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter(|r| r.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
            .map(|r| {
                let size = usize::try_from(r.memory_size).map_err(|_| {
                    Error::Ioctl("KVM_GET_DIRTY_LOG", std::io::Error::other("slot too large"))
                })?;
                let bitmap = self
                    .fd
                    .get_dirty_log(r.slot, size)
                    .map_err(|e| Error::Ioctl("KVM_GET_DIRTY_LOG", e.into()))?;
                Ok(DirtyLog {
                    guest_addr: r.guest_phys_addr,
                    size: r.memory_size,
                    bitmap,
                })
            })
            .collect()
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
