//! Initial vCPU state for the two boot protocols Keel supports.
//!
//! - **PVH** (ELF vmlinux with a `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit protected mode,
//!   paging off, flat segments, `%ebx` = the `hvm_start_info` address.
//! - **Linux 64-bit boot protocol** (bzImage, or an ELF without the PVH note): long mode on
//!   identity-mapped page tables covering the low 4 GiB, `%rsi` = the zero page.

use crate::layout::{GDT_START, PDE_PAGES, PDE_START, PDPTE_START, PML4_START};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors in Keel's boot GDT (index * 8).
pub const BOOT_CS64: u16 = 0x08;
pub const BOOT_CS32: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// The boot GDT: null, 64-bit code, 32-bit code, data, TSS.
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Encodes a segment descriptor from its flags (type/S/DPL/P in the low byte, AVL/L/D/G in
/// bits 12..16 of `flags`), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The `kvm_segment` a descriptor loads into a segment register.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let flags = |shift: u32, bits: u64| ((entry >> shift) & bits) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = flags(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit_raw << 12) | 0xfff) as u32
        } else {
            limit_raw as u32
        },
        selector,
        type_: flags(40, 0xf),
        present: flags(47, 1),
        dpl: flags(45, 3),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g,
        avl: flags(52, 1),
        unusable: u8::from(flags(47, 1) == 0),
        padding: 0,
    }
}

/// How the bootstrap vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH 32-bit entry at `entry`, start_info at `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit Linux boot protocol entry at `entry`, zero page at `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT or page tables into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes the boot GDT and identity page tables (low 4 GiB, 2 MiB pages).
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries map 2 MiB pages (PS bit), present + writable.
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))?;
    for pd in 0..PDE_PAGES {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPTE_START + pd * 8))?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            mem.write_obj(phys | 0x83, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers for the boot vCPU in `mode`, starting from KVM's reset state `base`.
pub fn boot_sregs(base: &kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let mut s = *base;
    s.gdt.base = GDT_START;
    s.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    let data = segment_from_gdt(GDT[3], BOOT_DS);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment_from_gdt(GDT[4], BOOT_TSS);
    match mode {
        EntryMode::Pvh { .. } => {
            s.cs = segment_from_gdt(GDT[2], BOOT_CS32);
            s.cr0 = X86_CR0_PE | X86_CR0_ET;
            s.cr4 = 0;
            s.cr3 = 0;
            s.efer = 0;
        }
        EntryMode::Linux64 { .. } => {
            s.cs = segment_from_gdt(GDT[1], BOOT_CS64);
            s.cr3 = PML4_START;
            s.cr4 = X86_CR4_PAE;
            s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            s.efer = EFER_LME | EFER_LMA;
        }
    }
    s
}

/// General-purpose registers for the boot vCPU in `mode`.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh { entry, start_info } => {
            r.rip = entry;
            r.rbx = start_info;
        }
        EntryMode::Linux64 { entry, boot_params } => {
            r.rip = entry;
            r.rsi = boot_params;
        }
    }
    r
}

/// x87/SSE state at reset: FCW = 0x37f (all exceptions masked), MXCSR = 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs64 = segment_from_gdt(GDT[1], BOOT_CS64);
        assert_eq!((cs64.l, cs64.db, cs64.g, cs64.present), (1, 0, 1, 1));
        assert_eq!(cs64.limit, 0xffff_ffff);
        assert_eq!(cs64.type_, 0xb);
        let cs32 = segment_from_gdt(GDT[2], BOOT_CS32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment_from_gdt(GDT[3], BOOT_DS);
        assert_eq!((ds.type_, ds.s, ds.base), (0x3, 1, 0));
        let tss = segment_from_gdt(GDT[4], BOOT_TSS);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(gdt_entry(0xc093, 0x1234_5678, 0xfffff) >> 56, 0x12);
    }

    #[test]
    fn page_tables_identity_map_low_4g() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        // Walk 0xfee0_0000 (the LAPIC) through the tables by hand.
        let va: u64 = 0xfee0_0000;
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .unwrap();
        assert_eq!(pde & 0x80, 0x80, "2 MiB page");
        assert_eq!(pde & !0x1f_ffff, va & !0x1f_ffff);
    }

    #[test]
    fn entry_modes_set_the_protocol_registers() {
        let base = kvm_sregs::default();
        let pvh = EntryMode::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        let s = boot_sregs(&base, pvh);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cs.db, 1);
        let r = boot_regs(pvh);
        assert_eq!((r.rip, r.rbx), (0x100_0000, 0x6000));
        let lm = EntryMode::Linux64 {
            entry: 0x100_200,
            boot_params: 0x7000,
        };
        let s = boot_sregs(&base, lm);
        assert_eq!(s.efer & EFER_LMA, EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(boot_regs(lm).rsi, 0x7000);
    }
}
