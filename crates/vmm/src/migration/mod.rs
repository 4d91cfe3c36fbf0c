//! Live migration (issue 6, being built): guest memory over a `keel_migration::Channel`.
//!
//! - [`pages`]: sending a set of guest pages (all of RAM for the first pre-copy round, the
//!   dirty ones after) as runs, zero pages as ranges; applying what arrives to the
//!   destination's guest memory, every page number checked against its RAM.
//! - [`plan`]: when pre-copy has converged: the pages still dirty, at the bandwidth measured
//!   so far, fit the downtime budget.
//! - `send`: the sender, on the event loop (stop-and-copy for now: the VM is paused, its
//!   memory and state go, it stops here once the destination runs it).
//! - [`receive`]: the receiver, which builds the VM from the stream.

pub(crate) mod pages;
// Pre-copy rounds (dirty pages while the guest runs) are what use it next.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod plan;
mod receive;

pub use receive::ReceiveOptions;
mod send;
