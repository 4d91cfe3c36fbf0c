//! Human-readable vCPU state for fatal exits: registers and the code bytes at RIP.

use crate::memory::GuestMemoryMmap;
use keel_hypervisor::kvm_bindings::{kvm_regs, kvm_sregs};
use keel_hypervisor::Vcpu;
use std::fmt::Write;
use vm_memory::{Bytes, GuestAddress};

const CR0_PG: u64 = 1 << 31;
const CODE_BYTES: usize = 16;

/// Registers and code bytes of `vcpu`, formatted for an error message. Never fails: what
/// cannot be read is said to be unreadable.
pub fn describe_vcpu(vcpu: &Vcpu, mem: &GuestMemoryMmap) -> String {
    let mut out = String::new();
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    match (&regs, &sregs) {
        (Ok(r), Ok(s)) => {
            format_regs(&mut out, r, s);
            let _ = write!(out, "\n  code at rip: {}", code_bytes(vcpu, mem, r, s));
        }
        (Err(e), _) | (_, Err(e)) => {
            let _ = write!(out, "  registers unreadable: {e}");
        }
    }
    out
}

fn format_regs(out: &mut String, r: &kvm_regs, s: &kvm_sregs) {
    let _ = write!(
        out,
        "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  \
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  \
         rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  \
         r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  \
         r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n  \
         cs={:#06x} (base {:#x}, {}) cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        s.cs.selector,
        s.cs.base,
        cpu_mode(s),
        s.cr0,
        s.cr3,
        s.cr4,
        s.efer
    );
}

fn cpu_mode(s: &kvm_sregs) -> &'static str {
    if s.cr0 & 1 == 0 {
        "real mode"
    } else if s.cs.l == 1 {
        "64-bit"
    } else if s.cs.db == 1 {
        "32-bit"
    } else {
        "16-bit protected"
    }
}

fn code_bytes(vcpu: &Vcpu, mem: &GuestMemoryMmap, r: &kvm_regs, s: &kvm_sregs) -> String {
    let linear = s.cs.base.wrapping_add(r.rip);
    let phys = if s.cr0 & CR0_PG != 0 {
        vcpu.translate(linear)
    } else {
        Some(linear & 0xffff_ffff)
    };
    let Some(phys) = phys else {
        return format!("<linear {linear:#x} not mapped by the guest's page tables>");
    };
    let mut buf = [0u8; CODE_BYTES];
    // Read byte by byte so a range that runs off the end of RAM still shows what it can.
    let mut n = 0;
    for (i, b) in buf.iter_mut().enumerate() {
        match mem.read_obj::<u8>(GuestAddress(phys.wrapping_add(i as u64))) {
            Ok(v) => {
                *b = v;
                n += 1;
            }
            Err(_) => break,
        }
    }
    if n == 0 {
        return format!("<guest-physical {phys:#x} is not RAM>");
    }
    let hex: Vec<String> = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
    format!("{} (guest-physical {phys:#x})", hex.join(" "))
}
