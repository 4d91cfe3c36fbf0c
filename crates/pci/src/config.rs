//! One PCI function's configuration space: the type 0 header, BARs and a capability list.

use crate::PciError;
use serde::{Deserialize, Serialize};

/// Bytes of configuration space per function (PCI Express extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// The conventional part; capabilities live here.
const STANDARD_SIZE: usize = 256;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

const COMMAND_STATUS: usize = 1;
pub(crate) const BAR0: usize = 4;
const SUBSYSTEM: usize = 11;
const CAP_POINTER: usize = 13;
const INTERRUPT: usize = 15;
/// Command register bits the guest may set: I/O and memory decoding, bus mastering,
/// INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
pub const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_IO: u32 = 1 << 0;
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// First offset after the type 0 header where capabilities may go.
const FIRST_CAP: usize = 0x40;

/// Identity of a function, written into its header.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Mem32,
    Mem64,
    Io,
}

/// A base address register as the VMM set it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarRegion {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

impl BarRegion {
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | u32::from(self.prefetchable) << 3,
        }
    }

    fn low_mask(&self) -> u32 {
        let keep = if self.kind == BarKind::Io { 0x3 } else { 0xf };
        !(self.size.saturating_sub(1) as u32) & !keep
    }
}

/// Configuration space of one function. Registers are kept as the guest reads them; a
/// per-dword mask says which bits a guest write may change.
#[derive(Clone, Serialize, Deserialize)]
pub struct PciConfiguration {
    pub(crate) regs: Vec<u32>,
    pub(crate) writable: Vec<u32>,
    bars: [Option<BarRegion>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

fn le_merge(old: u32, at: usize, data: &[u8]) -> u32 {
    let mut b = old.to_le_bytes();
    for (i, v) in data.iter().enumerate() {
        if let Some(slot) = b.get_mut(at + i) {
            *slot = *v;
        }
    }
    u32::from_le_bytes(b)
}

impl PciConfiguration {
    pub fn new(h: &PciHeader) -> Self {
        let mut regs = vec![0u32; DWORDS];
        let mut writable = vec![0u32; DWORDS];
        regs[0] = u32::from(h.vendor_id) | u32::from(h.device_id) << 16;
        regs[2] = u32::from(h.revision)
            | u32::from(h.prog_if) << 8
            | u32::from(h.subclass) << 16
            | u32::from(h.class) << 24;
        regs[SUBSYSTEM] = u32::from(h.subsystem_vendor_id) | u32::from(h.subsystem_id) << 16;
        writable[COMMAND_STATUS] = COMMAND_WRITABLE;
        // Cache line size and latency timer are scratch registers to a virtual device.
        writable[3] = 0x0000_ffff;
        // Interrupt line: scratch for the OS. Interrupt pin 0: Keel devices use MSI-X.
        writable[INTERRUPT] = 0xff;
        PciConfiguration {
            regs,
            writable,
            bars: [None; 6],
            last_cap: None,
            next_cap: FIRST_CAP,
        }
    }

    /// Adds a BAR at guest-physical `addr` (or I/O port). A 64-bit BAR uses `index` and
    /// `index + 1`.
    pub fn add_bar(&mut self, bar: BarRegion, addr: u64) -> Result<(), PciError> {
        let i = bar.index;
        let width = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        if i + width > 6 || (i..i + width).any(|j| self.bars[j].is_some() || self.is_upper_half(j))
        {
            return Err(PciError::BadBarIndex(i));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        if !bar.size.is_power_of_two() || bar.size < min || !addr.is_multiple_of(bar.size) {
            return Err(PciError::BadBarSize(bar.size));
        }
        if bar.kind != BarKind::Mem64 && (addr + bar.size) > (1 << 32) {
            return Err(PciError::BadBarSize(bar.size));
        }
        self.regs[BAR0 + i] = (addr as u32 & bar.low_mask()) | bar.flags();
        self.writable[BAR0 + i] = bar.low_mask();
        if width == 2 {
            self.regs[BAR0 + i + 1] = (addr >> 32) as u32;
            self.writable[BAR0 + i + 1] = !((bar.size.saturating_sub(1)) >> 32) as u32;
        }
        self.bars[i] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, j: usize) -> bool {
        j > 0 && matches!(self.bars[j - 1], Some(b) if b.kind == BarKind::Mem64)
    }

    /// The BARs, in index order.
    pub fn bars(&self) -> impl Iterator<Item = BarRegion> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The address the guest programmed into BAR `index`, whether or not it decodes.
    pub fn bar_programmed_address(&self, index: usize) -> Option<u64> {
        let bar = (*self.bars.get(index)?)?;
        let low = u64::from(self.regs[BAR0 + index] & bar.low_mask());
        Some(match bar.kind {
            BarKind::Mem64 => low | u64::from(self.regs[BAR0 + index + 1]) << 32,
            _ => low,
        })
    }

    /// Where BAR `index` decodes now: `None` while the guest has decoding off.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = (*self.bars.get(index)?)?;
        let cmd = self.regs[COMMAND_STATUS];
        let on = match bar.kind {
            BarKind::Io => cmd & COMMAND_IO != 0,
            _ => cmd & COMMAND_MEMORY != 0,
        };
        on.then(|| self.bar_programmed_address(index)).flatten()
    }

    /// Turns memory and I/O decoding on, as firmware leaves a device it assigned.
    pub fn enable_decoding(&mut self) {
        self.regs[COMMAND_STATUS] |= COMMAND_MEMORY | COMMAND_IO;
    }

    /// Appends a capability (`body` starts with the ID byte; the next-pointer byte is
    /// filled in here). `writable` gives per-byte masks of what the guest may change, the
    /// same length as `body`. Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, PciError> {
        let len = body.len().max(2).next_multiple_of(4);
        let at = self.next_cap;
        if at + len > STANDARD_SIZE || writable.len() != body.len() {
            return Err(PciError::NoCapabilitySpace(body.len()));
        }
        let mut bytes = body.to_vec();
        bytes.resize(len, 0);
        bytes[1] = 0;
        let mut mask = writable.to_vec();
        mask.resize(len, 0);
        mask[0] = 0;
        mask[1] = 0;
        for (k, (b, m)) in bytes.chunks(4).zip(mask.chunks(4)).enumerate() {
            let d = at / 4 + k;
            self.regs[d] = le_merge(0, 0, b);
            self.writable[d] = le_merge(0, 0, m);
        }
        match self.last_cap {
            None => self.regs[CAP_POINTER] = at as u32,
            Some(prev) => self.regs[prev / 4] = le_merge(self.regs[prev / 4], 1, &[at as u8]),
        }
        self.regs[COMMAND_STATUS] |= STATUS_CAP_LIST;
        self.last_cap = Some(at);
        self.next_cap = at + len;
        Ok(at)
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the space read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i);
            *out = match self.regs.get(o / 4) {
                Some(r) => r.to_le_bytes()[o % 4],
                None => 0xff,
            };
        }
    }

    /// Reads the dword at `offset` (rounded down to 4).
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(u32::MAX)
    }

    /// Applies a guest write: only bits the register lets the guest change move.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let o = offset.saturating_add(done);
            let in_dword = (4 - o % 4).min(data.len() - done);
            let Some(old) = self.regs.get(o / 4).copied() else {
                return;
            };
            let new = le_merge(old, o % 4, &data[done..done + in_dword]);
            let touched = le_merge(0, o % 4, &[0xff; 4][..in_dword]);
            let mask = self.writable[o / 4] & touched;
            self.regs[o / 4] = (old & !mask) | (new & mask);
            done += in_dword;
        }
    }

    /// Overwrites a dword regardless of the guest-writable mask (device-owned registers).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(offset / 4) {
            *r = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn header_reads_back_and_ids_are_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        c.write(0, &[0xff; 4]);
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8) >> 24, 1);
        let mut b = [0u8; 2];
        c.read(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1042);
        // Beyond the space: all-ones, no panic.
        let mut far = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE - 2, &mut far);
        assert_eq!(far[2..], [0xff, 0xff]);
        c.write(CONFIG_SPACE_SIZE - 1, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = PciConfiguration::new(&header());
        let bar = BarRegion {
            index: 0,
            kind: BarKind::Mem32,
            size: 0x8000,
            prefetchable: false,
        };
        c.add_bar(bar, 0xc000_0000).unwrap();
        assert_eq!(c.bar_address(0), None, "decoding starts off");
        c.write(4, &[0x06, 0]); // memory decoding + bus master
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        c.write(4, &[0x04, 0]); // decoding off while sizing, as Linux does
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_u32(0x10), 0xffff_8000);
        assert_eq!(c.bar_address(0), None);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(4, &[0x06, 0]);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        // 64-bit BAR: upper half fully writable, low flags stay.
        let b64 = BarRegion {
            index: 2,
            kind: BarKind::Mem64,
            size: 0x4000,
            prefetchable: true,
        };
        c.add_bar(b64, 0x1_0000_0000).unwrap();
        assert_eq!(c.read_u32(0x18) & 0xf, 0xc);
        assert_eq!(c.bar_address(2), Some(0x1_0000_0000));
        c.write(0x1c, &0x2u32.to_le_bytes());
        assert_eq!(c.bar_address(2), Some(0x2_0000_0000));
        assert!(c.add_bar(bar, 0xc000_0000).is_err(), "index in use");
        let odd = BarRegion {
            index: 1,
            size: 0x3000,
            ..bar
        };
        assert!(c.add_bar(odd, 0).is_err());
        let upper = BarRegion { index: 3, ..bar };
        assert!(c.add_bar(upper, 0).is_err(), "upper half of BAR 2");
    }

    #[test]
    fn capabilities_chain_and_masks() {
        let mut c = PciConfiguration::new(&header());
        let a = c
            .add_capability(&[0x11, 0, 0x03, 0x00], &[0, 0, 0, 0xc0])
            .unwrap();
        let b = c.add_capability(&[0x09, 0, 5, 1, 2], &[0; 5]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(c.read_u32(0x34), 0x40);
        assert_eq!(c.read_u32(0x40) >> 8 & 0xff, 0x44);
        assert_ne!(c.read_u32(4) & STATUS_CAP_LIST, 0);
        c.write(0x43, &[0xff]);
        assert_eq!(c.read_u32(0x40) >> 24, 0xc0);
        c.write(0x44, &[0xff, 0xff]);
        assert_eq!(c.read_u32(0x44) & 0xffff, 0x0009);
        let too_big = vec![0u8; 300];
        assert!(c.add_capability(&too_big, &too_big).is_err());
    }
}
