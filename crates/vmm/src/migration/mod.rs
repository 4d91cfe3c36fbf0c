//! Live migration (issue 6, being built): guest memory over a `keel_migration::Channel`.
//!
//! - [`pages`]: sending a set of guest pages (all of RAM for the first pre-copy round, the
//!   dirty ones after) as runs, zero pages as ranges; applying what arrives to the
//!   destination's guest memory, every page number checked against its RAM.
//! - [`plan`]: when pre-copy has converged: the pages still dirty, at the bandwidth measured
//!   so far, fit the downtime budget.
//! - `send`: the sender, on the event loop: pre-copy rounds with KVM's dirty log while the
//!   guest runs (VMs without virtio devices, whose host-side writes are not tracked yet),
//!   then the rest with the guest paused, the state, and the stop once the destination runs
//!   it.
//! - [`receive`]: the receiver, which builds the VM from the stream.

pub(crate) mod pages;
pub(crate) mod plan;
mod receive;

pub use receive::ReceiveOptions;
mod send;
