//! Bus 0: configuration access mechanisms (0xCF8/0xCFC and ECAM) and BAR dispatch.

use crate::{HostBridge, PciDevice, PciError};
use keel_devices::BusDevice;
use std::sync::{Arc, Mutex, RwLock};
use vm_allocator::{AddressAllocator, AllocPolicy};

const SLOTS: usize = 32;
const BARS: usize = 6;

/// Hands out guest-physical ranges for BARs from a window the host bridge decodes.
pub struct BarAllocator {
    alloc: AddressAllocator,
    base: u64,
    size: u64,
}

impl BarAllocator {
    pub fn new(base: u64, size: u64) -> Result<Self, PciError> {
        Ok(BarAllocator {
            alloc: AddressAllocator::new(base, size).map_err(|_| PciError::NoBarSpace { size })?,
            base,
            size,
        })
    }

    /// The window BARs are placed in: (base, size).
    pub fn window(&self) -> (u64, u64) {
        (self.base, self.size)
    }

    /// A naturally aligned range of `size` bytes (a power of two).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        if !size.is_power_of_two() {
            return Err(PciError::BadBarSize(size));
        }
        self.alloc
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciError::NoBarSpace { size })
    }
}

type Device = Arc<Mutex<dyn PciDevice>>;

#[derive(Clone, Copy)]
struct Mapping {
    start: u64,
    len: u64,
    slot: usize,
    bar: usize,
}

/// The devices on bus 0 and where their BARs decode.
pub struct PciRoot {
    slots: Vec<Option<Device>>,
    bars: RwLock<Vec<Mapping>>,
}

fn lock(d: &Device) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Device>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciRoot {
            slots,
            bars: RwLock::new(Vec::new()),
        }
    }

    /// Plugs `device` into the next free slot; returns the slot (device number).
    pub fn add_device(&mut self, device: Device) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        self.slots[slot] = Some(device);
        self.refresh_bars(slot);
        Ok(slot as u8)
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<&Device> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// A configuration read; absent functions read as all-ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, dev, func) {
            Some(d) => lock(d).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; tells the device when it moved one of its BARs.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        let Some(d) = self.device(bus, dev, func) else {
            return;
        };
        let moved = {
            let mut d = lock(d);
            let before: Vec<Option<u64>> = (0..BARS).map(|i| d.config().bar_address(i)).collect();
            d.write_config(offset, data);
            let mut moved = false;
            for (i, old) in before.into_iter().enumerate() {
                let new = d.config().bar_address(i);
                if new != old {
                    d.bar_moved(i, old, new);
                    moved = true;
                }
            }
            moved
        };
        if moved {
            self.refresh_bars(usize::from(dev));
        }
    }

    /// Re-reads where every device's BARs decode: call after restoring devices' state
    /// (a restore may move BARs without a guest configuration write).
    pub fn refresh_all_bars(&self) {
        for slot in 0..self.slots.len() {
            self.refresh_bars(slot);
        }
    }

    fn refresh_bars(&self, slot: usize) {
        let Some(Some(d)) = self.slots.get(slot) else {
            return;
        };
        let fresh: Vec<Mapping> = {
            let d = lock(d);
            d.config()
                .bars()
                .filter_map(|b| {
                    d.config().bar_address(b.index).map(|start| Mapping {
                        start,
                        len: b.size,
                        slot,
                        bar: b.index,
                    })
                })
                .collect()
        };
        let mut bars = self.bars.write().unwrap_or_else(|p| p.into_inner());
        bars.retain(|m| m.slot != slot);
        bars.extend(fresh);
    }

    fn find_bar(&self, addr: u64) -> Option<(Mapping, u64)> {
        let bars = self.bars.read().unwrap_or_else(|p| p.into_inner());
        bars.iter()
            .find(|m| addr >= m.start && addr - m.start < m.len)
            .map(|m| (*m, addr - m.start))
    }

    /// A memory read at guest-physical `addr`; false when no BAR decodes it.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((m, off)) = self.find_bar(addr) else {
            return false;
        };
        match self.slots.get(m.slot).and_then(Option::as_ref) {
            Some(d) => {
                lock(d).read_bar(m.bar, off, data);
                true
            }
            None => false,
        }
    }

    /// A memory write at guest-physical `addr`; false when no BAR decodes it.
    pub fn bar_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((m, off)) = self.find_bar(addr) else {
            return false;
        };
        match self.slots.get(m.slot).and_then(Option::as_ref) {
            Some(d) => {
                lock(d).write_bar(m.bar, off, data);
                true
            }
            None => false,
        }
    }
}

fn valid_access(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64)
}

/// Configuration mechanism #1: address register at 0xCF8, data window at 0xCFC-0xCFF.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub const BASE: u16 = 0xcf8;
    pub const LEN: u16 = 8;

    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, device, function, register offset) the address register selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize + data_offset as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 if data.len() == 4 && offset == 0 => {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            4..=7 if valid_access(offset - 4, data.len()) => match self.target(offset - 4) {
                Some((b, d, f, reg)) => self.root.config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            4..=7 if valid_access(offset - 4, data.len()) => {
                if let Some((b, d, f, reg)) = self.target(offset - 4) {
                    self.root.config_write(b, d, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: each function's 4 KiB configuration space memory-mapped (bus 0 only: 1 MiB).
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    /// Bytes of ECAM window for bus 0.
    pub const BUS0_SIZE: u64 = 1 << 20;

    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !valid_access(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let (b, d, f, reg) = Self::decode(offset);
        self.root.config_read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if valid_access(offset, data.len()) {
            let (b, d, f, reg) = Self::decode(offset);
            self.root.config_write(b, d, f, reg, data);
        }
    }
}

/// A window of guest-physical space the host bridge decodes for BARs.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
    base: u64,
}

impl PciBarWindow {
    pub fn new(root: Arc<PciRoot>, base: u64) -> Self {
        PciBarWindow { root, base }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !self.root.bar_read(self.base + offset, data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.root.bar_write(self.base + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BarKind, BarRegion, PciConfiguration, PciHeader};

    struct Dev {
        config: PciConfiguration,
        last: Option<(usize, u64, Vec<u8>)>,
        moves: Vec<(usize, Option<u64>, Option<u64>)>,
    }
    impl PciDevice for Dev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last = Some((bar, offset, data.to_vec()));
        }
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.push((bar, old, new));
        }
    }

    fn setup() -> (Arc<PciRoot>, Arc<Mutex<Dev>>) {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        let mut alloc = BarAllocator::new(0xc000_0000, 0x1000_0000).unwrap();
        let addr = alloc.allocate(0x8000).unwrap();
        config
            .add_bar(
                BarRegion {
                    index: 0,
                    kind: BarKind::Mem32,
                    size: 0x8000,
                    prefetchable: false,
                },
                addr,
            )
            .unwrap();
        config.enable_decoding();
        let dev = Arc::new(Mutex::new(Dev {
            config,
            last: None,
            moves: Vec::new(),
        }));
        let mut root = PciRoot::new();
        assert_eq!(root.add_device(dev.clone()).unwrap(), 1);
        (Arc::new(root), dev)
    }

    fn cf8(dev: u8, reg: u32) -> [u8; 4] {
        (0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes()
    }

    #[test]
    fn config_mechanism_one_finds_devices_and_absent_slots_read_ones() {
        let (root, _) = setup();
        let mut io = PciConfigIo::new(root);
        let mut d = [0u8; 4];
        io.write(0, &cf8(0, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        io.write(0, &cf8(1, 0));
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        io.write(0, &cf8(7, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Disabled address register, misaligned and odd-size accesses.
        io.write(0, &0x0000_0800u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.read(5, &mut d);
        io.write(1, &[1]);
        io.write(5, &[1, 2]);
        let mut three = [0u8; 3];
        io.read(4, &mut three);
        assert_eq!(three, [0xff; 3]);
    }

    #[test]
    fn ecam_and_bar_relocation_follow_the_guest() {
        let (root, dev) = setup();
        let mut ecam = PciConfigMmio::new(root.clone());
        let mut win = PciBarWindow::new(root.clone(), 0xc000_0000);
        let mut b = [0u8; 1];
        win.read(0x10, &mut b);
        assert_eq!(b[0], 0x10);
        let slot1 = 1u64 << 15;
        // Decoding off: the BAR vanishes.
        ecam.write(slot1 + 4, &[0x00, 0]);
        win.read(0x10, &mut b);
        assert_eq!(b[0], 0xff);
        // Move it and turn decoding on again.
        ecam.write(slot1 + 0x10, &0xc001_0000u32.to_le_bytes());
        ecam.write(slot1 + 4, &[0x02, 0]);
        win.read(0x10, &mut b);
        assert_eq!(b[0], 0xff);
        win.write(0x1_0004, &[9]);
        assert_eq!(dev.lock().unwrap().last, Some((0, 4, vec![9])));
        let moves = dev.lock().unwrap().moves.clone();
        assert_eq!(
            moves,
            vec![(0, Some(0xc000_0000), None), (0, None, Some(0xc001_0000))]
        );
        // Out-of-range bus/function and odd accesses are ignored.
        let mut d = [0u8; 4];
        ecam.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(slot1 + 1, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.write(slot1 + 0x11, &[1, 2, 3, 4]);
    }

    #[test]
    fn allocator_aligns_and_runs_out() {
        let mut a = BarAllocator::new(0xc000_0000, 0x10000).unwrap();
        assert_eq!(a.allocate(0x1000).unwrap(), 0xc000_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xc000_8000);
        assert!(a.allocate(0x8000).is_err());
        assert!(a.allocate(0x3000).is_err());
    }
}
