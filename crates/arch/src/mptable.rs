//! The Intel MultiProcessor Specification 1.4 table.
//!
//! Linux looks for the MP floating pointer early in boot even when it then uses ACPI, by
//! scanning low memory in 16-byte steps; without one it scans all of 0xf0000..0x100000 too,
//! which is slow where guest page mappings are expensive (seconds under shadow paging). The
//! pointer sits at the start of the EBDA, the second place Linux looks; the configuration table
//! it points to lives in the ROM area. It describes the same machine as the MADT: every vCPU,
//! the ISA bus, the IOAPIC with ISA IRQ n on pin n, and LINT0/LINT1 as ExtINT/NMI.

use crate::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, ROM_SIZE, ROM_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Where the floating pointer goes (start of the EBDA).
pub const MPTABLE_POINTER: u64 = EBDA_START;
/// Where the configuration table goes: the upper half of the ROM area (ACPI uses the lower).
pub const MPTABLE_CONFIG: u64 = ROM_START + ROM_SIZE / 2;

const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and FPU/APIC feature flags: informational, Linux uses CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in an MP table (8-bit APIC IDs, 0xff is broadcast)")]
    TooManyCpus(u32),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The configuration table (header and entries) for `vcpus` processors.
fn config_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for irq in 0..ISA_IRQS {
        // Conforming polarity and trigger (flags 0), ISA bus 0 IRQ n -> IOAPIC pin n.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        // To every local APIC (0xff).
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }
    let length = (44 + entries.len()) as u16;
    let mut t = Vec::with_capacity(length.into());
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&length.to_le_bytes());
    t.push(SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"KEEL    ");
    t.extend_from_slice(b"KEELVMM     ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

fn floating_pointer(config_addr: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(b"_MP_");
    p[4..8].copy_from_slice(&config_addr.to_le_bytes());
    p[8] = 1; // length in 16-byte units
    p[9] = SPEC_REV;
    // p[11..16]: feature bytes 0 = a configuration table is present; no IMCR.
    p[10] = checksum(&p);
    p
}

/// Writes the MP floating pointer and configuration table for `vcpus` processors.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u32) -> Result<(), MpTableError> {
    let n = u8::try_from(vcpus)
        .ok()
        .filter(|n| *n < 0xff)
        .ok_or(MpTableError::TooManyCpus(vcpus))?;
    mem.write_slice(&config_table(n), GuestAddress(MPTABLE_CONFIG))?;
    mem.write_slice(
        &floating_pointer(MPTABLE_CONFIG as u32),
        GuestAddress(MPTABLE_POINTER),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn pointer_and_table_are_valid_and_complete() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa0000),
            (GuestAddress(ROM_START), ROM_SIZE as usize),
        ])
        .unwrap();
        write_mptable(&mem, 4).unwrap();
        let mut p = [0u8; 16];
        mem.read_slice(&mut p, GuestAddress(MPTABLE_POINTER))
            .unwrap();
        assert_eq!(&p[..4], b"_MP_");
        assert_eq!(sum(&p), 0);
        let addr = u32::from_le_bytes(p[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0);
        // Walk the entries.
        let count = u16::from_le_bytes([t[34], t[35]]);
        let (mut off, mut cpus, mut bsp, mut ints) = (44usize, 0, 0, 0);
        for _ in 0..count {
            match t[off] {
                ENTRY_PROCESSOR => {
                    cpus += 1;
                    bsp += usize::from(t[off + 3] & CPU_BSP != 0);
                    off += 20;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(t[off + 5], t[off + 7], "ISA IRQ n on pin n");
                    ints += 1;
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, len);
        assert_eq!((cpus, bsp, ints), (4, 1, 16));
    }

    #[test]
    fn big_vms_still_fit_and_absurd_ones_are_errors() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0xa0000),
            (GuestAddress(ROM_START), ROM_SIZE as usize),
        ])
        .unwrap();
        write_mptable(&mem, 254).unwrap();
        assert!(config_table(254).len() < (ROM_SIZE / 2) as usize);
        assert!(matches!(
            write_mptable(&mem, 255),
            Err(MpTableError::TooManyCpus(255))
        ));
    }
}
