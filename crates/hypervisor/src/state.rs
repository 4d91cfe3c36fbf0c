//! A vCPU's architectural state and a VM's in-kernel devices as plain data (serde), for
//! snapshots and migration: read from a stopped vCPU with [`Vcpu::save_state`], written into
//! a fresh one (same CPUID) with [`Vcpu::restore_state`]; the PICs, IOAPIC, PIT and KVM clock
//! with [`Vm::save_state`] and [`Vm::restore_state`].

use crate::{Error, Result, Vcpu, Vm};
use kvm_bindings::{
    kvm_clock_data, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

/// The x87/SSE state of `kvm_fpu` (which kvm-bindings does not serialise).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Most MSRs read or written in one ioctl.
const MSR_CHUNK: usize = 64;

/// Everything KVM keeps for one vCPU that a restore needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// Extended control registers, where the host has XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR KVM saves that this vCPU could read (the TSC included).
    pub msrs: Vec<(u32, u64)>,
}

fn msr_entries(indices: impl Iterator<Item = u32>) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
        .map_err(|e| Error::Ioctl("KVM_GET_MSRS", std::io::Error::other(format!("{e:?}"))))
}

impl Vcpu {
    /// Reads the vCPU's state. The vCPU must not be running (paused, or never started).
    /// `msr_indices` is [`crate::Hypervisor::msr_index_list`]; MSRs this vCPU cannot read
    /// are left out.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState> {
        let io = |what: &'static str| move |e: kvm_ioctls::Error| Error::Ioctl(what, e.into());
        let mut msrs = Vec::with_capacity(msr_indices.len());
        let mut rest: &[u32] = msr_indices;
        while !rest.is_empty() {
            let chunk = rest.get(..MSR_CHUNK.min(rest.len())).unwrap_or(rest);
            let mut buf = msr_entries(chunk.iter().copied())?;
            let n = self.fd.get_msrs(&mut buf).map_err(io("KVM_GET_MSRS"))?;
            msrs.extend(buf.as_slice().iter().take(n).map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            let used = if n < chunk.len() { n + 1 } else { n };
            rest = rest.get(used.max(1)..).unwrap_or(&[]);
        }
        Ok(VcpuState {
            regs: self.get_regs()?,
            sregs: self.get_sregs()?,
            fpu: FpuState::from(&self.get_fpu()?),
            lapic: self.get_lapic()?,
            mp_state: self.get_mp_state()?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(io("KVM_GET_VCPU_EVENTS"))?,
            xcrs: self.fd.get_xcrs().ok(),
            msrs,
        })
    }

    /// Writes `state` into this vCPU (created with the same CPUID as the saved one, in a VM
    /// with an in-kernel irqchip).
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let io = |what: &'static str| move |e: kvm_ioctls::Error| Error::Ioctl(what, e.into());
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        self.set_fpu(&kvm_fpu::from(&state.fpu))?;
        if let Some(x) = &state.xcrs {
            self.fd.set_xcrs(x).map_err(io("KVM_SET_XCRS"))?;
        }
        self.set_lapic(&state.lapic)?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let mut buf = msr_entries(chunk.iter().map(|&(i, _)| i))?;
            for (e, &(_, data)) in buf.as_mut_slice().iter_mut().zip(chunk) {
                e.data = data;
            }
            self.set_msrs(&buf)?;
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(io("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

/// The VM-wide state KVM keeps in the kernel: interrupt controllers, the PIT and the clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl Vm {
    /// Reads the in-kernel devices' state (the vCPUs should be stopped).
    pub fn save_state(&self) -> Result<VmState> {
        let io = |what: &'static str| move |e: kvm_ioctls::Error| Error::Ioctl(what, e.into());
        let get = |id: u32| {
            let mut c = chip(id);
            self.fd
                .get_irqchip(&mut c)
                .map(|()| c)
                .map_err(io("KVM_GET_IRQCHIP"))
        };
        Ok(VmState {
            pic_master: get(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(io("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(io("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes `state` into this VM (created with [`Vm::create_irqchip`]). The clock is set
    /// to the saved time: guest time does not jump by how long the VM was stopped.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        let io = |what: &'static str| move |e: kvm_ioctls::Error| Error::Ioctl(what, e.into());
        for c in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(c).map_err(io("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&state.pit).map_err(io("KVM_SET_PIT2"))?;
        // Only the time: the flags KVM reports (e.g. the TSC being stable) are not settable.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(io("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
