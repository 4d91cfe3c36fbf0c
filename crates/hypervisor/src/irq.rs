//! Interrupt plumbing devices use while the VM runs: MSI routes, irqfds and ioeventfds.
//!
//! KVM keeps one GSI routing table per VM and `KVM_SET_GSI_ROUTING` replaces it whole, so
//! [`IrqRouter`] owns the table: the legacy routes KVM installs with the in-kernel irqchip
//! (GSIs 0-23 on the IOAPIC, 0-15 also on the PICs) plus one MSI route per allocated vector.

use crate::{Error, Result};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins; MSI vectors get GSIs from here up.
pub const IOAPIC_PINS: u32 = 24;
/// KVM's routing table holds at most this many entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

/// An MSI message: what a device writes, and where, to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Default)]
struct Table {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    free: Vec<u32>,
}

/// The VM's GSI routing table, shared by every device that raises MSIs.
#[derive(Clone)]
pub struct IrqRouter {
    fd: Arc<VmFd>,
    table: Arc<Mutex<Table>>,
}

impl IrqRouter {
    pub(crate) fn new(fd: Arc<VmFd>) -> Self {
        IrqRouter {
            fd,
            table: Arc::new(Mutex::new(Table {
                next_gsi: IOAPIC_PINS,
                ..Default::default()
            })),
        }
    }

    /// Reserves a GSI for an MSI vector. It routes nowhere until [`IrqRouter::set_msi`].
    pub fn allocate_gsi(&self) -> Result<u32> {
        let mut t = self.lock();
        if let Some(g) = t.free.pop() {
            return Ok(g);
        }
        if t.next_gsi as usize >= MAX_ROUTES {
            return Err(Error::OutOfGsis);
        }
        t.next_gsi += 1;
        Ok(t.next_gsi - 1)
    }

    /// Gives a GSI back (its route, if any, is removed).
    pub fn release_gsi(&self, gsi: u32) -> Result<()> {
        let mut t = self.lock();
        let had_route = t.msi.remove(&gsi).is_some();
        t.free.push(gsi);
        if had_route {
            self.commit(&t)?;
        }
        Ok(())
    }

    /// Routes `gsi` to `msg`, or removes its route with `None` (a masked or disabled vector:
    /// irqfd writes on it are then dropped by KVM).
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<()> {
        let mut t = self.lock();
        let changed = match msg {
            Some(m) => t.msi.insert(gsi, m) != Some(m),
            None => t.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&t)?;
        }
        Ok(())
    }

    /// Makes every write to `evt` raise `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| Error::Ioctl("KVM_IRQFD", e.into()))
    }

    pub fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(evt, gsi)
            .map_err(|e| Error::Ioctl("KVM_IRQFD (deassign)", e.into()))
    }

    /// Makes guest writes of any value to MMIO address `addr` signal `evt` inside KVM, without
    /// an exit to the VMM.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| Error::Ioctl("KVM_IOEVENTFD", e.into()))
    }

    pub fn unregister_mmio_ioevent(&self, evt: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| Error::Ioctl("KVM_IOEVENTFD (deassign)", e.into()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, t: &Table) -> Result<()> {
        let entries = routing_entries(&t.msi);
        let mut routing = KvmIrqRouting::new(entries.len()).map_err(|_| Error::OutOfGsis)?;
        routing.as_mut_slice().copy_from_slice(&entries);
        self.fd
            .set_gsi_routing(&routing)
            .map_err(|e| Error::Ioctl("KVM_SET_GSI_ROUTING", e.into()))
    }
}

/// The legacy irqchip routes KVM sets up by default, then the MSI routes.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(IOAPIC_PINS as usize + 16 + msi.len());
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..16 {
        // IRQ 2 is the cascade between the two PICs; KVM does not route it to a PIC.
        if gsi < 8 {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
    }
    v.retain(|e| e.gsi != 2);
    for gsi in 0..IOAPIC_PINS {
        v.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, m) in msi {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm_and_msis_follow() {
        let mut msi = BTreeMap::new();
        msi.insert(
            30,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041,
            },
        );
        let v = routing_entries(&msi);
        // 15 PIC routes (no cascade), 24 IOAPIC routes, 1 MSI.
        assert_eq!(v.len(), 15 + 24 + 1);
        let last = v.last().copied().unwrap_or_default();
        assert_eq!(last.gsi, 30);
        assert_eq!(last.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: the entry was built as an MSI route above, so `msi` is the live union member.
        let (lo, data) = unsafe { (last.u.msi.address_lo, last.u.msi.data) };
        assert_eq!((lo, data), (0xfee0_1000, 0x4041));
        assert!(!v
            .iter()
            .any(|e| e.gsi == 2 && e.type_ == KVM_IRQ_ROUTING_IRQCHIP
            // SAFETY: irqchip entries carry the irqchip member.
            && unsafe { e.u.irqchip.irqchip } != KVM_IRQCHIP_IOAPIC));
    }
}
