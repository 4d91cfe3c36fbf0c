//! The guest-physical memory map of a Keel x86_64 VM.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM)
//! 0x0000_0500  GDT                      0x0000_6000  PVH start_info + memory map
//! 0x0000_7000  boot_params (zero page)  0x0000_9000  identity page tables (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved) .. 0x000a_0000
//! 0x000a_0000  legacy VGA hole (unbacked: MMIO exits)
//! 0x000e_0000  "BIOS ROM": ACPI tables, read-only to the guest where KVM allows
//! 0x0010_0000  RAM: kernel, initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, devices)
//! 0x1_0000_0000  RAM above 4 GiB, when the VM has more than 3 GiB
//! ```

use serde::{Deserialize, Serialize};

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Number of page-directory pages: each maps 1 GiB with 2 MiB pages. Four cover the low 4 GiB.
pub const PDE_PAGES: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 `COMMAND_LINE_SIZE` is 2048 since 2.6.x; newer kernels accept more via the setup
/// header's `cmdline_size`. Keel caps at 4 KiB.
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const VGA_HOLE_START: u64 = 0xa0000;
pub const ROM_START: u64 = 0xe0000;
pub const ROM_SIZE: u64 = 0x20000;
/// Where the kernel goes: 1 MiB ("high memory" in boot-protocol terms).
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The window the PCI host bridge decodes for 32-bit BARs: the bottom of the MMIO gap.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI Express ECAM (memory-mapped configuration space) for bus 0, right after it.
pub const PCI_ECAM_START: u64 = PCI_MMIO_START + PCI_MMIO_SIZE;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The smallest VM Keel builds: room for the boot structures, a kernel and an initrd.
pub const MIN_MEMORY: u64 = 32 << 20;

// The boot structures must not overlap each other or the EBDA.
const _: () = assert!(PDE_START + PDE_PAGES * 0x1000 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_ADDR as u64);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= PML4_START);

/// e820 memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// A range of guest-physical memory backed by host RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub start: u64,
    pub size: u64,
    /// Mapped read-only into the guest (the ROM area).
    pub read_only: bool,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// One entry of the firmware memory map the guest is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The backed ranges of a VM with `mem_size` bytes of RAM (`mem_size >= MIN_MEMORY`).
///
/// The VGA hole is left unbacked (accesses exit as MMIO), the ROM area is backed but
/// read-only, and RAM that would overlap the 32-bit MMIO hole moves above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![
        RamRange {
            start: 0,
            size: VGA_HOLE_START,
            read_only: false,
        },
        RamRange {
            start: ROM_START,
            size: ROM_SIZE,
            read_only: true,
        },
        RamRange {
            start: HIMEM_START,
            size: low_end - HIMEM_START,
            read_only: false,
        },
    ];
    if mem_size > MMIO_GAP_START {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            read_only: false,
        });
    }
    ranges
}

/// The e820 map for a VM with `mem_size` bytes of RAM.
///
/// The guest is told about all the RAM it was given: the bytes hidden by the VGA hole and the
/// ROM area come from the total, so `sum(RAM entries) == mem_size - 384 KiB - 1 KiB` for VMs
/// under 3 GiB (exactly what a PC firmware reports).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    // Linux uses ECAM only if firmware reserved it (or ACPI says so).
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// The highest address (exclusive) of RAM below 4 GiB: where the initrd goes under.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_has_no_high_ram() {
        let r = ram_ranges(256 << 20);
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].end(), 256 << 20);
        let e = e820_map(256 << 20);
        let ram: u64 = e
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_vm_skips_the_mmio_hole() {
        let mem = 4u64 << 30;
        let r = ram_ranges(mem);
        assert_eq!(r.len(), 4);
        assert_eq!(r[2].end(), MMIO_GAP_START);
        assert_eq!(r[3].start, MMIO_GAP_END);
        assert_eq!(r[3].size, mem - MMIO_GAP_START);
        for w in r.windows(2) {
            assert!(w[0].end() <= w[1].start, "ranges overlap: {w:?}");
        }
        let e = e820_map(mem);
        assert!(e.iter().all(|e| e.kind != E820_RAM
            || e.addr + e.size <= MMIO_GAP_START
            || e.addr >= MMIO_GAP_END));
        assert!(e
            .iter()
            .any(|e| e.kind == E820_RESERVED && e.addr == PCI_ECAM_START));
    }
}
