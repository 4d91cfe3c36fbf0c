//! Guest memory as the vCPUs see it, and the part of it devices may use.
//!
//! The ROM area (ACPI and MP tables) is a read-only KVM slot: guest stores to it exit and are
//! ignored. Devices reach guest memory from the host side, where KVM's protection does not
//! apply, so they get a view without the read-only ranges: a descriptor pointing into the ROM
//! fails like one pointing at no memory at all, and the balloon cannot discard ROM pages.

use keel_arch::layout;
use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestAddress;

/// Guest memory with a dirty bitmap per region (the devices' view, see `keel_virtio`).
pub(crate) type GuestMemoryMmap = keel_virtio::GuestMemory;
/// One region of it.
pub(crate) type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// The same host mappings, seen two ways.
pub(crate) struct GuestRam {
    /// Every range of `layout::ram_ranges`, ROM included (the VMM writes the tables here).
    pub all: GuestMemoryMmap,
    /// Only the writable ranges: what virtio devices get.
    pub devices: GuestMemoryMmap,
}

/// Allocates anonymous memory for a VM of `size` bytes.
pub(crate) fn allocate(size: u64) -> Result<GuestRam, String> {
    let mut all = Vec::new();
    let mut writable = Vec::new();
    for r in layout::ram_ranges(size) {
        let len = usize::try_from(r.size).map_err(|e| e.to_string())?;
        let region = GuestRegionMmap::from_range(GuestAddress(r.start), len, None)
            .map(Arc::new)
            .map_err(|e| e.to_string())?;
        if !r.read_only {
            writable.push(region.clone());
        }
        all.push(region);
    }
    Ok(GuestRam {
        all: GuestMemoryMmap::from_arc_regions(all).map_err(|e| e.to_string())?,
        devices: GuestMemoryMmap::from_arc_regions(writable).map_err(|e| e.to_string())?,
    })
}

/// The guest pages (guest-physical address / 4 KiB) written through `mem` from the host side
/// since the last call — by devices, or by the balloon discarding them — clearing the marks.
/// KVM's dirty log holds the guest's own writes; live migration needs both.
pub(crate) fn take_host_written(mem: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut pages = Vec::new();
    for region in mem.iter() {
        let first = region.start_addr().0 / keel_snapshot::PAGE as u64;
        let map: &vm_memory::MmapRegion<AtomicBitmap> = region;
        for (w, mut word) in map.bitmap().get_and_reset().into_iter().enumerate() {
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                pages.push(first + w as u64 * 64 + bit);
                word &= word - 1;
            }
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn devices_see_ram_but_not_the_rom() {
        let ram = allocate(64 << 20).unwrap();
        let rom = GuestAddress(layout::ROM_START);
        ram.all.write_obj(0x5aa5u16, rom).unwrap();
        assert!(ram.devices.write_obj(0u16, rom).is_err());
        assert!(ram.devices.read_obj::<u16>(rom).is_err());
        assert_eq!(ram.all.read_obj::<u16>(rom).unwrap(), 0x5aa5);
        // A buffer running from the ROM into RAM fails as a whole for devices.
        let straddle = GuestAddress(layout::ROM_START + layout::ROM_SIZE - 4);
        assert!(ram.devices.write_slice(&[1; 8], straddle).is_err());
        assert!(ram.all.write_slice(&[1; 8], straddle).is_ok());
        // RAM below and above the holes is the same memory in both views.
        for a in [0x1000u64, 0x10_0000, (64 << 20) - 8] {
            ram.devices.write_obj(a, GuestAddress(a)).unwrap();
            assert_eq!(ram.all.read_obj::<u64>(GuestAddress(a)).unwrap(), a);
        }
        assert_eq!(ram.all.num_regions(), ram.devices.num_regions() + 1);
    }

    #[test]
    fn host_side_writes_are_marked_once() {
        let ram = allocate(64 << 20).unwrap();
        let _ = take_host_written(&ram.all);
        assert!(take_host_written(&ram.all).is_empty());
        // One byte, a buffer across a page boundary, one page above the ROM hole.
        ram.devices.write_obj(7u8, GuestAddress(0x3000)).unwrap();
        ram.devices
            .write_slice(&[1; 16], GuestAddress(0x10_0ff8))
            .unwrap();
        ram.devices.write_obj(1u64, GuestAddress(32 << 20)).unwrap();
        // Reads mark nothing.
        let _ = ram.devices.read_obj::<u64>(GuestAddress(0x5000)).unwrap();
        let want = [3, 0x100, 0x101, (32 << 20) / 4096];
        // Both views share the regions and so their marks.
        assert_eq!(take_host_written(&ram.devices), want);
        assert!(take_host_written(&ram.all).is_empty());
        ram.all.write_obj(2u32, GuestAddress(0x3004)).unwrap();
        assert_eq!(take_host_written(&ram.devices), [3]);
    }
}
