//! Function 00.0: the host bridge, so the guest finds a root complex on bus 0.

use crate::{PciConfiguration, PciDevice, PciHeader};

pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            // Red Hat's generic PCIe host bridge ID (1b36:0008), which guests know needs no
            // chipset driver.
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x1b36,
                device_id: 0x0008,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: 0x1b36,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
