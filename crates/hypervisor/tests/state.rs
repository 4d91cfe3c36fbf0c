//! vCPU state survives a save, a trip through serde, and a restore into a vCPU of a fresh
//! VM: what snapshots and migration will stand on. Needs /dev/kvm (reported ignored without).

mod common;

use keel_hypervisor::{Hypervisor, Vcpu, VcpuState};
use libtest_mimic::{Arguments, Failed, Trial};

fn vcpu(hv: &Hypervisor) -> Result<(keel_hypervisor::Vm, Vcpu), Failed> {
    let vm = hv.create_vm().map_err(|e| e.to_string())?;
    vm.create_irqchip().map_err(|e| e.to_string())?;
    let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = hv.supported_cpuid().map_err(|e| e.to_string())?;
    vcpu.set_cpuid(&cpuid).map_err(|e| e.to_string())?;
    Ok((vm, vcpu))
}

fn round_trip() -> Result<(), Failed> {
    let hv = Hypervisor::open().map_err(|e| e.to_string())?;
    let msrs = hv.msr_index_list().map_err(|e| e.to_string())?;
    let (_vm_a, a) = vcpu(&hv)?;
    // A recognisable state: registers, a segment, an FPU control word, the TSC.
    let mut regs = a.get_regs().map_err(|e| e.to_string())?;
    regs.rax = 0x1234_5678_9abc_def0;
    regs.rip = 0xfff0;
    regs.rflags = 0x2;
    a.set_regs(&regs).map_err(|e| e.to_string())?;
    let mut sregs = a.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0xf0000;
    sregs.cs.selector = 0xf000;
    a.set_sregs(&sregs).map_err(|e| e.to_string())?;
    let mut fpu = a.get_fpu().map_err(|e| e.to_string())?;
    fpu.fcw = 0x37e;
    fpu.xmm[3] = [0xab; 16];
    a.set_fpu(&fpu).map_err(|e| e.to_string())?;
    let saved = a.save_state(&msrs).map_err(|e| e.to_string())?;
    if saved.msrs.is_empty() {
        return Err("no MSR was saved".into());
    }
    let json = serde_json::to_string(&saved).map_err(|e| e.to_string())?;
    let loaded: VcpuState = serde_json::from_str(&json).map_err(|e| e.to_string())?;

    let (_vm_b, b) = vcpu(&hv)?;
    b.restore_state(&loaded).map_err(|e| e.to_string())?;
    let again = b.save_state(&msrs).map_err(|e| e.to_string())?;
    let r = again.regs;
    if (r.rax, r.rip, r.rflags) != (regs.rax, regs.rip, regs.rflags) {
        return Err(format!("registers: {r:?}").into());
    }
    if again.sregs.cs.base != 0xf0000 || again.sregs.cs.selector != 0xf000 {
        return Err(format!("cs: {:?}", again.sregs.cs).into());
    }
    if again.fpu.fcw != 0x37e || again.fpu.xmm[3] != [0xab; 16] {
        return Err(format!("fpu: {:?}", again.fpu).into());
    }
    if again.lapic.regs[..0x400] != saved.lapic.regs[..0x400] {
        // The LAPIC timer's current count moves; compare the ID and SVR registers.
        let id = |s: &VcpuState| {
            (
                s.lapic.regs[0x20..0x24].to_vec(),
                s.lapic.regs[0xf0..0xf4].to_vec(),
            )
        };
        if id(&again) != id(&saved) {
            return Err("LAPIC ID/SVR differ after restore".into());
        }
    }
    if again.mp_state.mp_state != saved.mp_state.mp_state {
        return Err("MP state differs after restore".into());
    }
    // Every saved MSR was restored; the TSC (0x10) moved on, never back.
    let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.0 == 0x10).map(|m| m.1);
    if let (Some(t0), Some(t1)) = (tsc(&saved), tsc(&again)) {
        if t1 < t0 {
            return Err(format!("TSC went back: {t0} → {t1}").into());
        }
    }
    let idx = |s: &VcpuState| s.msrs.iter().map(|m| m.0).collect::<Vec<_>>();
    if idx(&again) != idx(&saved) {
        return Err("a different set of MSRs after restore".into());
    }
    eprintln!(
        "saved and restored {} MSRs, xcrs: {}, {} bytes of JSON",
        saved.msrs.len(),
        saved.xcrs.is_some(),
        json.len()
    );
    Ok(())
}

/// The PICs, IOAPIC, PIT and clock of one VM, into another.
fn vm_round_trip() -> Result<(), Failed> {
    let hv = Hypervisor::open().map_err(|e| e.to_string())?;
    let (vm_a, _a) = vcpu(&hv)?;
    let mut saved = vm_a.save_state().map_err(|e| e.to_string())?;
    // Program IOAPIC pin 4 (vector 0x34, masked off) through the saved image and the PIT's
    // channel 0 count, then restore that into a fresh VM and read it back.
    let redir = 0x0000_0000_0000_0034u64;
    // SAFETY: an IOAPIC chip's payload (chip_id KVM_IRQCHIP_IOAPIC) is the `ioapic` member.
    unsafe { saved.ioapic.chip.ioapic.redirtbl[4].bits = redir };
    saved.pit.channels[0].count = 0x1234;
    let json = serde_json::to_string(&saved).map_err(|e| e.to_string())?;
    let loaded: keel_hypervisor::VmState =
        serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let (vm_b, _b) = vcpu(&hv)?;
    let before = vm_b.save_state().map_err(|e| e.to_string())?;
    vm_b.restore_state(&loaded).map_err(|e| e.to_string())?;
    let again = vm_b.save_state().map_err(|e| e.to_string())?;
    // SAFETY: as above, the IOAPIC chip's payload is the `ioapic` member.
    let got = unsafe { again.ioapic.chip.ioapic.redirtbl[4].bits };
    if got != redir {
        return Err(format!("IOAPIC pin 4 reads {got:#x}, want {redir:#x}").into());
    }
    if again.pit.channels[0].count != 0x1234 {
        return Err(format!("PIT channel 0 count {:#x}", again.pit.channels[0].count).into());
    }
    // The clock continues from the saved time, not from the new VM's own.
    if again.clock.clock < saved.clock.clock {
        return Err("the KVM clock went back".into());
    }
    eprintln!(
        "VM state: {} bytes of JSON; clock {} ns saved, {} ns fresh VM, {} ns restored",
        json.len(),
        saved.clock.clock,
        before.clock.clock,
        again.clock.clock
    );
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("vcpu_state_survives_save_serde_and_restore", round_trip),
        Trial::test(
            "vm_irqchip_pit_and_clock_survive_save_serde_and_restore",
            vm_round_trip,
        ),
    ];
    let trials = common::skip_without_kvm(trials, "vCPU state tests");
    libtest_mimic::run(&args, trials).exit();
}
