//! MSI-X: the capability, the vector table and pending-bit array a device exposes in a BAR,
//! and delivery through KVM (one irqfd per vector, routed by the message the guest wrote).
//!
//! Masking is done here, in user space: a masked vector's interrupt only sets its pending
//! bit, and unmasking delivers it. Routes follow the table so the irqfd always raises what the
//! guest programmed.

use crate::{PciConfiguration, PciError};
use keel_hypervisor::{IrqRouter, MsiMessage};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const CAP_ID: u8 = 0x11;
pub(crate) const CONTROL_ENABLE: u16 = 1 << 15;
pub(crate) const CONTROL_MASK: u16 = 1 << 14;
pub(crate) const ENTRY_MASKED: u32 = 1;
/// The most vectors one function may have (table size field is 11 bits).
pub const MAX_VECTORS: usize = 2048;

/// Where MSI vectors go: KVM in the VMM, a recorder in tests.
pub trait MsiRouter: Send + Sync {
    /// A new vector: its GSI and an eventfd that raises that GSI when written.
    fn allocate_vector(&self) -> Result<(u32, EventFd), String>;
    /// Points `gsi` at `msg`, or at nothing.
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String>;
}

/// [`MsiRouter`] on the VM's KVM routing table.
pub struct KvmMsiRouter(pub IrqRouter);

impl MsiRouter for KvmMsiRouter {
    fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
        let gsi = self.0.allocate_gsi().map_err(|e| e.to_string())?;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        self.0
            .register_irqfd(&evt, gsi)
            .map_err(|e| e.to_string())?;
        Ok((gsi, evt))
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
        self.0.set_msi(gsi, msg).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// What the guest programmed: the part of MSI-X that snapshots carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// MSI-X of one function.
pub struct MsixConfig {
    pub(crate) state: MsixState,
    vectors: Vec<(u32, EventFd)>,
    router: Arc<dyn MsiRouter>,
    pub(crate) cap_offset: Option<usize>,
}

impl MsixConfig {
    /// `count` vectors, all masked, MSI-X disabled (the reset state).
    pub fn new(count: usize, router: Arc<dyn MsiRouter>) -> Result<Self, PciError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(PciError::Msi(format!(
                "{count} vectors (1..={MAX_VECTORS})"
            )));
        }
        let vectors = (0..count)
            .map(|_| router.allocate_vector())
            .collect::<Result<Vec<_>, _>>()
            .map_err(PciError::Msi)?;
        Ok(MsixConfig {
            state: MsixState {
                entries: vec![
                    MsixEntry {
                        control: ENTRY_MASKED,
                        ..Default::default()
                    };
                    count
                ],
                pending: vec![0; count.div_ceil(64)],
                enabled: false,
                function_masked: false,
            },
            vectors,
            router,
            cap_offset: None,
        })
    }

    pub fn count(&self) -> usize {
        self.state.entries.len()
    }

    /// Bytes of BAR space the table needs.
    pub fn table_size(&self) -> u64 {
        self.count() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of BAR space the pending-bit array needs (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.state.pending.len() as u64 * 8
    }

    /// Adds the MSI-X capability to `config`: table at `table_offset` and PBA at
    /// `pba_offset` (both 8-byte aligned) of BAR `bar`.
    pub fn add_capability(
        &mut self,
        config: &mut PciConfiguration,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<usize, PciError> {
        let control = (self.count() - 1) as u16;
        let mut body = vec![CAP_ID, 0];
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut writable = vec![0u8; body.len()];
        writable[3] = 0xc0; // enable and function mask
        let at = config.add_capability(&body, &writable)?;
        self.cap_offset = Some(at);
        Ok(at)
    }

    /// Call after every configuration-space write: picks up changes to the message control
    /// register of the capability.
    pub fn config_written(&mut self, config: &PciConfiguration, offset: usize, len: usize) {
        let Some(cap) = self.cap_offset else {
            return;
        };
        if offset + len <= cap + 2 || offset >= cap + 4 {
            return;
        }
        let control = (config.read_u32(cap) >> 16) as u16;
        self.set_control(control & CONTROL_ENABLE != 0, control & CONTROL_MASK != 0);
    }

    fn set_control(&mut self, enabled: bool, masked: bool) {
        let was_enabled = self.state.enabled;
        self.state.enabled = enabled;
        self.state.function_masked = masked;
        if enabled != was_enabled {
            for i in 0..self.count() {
                self.update_route(i);
            }
        }
        if enabled && !masked {
            for i in 0..self.count() {
                self.deliver_pending(i);
            }
        }
    }

    pub(crate) fn update_route(&self, i: usize) {
        let (Some(e), Some((gsi, _))) = (self.state.entries.get(i), self.vectors.get(i)) else {
            return;
        };
        let msg = self.state.enabled.then(|| e.message());
        if let Err(err) = self.router.set_route(*gsi, msg) {
            crate::guest_warn!("MSI-X vector {i}: cannot update its route: {err}");
        }
    }

    fn pending(&self, i: usize) -> bool {
        self.state
            .pending
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_pending(&mut self, i: usize, on: bool) {
        if let Some(w) = self.state.pending.get_mut(i / 64) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    fn deliver_pending(&mut self, i: usize) {
        let unmasked = self.state.entries.get(i).is_some_and(|e| !e.masked());
        if unmasked && self.pending(i) {
            self.set_pending(i, false);
            self.fire(i);
        }
    }

    fn fire(&self, i: usize) {
        if let Some((_, evt)) = self.vectors.get(i) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("MSI-X vector {i}: cannot signal its irqfd: {e}");
            }
        }
    }

    /// Raises vector `i`. Returns false when MSI-X is off or `i` is no vector (the caller
    /// has no interrupt to send); a masked vector is left pending and counts as sent.
    pub fn trigger(&mut self, i: usize) -> bool {
        if !self.state.enabled || i >= self.count() {
            return false;
        }
        let masked =
            self.state.function_masked || self.state.entries.get(i).is_none_or(|e| e.masked());
        if masked {
            self.set_pending(i, true);
        } else {
            self.fire(i);
        }
        true
    }

    /// A guest read of the vector table. Accesses are 4 or 8 bytes, naturally aligned;
    /// anything else reads as all-ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let ok = matches!(data.len(), 4 | 8) && offset.is_multiple_of(data.len() as u64);
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let v = if ok {
                self.table_dword(offset + 4 * k as u64)
            } else {
                u32::MAX
            };
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
    }

    fn table_dword(&self, offset: u64) -> u32 {
        let Some(e) = self.state.entries.get((offset / MSIX_ENTRY_SIZE) as usize) else {
            return u32::MAX;
        };
        match offset % MSIX_ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.control,
        }
    }

    /// A guest write to the vector table.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            self.write_table_dword(offset + 4 * k as u64, u32::from_le_bytes(b));
        }
    }

    fn write_table_dword(&mut self, offset: u64, v: u32) {
        let i = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(e) = self.state.entries.get_mut(i) else {
            return;
        };
        let before = *e;
        match offset % MSIX_ENTRY_SIZE {
            0 => e.addr_lo = v & !0x3,
            4 => e.addr_hi = v,
            8 => e.data = v,
            _ => e.control = v & ENTRY_MASKED,
        }
        let after = *e;
        if after.message() != before.message() && self.state.enabled {
            self.update_route(i);
        }
        if before.masked() && !after.masked() && !self.state.function_masked {
            self.deliver_pending(i);
        }
    }

    /// A guest read of the pending-bit array (read-only to the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (k, out) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(k as u64);
            *out = self
                .state
                .pending
                .get((o / 8) as usize)
                .map_or(0xff, |w| w.to_le_bytes()[(o % 8) as usize]);
        }
    }

    pub fn state(&self) -> &MsixState {
        &self.state
    }

    pub fn is_enabled(&self) -> bool {
        self.state.enabled
    }

    /// Back to the power-on state (device reset): disabled, all vectors masked.
    pub fn reset(&mut self) {
        let was = self.state.enabled;
        for e in &mut self.state.entries {
            *e = MsixEntry {
                control: ENTRY_MASKED,
                ..Default::default()
            };
        }
        self.state.pending.fill(0);
        self.state.enabled = false;
        self.state.function_masked = false;
        if was {
            for i in 0..self.count() {
                self.update_route(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        routes: Mutex<Vec<(u32, Option<MsiMessage>)>>,
        next: Mutex<u32>,
    }
    impl MsiRouter for Recorder {
        fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
            let mut n = self.next.lock().unwrap();
            *n += 1;
            Ok((
                100 + *n,
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
            ))
        }
        fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
            self.routes.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn fired(m: &MsixConfig, i: usize) -> bool {
        m.vectors[i].1.read().is_ok()
    }

    fn header() -> crate::PciHeader {
        crate::PciHeader {
            vendor_id: 1,
            device_id: 2,
            class: 0,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        }
    }

    #[test]
    fn masking_pending_and_routes() {
        let r = Arc::new(Recorder::default());
        let mut m = MsixConfig::new(3, r.clone()).unwrap();
        let mut cfg = PciConfiguration::new(&header());
        let cap = m.add_capability(&mut cfg, 0, 0x4000, 0x5000).unwrap();
        assert_eq!(cfg.read_u32(cap) >> 16 & 0x7ff, 2);
        assert!(!m.trigger(0), "disabled");
        // Program vector 1, still masked.
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(16 + 8, &0x41u32.to_le_bytes());
        // Enable MSI-X through config space.
        cfg.write(cap + 3, &[0x80]);
        m.config_written(&cfg, cap + 3, 1);
        assert!(m.is_enabled());
        let routes = r.routes.lock().unwrap().clone();
        assert!(routes.contains(&(
            102,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        )));
        assert!(m.trigger(1));
        assert!(!fired(&m, 1), "masked vectors pend");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(fired(&m, 1), "unmasking delivers the pending interrupt");
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(m.trigger(1));
        assert!(fired(&m, 1));
        // Function mask.
        cfg.write(cap + 3, &[0xc0]);
        m.config_written(&cfg, cap + 2, 2);
        assert!(m.trigger(1));
        assert!(!fired(&m, 1));
        cfg.write(cap + 3, &[0x80]);
        m.config_written(&cfg, cap + 3, 1);
        assert!(fired(&m, 1));
        assert!(!m.trigger(7), "no such vector");
    }

    #[test]
    fn hostile_table_accesses_are_ignored() {
        let mut m = MsixConfig::new(2, Arc::new(Recorder::default())).unwrap();
        let mut b = [0u8; 4];
        m.read_table(2, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut b3 = [0u8; 3];
        m.read_table(0, &mut b3);
        m.write_table(1, &[1, 2, 3, 4]);
        m.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        m.write_table(4096, &[1, 2, 3, 4]);
        let mut q = [0u8; 8];
        m.read_table(u64::MAX - 7, &mut q);
        m.read_pba(u64::MAX, &mut q);
        assert_eq!(m.state().entries[0].addr_lo, 0);
        // 8-byte access covering address low and high.
        m.write_table(0, &0x1234_5678_fee0_0004u64.to_le_bytes());
        assert_eq!(m.state().entries[0].addr_hi, 0x1234_5678);
        assert_eq!(m.state().entries[0].addr_lo, 0xfee0_0004);
        assert!(MsixConfig::new(0, Arc::new(Recorder::default())).is_err());
    }
}
