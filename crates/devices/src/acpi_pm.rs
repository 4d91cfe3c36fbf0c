//! The hardware-reduced ACPI power-management registers: sleep control, sleep status and
//! reset, at the ports the FADT names.

use crate::{BusDevice, PlatformEvents, StopRequest};
use std::sync::Arc;

const SLP_EN: u8 = 1 << 5;

/// Registers at offsets 0 (sleep control), 1 (sleep status), 2 (reset).
pub struct AcpiPm {
    events: Arc<dyn PlatformEvents>,
    s5_type: u8,
    reset_value: u8,
}

impl AcpiPm {
    /// `s5_type` is the SLP_TYP the DSDT gives for S5; `reset_value` the FADT's RESET_VALUE.
    pub fn new(events: Arc<dyn PlatformEvents>, s5_type: u8, reset_value: u8) -> Self {
        AcpiPm {
            events,
            s5_type,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads 0: never asleep, no wake event pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == self.s5_type => {
                self.events.request_stop(StopRequest::PowerOff, "ACPI S5");
            }
            2 if v == self.reset_value => {
                self.events.request_stop(StopRequest::Reset, "ACPI reset")
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::i8042::tests::Events;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let ev = Arc::new(Events::default());
        let mut pm = AcpiPm::new(ev.clone(), 5, 1);
        pm.write(0, &[5 << 2]); // SLP_TYP without SLP_EN: nothing
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        pm.write(2, &[7]);
        pm.write(1, &[]);
        assert!(ev.0.lock().unwrap().is_empty());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        pm.write(2, &[1]);
        assert_eq!(
            ev.0.lock().unwrap().as_slice(),
            &[
                (StopRequest::PowerOff, "ACPI S5"),
                (StopRequest::Reset, "ACPI reset")
            ]
        );
    }
}
