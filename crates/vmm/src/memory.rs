//! Guest memory as the vCPUs see it, and the part of it devices may use.
//!
//! The ROM area (ACPI and MP tables) is a read-only KVM slot: guest stores to it exit and are
//! ignored. Devices reach guest memory from the host side, where KVM's protection does not
//! apply, so they get a view without the read-only ranges: a descriptor pointing into the ROM
//! fails like one pointing at no memory at all, and the balloon cannot discard ROM pages.

use keel_arch::layout;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
}
