//! KVM's dirty-page log, the ground live migration stands on: a tiny real-mode guest writes
//! pages between two port writes, and the log holds exactly the pages it wrote in each
//! stretch, not the ones the host wrote. Needs /dev/kvm (reported ignored without).

mod common;

use keel_hypervisor::{Hypervisor, MemorySlot, VcpuExit};
use libtest_mimic::{Arguments, Failed, Trial};

const MEM: usize = 1 << 20;
const CODE: u64 = 0x1000;

/// `mov byte [addr], 1` (16-bit addressing, DS = 0).
fn store(addr: u16) -> Vec<u8> {
    let [lo, hi] = addr.to_le_bytes();
    vec![0xc6, 0x06, lo, hi, 0x01]
}

fn dirty_log_holds_what_the_guest_wrote() -> Result<(), Failed> {
    let e = |e: keel_hypervisor::Error| Failed::from(e.to_string());
    let hv = Hypervisor::open().map_err(e)?;
    let mut vm = hv.create_vm().map_err(e)?;
    // SAFETY: a fresh private anonymous mapping; unmapped at the end of this test, after the
    // VM (and its slot) is gone.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let mut code = Vec::new();
    for a in [0x3000u16, 0x5000, 0x9000, 0x9800] {
        code.extend(store(a));
    }
    code.extend([0xe6, 0x10]); // out 0x10, al
    code.extend(store(0x7000));
    code.extend([0xe6, 0x11]); // out 0x11, al
    code.extend([0xf4]); // hlt
                         // SAFETY: `code` fits in the mapping at CODE (well inside MEM).
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            host.cast::<u8>().add(CODE as usize),
            code.len(),
        )
    };
    // SAFETY: the mapping stays valid until the end of this function, after `vm` is dropped.
    unsafe {
        vm.map_memory(MemorySlot {
            guest_addr: 0,
            size: MEM as u64,
            host_addr: host as u64,
            read_only: false,
        })
    }
    .map_err(e)?;
    let mut vcpu = vm.create_vcpu(0).map_err(e)?;
    let mut sregs = vcpu.get_sregs().map_err(e)?;
    for s in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        s.base = 0;
        s.selector = 0;
    }
    vcpu.set_sregs(&sregs).map_err(e)?;
    let mut regs = vcpu.get_regs().map_err(e)?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(e)?;
    vm.set_dirty_logging(true).map_err(e)?;
    // The host's own writes are not the guest's: they stay out of the log.
    // SAFETY: one byte inside the mapping.
    unsafe { *host.cast::<u8>().add(0xb000) = 1 };

    let mut run_to = |port: u16| -> Result<(), Failed> {
        for _ in 0..100 {
            match vcpu.run().map_err(e)? {
                VcpuExit::IoOut(p, _) if p == port => return Ok(()),
                VcpuExit::IoOut(p, _) => return Err(format!("out to {p:#x}").into()),
                VcpuExit::Interrupted => {}
                other => return Err(format!("unexpected exit {other:?}").into()),
            }
        }
        Err("no exit".into())
    };
    let pages = |logs: &[keel_hypervisor::DirtyLog]| -> Vec<u64> {
        logs.iter()
            .flat_map(|l| l.pages().collect::<Vec<_>>())
            .collect()
    };
    run_to(0x10)?;
    let first = vm.take_dirty_log().map_err(e)?;
    run_to(0x11)?;
    let second = vm.take_dirty_log().map_err(e)?;
    let third = vm.take_dirty_log().map_err(e)?;
    vm.set_dirty_logging(false).map_err(e)?;
    let off = vm.take_dirty_log().map_err(e)?;
    drop(vcpu);
    drop(vm);
    // SAFETY: unmaps the mapping made above; nothing uses it any more.
    unsafe { libc::munmap(host, MEM) };

    if pages(&first) != [0x3000, 0x5000, 0x9000] {
        return Err(format!("first stretch: dirty {:x?}", pages(&first)).into());
    }
    if pages(&second) != [0x7000] || second.iter().map(|l| l.count()).sum::<u64>() != 1 {
        return Err(format!("second stretch: dirty {:x?}", pages(&second)).into());
    }
    if !pages(&third).is_empty() {
        return Err(format!("nothing written since: dirty {:x?}", pages(&third)).into());
    }
    if !off.is_empty() {
        return Err("logging off: no slot is logged".into());
    }
    eprintln!("dirty log: {:x?} then {:x?}", pages(&first), pages(&second));
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![Trial::test(
        "dirty_log_holds_what_the_guest_wrote",
        dirty_log_holds_what_the_guest_wrote,
    )];
    let trials = common::skip_without_kvm(trials, "dirty-log tests");
    libtest_mimic::run(&args, trials).exit();
}
