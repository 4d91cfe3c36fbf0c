//! Per-vCPU CPUID, MSRs and local APIC set-up.

use kvm_bindings::{kvm_cpuid_entry2, kvm_lapic_state, kvm_msr_entry, CpuId, Msrs};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types in leaves 0xB/0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const KVM_CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// Errors building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the CPUID table: {0:?}")]
pub struct CpuidError(vmm_sys_util::fam::Error);

/// Adapts the host-supported CPUID to vCPU `id` of `count` (one socket, one thread per core):
/// APIC IDs, logical processor counts, the topology leaves, and the hypervisor bit.
///
/// The extended topology leaves (0xB, and 0x1F where the host has it) are rebuilt with both
/// the SMT and the core level: KVM reports only what the host has (often one subleaf), and
/// a guest that sees an SMT level alone takes every vCPU for its own package.
pub fn vcpu_cpuid(supported: &CpuId, id: u32, count: u32) -> Result<CpuId, CpuidError> {
    let core_bits = u32::BITS - count.saturating_sub(1).leading_zeros();
    let has_leaf_1f = supported
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_TOPOLOGY_V2);
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: logical CPUs sharing this
                // cache - 1: the last level (L3) is shared by all, the others are per core.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    count.saturating_sub(1)
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff)
                    | ((count.saturating_sub(1) & 0x3f) << 26)
                    | ((sharing & 0xfff) << 14);
            }
            LEAF_AMD_SIZES => {
                // NC: cores per package - 1; ApicIdSize: bits of the APIC ID that number cores.
                e.ecx =
                    (e.ecx & !0xf0ff) | (count.saturating_sub(1) & 0xff) | (core_bits.max(1) << 12);
            }
            LEAF_AMD_TOPOLOGY => {
                // Extended APIC ID; core ID (one thread per core); node 0, one node.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    let mut leaves = vec![LEAF_TOPOLOGY];
    if has_leaf_1f {
        leaves.push(LEAF_TOPOLOGY_V2);
    }
    for function in leaves {
        for (index, eax, ebx, level_type) in [
            (0, 0, 1, LEVEL_SMT),
            (1, core_bits, count, LEVEL_CORE),
            (2, 0, 0, 0),
        ] {
            entries.push(kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFICANT_INDEX,
                eax,
                ebx,
                ecx: index | (level_type << 8),
                edx: id,
                ..Default::default()
            });
        }
    }
    CpuId::from_entries(&entries).map_err(CpuidError)
}

const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM paravirtual features a guest uses through the `vmcall` hypercall instruction:
/// PV_UNHALT (7, KVM_HC_KICK_CPU), PV_SEND_IPI (11), PV_SCHED_YIELD (13),
/// HC_MAP_GPA_RANGE (16).
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13) | (1 << 16);

/// Hides the KVM paravirtual features that work through hypercalls, for hosts whose KVM
/// advertises them but cannot serve `vmcall` (PVM: a guest's PV IPI spins forever). Returns
/// the bits that were cleared.
pub fn mask_kvm_hypercall_features(cpuid: &mut CpuId) -> u32 {
    let mut cleared = 0;
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_KVM_FEATURES {
            cleared |= e.eax & KVM_HYPERCALL_FEATURES;
            e.eax &= !KVM_HYPERCALL_FEATURES;
        }
    }
    cleared
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 0x6;

/// The MSR list exceeded KVM's FAM capacity (cannot happen for the constant boot list).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the boot MSR list: {0:?}")]
pub struct MsrListError(vmm_sys_util::fam::Error);

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Result<Msrs, MsrListError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).map_err(MsrListError)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs.get(off + i).copied().unwrap_or_default() as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
        if let Some(r) = lapic.regs.get_mut(off + i) {
            *r = byte as _;
        }
    }
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as PC firmware does.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        // What a host KVM reports: leaf 0xB with one subleaf only.
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(4, 0),
            entry(LEAF_AMD_SIZES, 0),
            entry(LEAF_AMD_TOPOLOGY, 0),
        ])
        .unwrap();
        let c = vcpu_cpuid(&supported, 3, 4).unwrap();
        let f = find(&c, 1, 0);
        assert_eq!(f.ebx >> 24, 3);
        assert_eq!((f.ebx >> 16) & 0xff, 4);
        assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(f.edx & EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_SMT, 3)
        );
        let core = find(&c, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 4, LEVEL_CORE, 3)
        );
        assert_eq!(find(&c, 0xb, 2).ecx >> 8, 0, "topology enumeration ends");
        assert!(
            c.as_slice().iter().all(|e| e.function != 0x1f),
            "no 0x1F when the host lacks it"
        );
        assert_eq!(find(&c, 4, 0).eax >> 26, 3);
        assert_eq!(find(&c, LEAF_AMD_SIZES, 0).ecx & 0xf0ff, 0x2003);
        assert_eq!(find(&c, LEAF_AMD_TOPOLOGY, 0).eax, 3);
        let one = vcpu_cpuid(&supported, 0, 1).unwrap();
        assert_eq!(find(&one, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&one, 0xb, 1).eax, 0);
    }

    #[test]
    fn leaf_1f_is_rebuilt_when_present() {
        let supported =
            CpuId::from_entries(&[entry(0x1f, 0), entry(0x1f, 1), entry(0x1f, 2)]).unwrap();
        let c = vcpu_cpuid(&supported, 1, 2).unwrap();
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0x1f).count(),
            3
        );
        assert_eq!(find(&c, 0x1f, 1).ebx, 2);
    }

    #[test]
    fn hypercall_features_can_be_masked() {
        let mut kvm = entry(LEAF_KVM_FEATURES, 0);
        kvm.eax = 0x1_ffff;
        let mut c = CpuId::from_entries(&[entry(1, 0), kvm]).unwrap();
        assert_eq!(mask_kvm_hypercall_features(&mut c), KVM_HYPERCALL_FEATURES);
        assert_eq!(c.as_slice()[1].eax, 0x1_ffff & !KVM_HYPERCALL_FEATURES);
        assert_eq!(mask_kvm_hypercall_features(&mut c), 0);
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((get_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((get_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn boot_msrs_enable_mtrrs() {
        let m = boot_msrs().unwrap();
        assert!(m
            .as_slice()
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_ENABLE_WB));
    }
}
