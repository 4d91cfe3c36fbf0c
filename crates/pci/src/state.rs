//! Saving and restoring what a guest programmed into a function: configuration space and
//! MSI-X, as plain serde data for snapshots.
//!
//! A restore goes onto a function freshly built by the VMM from the same configuration, so
//! its identity, capabilities and read-only bits are already right: only bits the guest may
//! write are taken from the saved state, and a saved read-only bit that differs means the
//! state belongs to another device (refused, never applied).

use crate::msix::{MsixEntry, CONTROL_ENABLE, CONTROL_MASK, ENTRY_MASKED};
use crate::{MsixConfig, MsixState, PciConfiguration, PciError};
use serde::{Deserialize, Serialize};

/// A function's configuration space registers, as the guest reads them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// Every dword of the 4 KiB space.
    pub regs: Vec<u32>,
}

fn bad(why: String) -> PciError {
    PciError::BadState(why)
}

impl PciConfiguration {
    pub fn save_state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.clone(),
        }
    }

    /// Takes the guest-writable bits from `state`. Fails, changing nothing, when the space
    /// has the wrong size or a read-only bit differs (another device's state).
    pub fn restore_state(&mut self, state: &PciConfigState) -> Result<(), PciError> {
        if state.regs.len() != self.regs.len() {
            return Err(bad(format!(
                "configuration space of {} dwords, expected {}",
                state.regs.len(),
                self.regs.len()
            )));
        }
        let fixed = self
            .regs
            .iter()
            .zip(&self.writable)
            .zip(&state.regs)
            .position(|((cur, w), saved)| cur & !w != saved & !w);
        if let Some(d) = fixed {
            return Err(bad(format!(
                "read-only configuration register at {:#x} is {:#010x}, this device has \
                 {:#010x}: the state is another device's",
                d * 4,
                state.regs[d],
                self.regs[d]
            )));
        }
        for ((cur, w), saved) in self.regs.iter_mut().zip(&self.writable).zip(&state.regs) {
            *cur = (*cur & !w) | (saved & w);
        }
        Ok(())
    }

    /// The BAR registers, for checks: (index, programmed address) of each BAR.
    pub fn programmed_bars(&self) -> Vec<(usize, u64)> {
        self.bars()
            .filter_map(|b| Some((b.index, self.bar_programmed_address(b.index)?)))
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn bar_register(&self, index: usize) -> u32 {
        self.regs[crate::config::BAR0 + index]
    }
}

impl MsixConfig {
    pub fn save_state(&self) -> MsixState {
        self.state.clone()
    }

    /// Restores the vector table, pending bits and control from `state` (validated: as many
    /// vectors as this function has, enable and function mask as in `config`, whose state
    /// must be restored first), and points every vector's route at what the table says.
    pub fn restore_state(
        &mut self,
        state: &MsixState,
        config: &PciConfiguration,
    ) -> Result<(), PciError> {
        let count = self.count();
        if state.entries.len() != count || state.pending.len() != count.div_ceil(64) {
            return Err(bad(format!(
                "MSI-X with {} vectors and {} pending words, this function has {count} vectors",
                state.entries.len(),
                state.pending.len()
            )));
        }
        if let Some(cap) = self.cap_offset {
            let control = (config.read_u32(cap) >> 16) as u16;
            let enabled = control & CONTROL_ENABLE != 0;
            let masked = control & CONTROL_MASK != 0;
            if (enabled, masked) != (state.enabled, state.function_masked) {
                return Err(bad(format!(
                    "MSI-X enable/mask ({}, {}) disagree with configuration space ({enabled}, \
                     {masked})",
                    state.enabled, state.function_masked
                )));
            }
        }
        // Bits past the last vector do not exist.
        let mut pending = state.pending.clone();
        if let Some(last) = pending.last_mut() {
            let used = count % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        self.state = MsixState {
            entries: state
                .entries
                .iter()
                .map(|e| MsixEntry {
                    addr_lo: e.addr_lo & !0x3,
                    control: e.control & ENTRY_MASKED,
                    ..*e
                })
                .collect(),
            pending,
            enabled: state.enabled,
            function_masked: state.function_masked,
        };
        for i in 0..count {
            self.update_route(i);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BarKind, BarRegion, MsiRouter, PciHeader};
    use keel_hypervisor::MsiMessage;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, Option<MsiMessage>)>>, Mutex<u32>);
    impl MsiRouter for Routes {
        fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
            let mut n = self.1.lock().unwrap();
            *n += 1;
            Ok((
                *n,
                EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
            ))
        }
        fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn function(device_id: u16) -> (PciConfiguration, MsixConfig, Arc<Routes>) {
        let mut c = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        let bar = BarRegion {
            index: 0,
            kind: BarKind::Mem32,
            size: 0x8000,
            prefetchable: false,
        };
        c.add_bar(bar, 0xc000_0000).unwrap();
        let routes = Arc::new(Routes::default());
        let mut m = MsixConfig::new(3, routes.clone()).unwrap();
        m.add_capability(&mut c, 0, 0x4000, 0x6000).unwrap();
        (c, m, routes)
    }

    #[test]
    fn config_and_msix_round_trip_and_routes_follow() {
        let (mut c, mut m, _) = function(0x1044);
        c.write(4, &[0x06, 0]);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        let cap = 0x40;
        c.write(cap + 3, &[0x80]);
        m.config_written(&c, cap + 3, 1);
        m.write_table(16, &0xfee0_1000u32.to_le_bytes());
        m.write_table(24, &0x31u32.to_le_bytes());
        m.write_table(28, &0u32.to_le_bytes());
        let (cs, ms) = (c.save_state(), m.save_state());
        let json = serde_json::to_string(&(&cs, &ms)).unwrap();
        let (cs, ms): (PciConfigState, MsixState) = serde_json::from_str(&json).unwrap();

        let (mut c2, mut m2, routes) = function(0x1044);
        c2.restore_state(&cs).unwrap();
        m2.restore_state(&ms, &c2).unwrap();
        assert_eq!(c2.save_state(), c.save_state());
        assert_eq!(m2.save_state(), m.save_state());
        assert_eq!(c2.bar_address(0), Some(0xd000_0000));
        assert_eq!(c2.bar_register(0), c.bar_register(0));
        let r = routes.0.lock().unwrap();
        assert!(r.contains(&(
            2,
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x31
            })
        )));
    }

    #[test]
    fn foreign_or_malformed_state_is_refused() {
        let (c, m, _) = function(0x1044);
        let (mut other, mut om, _) = function(0x1041);
        let err = other.restore_state(&c.save_state()).unwrap_err();
        assert!(err.to_string().contains("another device"), "{err}");
        let short = PciConfigState { regs: vec![0; 3] };
        assert!(other.restore_state(&short).is_err());
        let mut ms = m.save_state();
        ms.entries.pop();
        assert!(om.restore_state(&ms, &other).is_err());
        let mut ms = m.save_state();
        ms.enabled = true; // config space says disabled
        assert!(om.restore_state(&ms, &other).is_err());
        // Pending bits past the last vector and reserved control bits are dropped.
        let mut ms = m.save_state();
        ms.pending[0] = u64::MAX;
        ms.entries[0].control = u32::MAX;
        om.restore_state(&ms, &other).unwrap();
        assert_eq!(om.save_state().pending[0], 0b111);
        assert_eq!(om.save_state().entries[0].control, 1);
    }
}
