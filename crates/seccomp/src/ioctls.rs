//! ioctl request numbers the filters allow, computed like the kernel's `_IO*` macros.

use kvm_bindings as kb;
use std::mem::size_of;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (ty << 8) | nr) as u64
}
const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;
const KVMIO: u32 = 0xae;

const fn kvm(dir: u32, nr: u32, size: usize) -> u64 {
    ioc(dir, KVMIO, nr, size)
}

pub const KVM_RUN: u64 = kvm(NONE, 0x80, 0);
pub const KVM_GET_REGS: u64 = kvm(READ, 0x81, size_of::<kb::kvm_regs>());
pub const KVM_GET_SREGS: u64 = kvm(READ, 0x83, size_of::<kb::kvm_sregs>());
pub const KVM_TRANSLATE: u64 = kvm(READ | WRITE, 0x85, size_of::<kb::kvm_translation>());
pub const KVM_GET_MP_STATE: u64 = kvm(READ, 0x98, size_of::<kb::kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = kvm(READ, 0x9f, size_of::<kb::kvm_vcpu_events>());
pub const KVM_GET_MSRS: u64 = kvm(READ | WRITE, 0x88, size_of::<kb::kvm_msrs>());
pub const KVM_GET_FPU: u64 = kvm(READ, 0x8c, size_of::<kb::kvm_fpu>());
pub const KVM_GET_LAPIC: u64 = kvm(READ, 0x8e, size_of::<kb::kvm_lapic_state>());
pub const KVM_GET_XCRS: u64 = kvm(READ, 0xa6, size_of::<kb::kvm_xcrs>());
pub const KVM_GET_IRQCHIP: u64 = kvm(READ | WRITE, 0x62, size_of::<kb::kvm_irqchip>());
pub const KVM_GET_PIT2: u64 = kvm(READ, 0x9f, size_of::<kb::kvm_pit_state2>());
pub const KVM_GET_CLOCK: u64 = kvm(READ, 0x7c, size_of::<kb::kvm_clock_data>());
pub const KVM_SET_GSI_ROUTING: u64 = kvm(WRITE, 0x6a, size_of::<kb::kvm_irq_routing>());
pub const KVM_IRQFD: u64 = kvm(WRITE, 0x76, size_of::<kb::kvm_irqfd>());
pub const KVM_IOEVENTFD: u64 = kvm(WRITE, 0x79, size_of::<kb::kvm_ioeventfd>());
pub const KVM_SIGNAL_MSI: u64 = kvm(WRITE, 0xa5, size_of::<kb::kvm_msi>());
pub const KVM_IRQ_LINE: u64 = kvm(WRITE, 0x61, size_of::<kb::kvm_irq_level>());
pub const KVM_SET_USER_MEMORY_REGION: u64 =
    kvm(WRITE, 0x46, size_of::<kb::kvm_userspace_memory_region>());
/// A migration's pre-copy reads (and so clears) the dirty-page log.
pub const KVM_GET_DIRTY_LOG: u64 = kvm(WRITE, 0x42, size_of::<kb::kvm_dirty_log>());

/// TUNSETOFFLOAD: a NIC's offloads change when its driver (re)activates it.
pub const TUNSETOFFLOAD: u64 = ioc(WRITE, b'T' as u32, 208, size_of::<u32>());
/// TUNSETVNETHDRSZ.
pub const TUNSETVNETHDRSZ: u64 = ioc(WRITE, b'T' as u32, 216, size_of::<i32>());
/// Non-blocking mode (Rust's `set_nonblocking`).
pub const FIONBIO: u64 = 0x5421;
/// Close-on-exec.
pub const FIOCLEX: u64 = 0x5451;
/// isatty (tracing checks its output once).
pub const TCGETS: u64 = 0x5401;

/// What a vCPU thread asks of KVM: run, read its state for a failure report or a snapshot,
/// and what guest register writes turn into (MSI-X routes, BAR moves of the queue notify
/// ioeventfds).
pub const VCPU: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_TRANSLATE,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_MSRS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_XCRS,
    KVM_SET_GSI_ROUTING,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SIGNAL_MSI,
];

/// The event loop: the VM-wide ioctls it may need while devices start and stop, and
/// everything a device it starts may ask.
pub const VMM: &[u64] = &[
    // A snapshot reads the in-kernel irqchip, PIT and clock.
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_GET_CLOCK,
    KVM_SET_GSI_ROUTING,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SIGNAL_MSI,
    KVM_IRQ_LINE,
    // A migration turns the dirty-page log on and off (slot flags) and reads it.
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    FIONBIO,
    FIOCLEX,
    TCGETS,
];

/// Device threads: non-blocking sockets (vsock), TUN offloads.
pub const DEVICE: &[u64] = &[FIONBIO, FIOCLEX, TUNSETOFFLOAD, KVM_SIGNAL_MSI];

/// The control socket thread.
pub const API: &[u64] = &[FIONBIO, FIOCLEX, KVM_SIGNAL_MSI];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel() {
        // Values as strace shows them for Keel's own calls.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2, 0x8070_ae9f);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
    }
}
