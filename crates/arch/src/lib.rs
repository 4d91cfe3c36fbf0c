//! x86_64 platform knowledge for Keel: the guest memory map, the boot protocols (PVH and the
//! Linux 64-bit protocol), initial vCPU state, CPUID/MSR/LAPIC set-up and ACPI tables.
//!
//! Everything here writes plain data into guest memory or returns register values; applying
//! them to KVM is the VMM's job.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
pub mod mptable;
pub mod regs;
