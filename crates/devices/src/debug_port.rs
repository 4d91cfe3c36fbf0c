//! Port 0x80, the POST-code port. Linux writes it for I/O delays; firmware and Keel's test
//! guests write progress codes. Keel keeps the last code for diagnostics.

use crate::BusDevice;

#[derive(Default)]
pub struct DebugPort {
    last: Option<u8>,
    writes: u64,
}

impl DebugPort {
    pub const PORT: u16 = 0x80;

    /// The last byte written, if any.
    pub fn last_code(&self) -> Option<u8> {
        self.last
    }

    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.last = Some(v);
            self.writes += 1;
        }
    }
}
