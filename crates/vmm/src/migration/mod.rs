//! Live migration: guest memory over a `keel_migration::Channel`.
//!
//! - [`pages`]: sending a set of guest pages (all of RAM for the first pre-copy round, the
//!   dirty ones after) as runs, zero pages as ranges; applying what arrives to the
//!   destination's guest memory, every page number checked against its RAM.
//! - [`plan`]: when pre-copy has converged: the pages still dirty, at the bandwidth measured
//!   so far, fit the downtime budget.
//! - `send`: the sender, on the event loop: pre-copy rounds with KVM's dirty log and the
//!   memory's own dirty bitmaps (devices' writes) while the guest runs, then the rest with
//!   the guest and its devices paused, the state, and the stop once the destination runs it.
//! - [`intake`]: the receiver's intake of the stream before any VM exists (the offer, the
//!   memory, the state), which the fuzz target drives too.
//! - `receive`: the receiver, which builds the VM from what arrived.

pub(crate) mod intake;
pub(crate) mod pages;
pub(crate) mod plan;
pub(crate) mod postcopy;
mod postcopy_send;
mod receive;

pub use intake::fuzz_intake;
pub use receive::ReceiveOptions;
mod send;
