//! The receiving end's intake of a stream, before any VM exists: the offered machine
//! (checked, this host's devices put in), then guest memory, round by round, then the state
//! (parsed and checked). Everything here is what a peer holding the key controls; it is
//! generic over the stream so the fuzz target drives it as the receiver does.

use super::pages::Filler;
use super::receive::{bad, host_side, ReceiveOptions};
use super::send::Offer;
use crate::memory::GuestRam;
use crate::snapshot::format::{parse_migration_state, SavedVm};
use crate::{VmConfig, VmmError};
use keel_migration::{Channel, Incoming, Message};
use std::io::{Read, Write};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// What arrived before the VM is built.
pub(crate) struct Arrived<T> {
    pub offer: Offer,
    /// The offered machine with this host's side of its devices.
    pub config: VmConfig,
    pub ram: GuestRam,
    pub saved: SavedVm,
    pub pages_in: u64,
    /// Post-copy: what is still at the source, and guest memory still registered.
    pub postcopy: Option<super::postcopy::Remote>,
    /// What `prepare` made of the machine before its memory came.
    pub prepared: T,
}

/// Takes the offer, lets `prepare` check it against this host (and build what it needs),
/// accepts it (`Ready`), then fills guest memory and takes the state.
pub(crate) fn take<S: Read + Write, T>(
    ch: &mut Channel<S>,
    opts: &ReceiveOptions,
    prepare: impl FnOnce(&VmConfig, &Offer) -> Result<T, VmmError>,
) -> Result<Arrived<T>, VmmError> {
    let offer: Offer = match ch.recv().map_err(bad)? {
        Message::Config(json) => serde_json::from_slice(&json)
            .map_err(|e| bad(format!("the offered machine is malformed: {e}")))?,
        other => return Err(bad(format!("expected the machine first, got {other:?}"))),
    };
    let mut config: VmConfig = offer.config.clone();
    config.api_socket = opts.api_socket.clone();
    config.seccomp = opts.seccomp;
    // Limits are this host's business (the supervisor's cgroup), not the sender's.
    config.limits = None;
    host_side(&mut config, &offer, opts)?;
    let prepared = prepare(&config, &offer)?;
    let ram = crate::memory::allocate(config.memory).map_err(bad)?;
    // This host can take the machine: the memory may come.
    ch.send(&Message::Ready)
        .and_then(|()| ch.flush())
        .map_err(bad)?;
    let mut pages_in = 0u64;
    let started = std::time::Instant::now();
    let filler = Filler::new(&ram.all);
    let end_page = ram
        .all
        .iter()
        .map(|r| (r.start_addr().0 + r.len()) / keel_migration::PAGE as u64)
        .max()
        .unwrap_or(0);
    let stale = super::postcopy::Stale::new(end_page);
    let state = loop {
        let m = ch.recv_incoming().map_err(bad)?;
        match m {
            Incoming::Pages { .. } | Incoming::Other(Message::Zeros { .. }) => {
                pages_in += filler.apply(&m).map_err(bad)?;
            }
            Incoming::Other(Message::RoundEnd { round, pages }) => {
                tracing::debug!(
                    "migration: round {round} ({pages} pages) in after {:?}",
                    started.elapsed()
                );
                // All of it is in place: the sender times its rounds by this echo.
                ch.send(&Message::RoundEnd { round, pages })
                    .and_then(|()| ch.flush())
                    .map_err(bad)?;
            }
            Incoming::Other(Message::Missing { first_page, count }) => {
                // Written on the source since sent: dropped here, fetched when touched.
                filler
                    .apply(&Incoming::Other(Message::Zeros { first_page, count }))
                    .map_err(bad)?;
                stale.mark(first_page, count);
            }
            Incoming::Other(Message::State(json)) => break json,
            Incoming::Other(Message::Abort(why)) => {
                return Err(bad(format!("the sender gave up: {why}")))
            }
            Incoming::Other(other) => return Err(bad(format!("unexpected {other:?}"))),
        }
    };
    let postcopy = if stale.left() > 0 {
        Some(super::postcopy::Remote::new(filler, stale).map_err(bad)?)
    } else {
        // Guest memory is the VMM's again (nothing waits on a missing page from here on).
        drop(filler);
        None
    };
    let saved = parse_migration_state(&state).map_err(bad)?;
    if (saved.config.vcpus, saved.config.memory) != (config.vcpus, config.memory) {
        return Err(bad("the state does not match the offered machine"));
    }
    Ok(Arrived {
        offer,
        config,
        ram,
        saved,
        pages_in,
        postcopy,
        prepared,
    })
}

/// The largest guest the fuzz target lets an offer allocate.
const FUZZ_MAX_MEMORY: u64 = 64 << 20;

/// The receiver's intake as the fuzz target drives it: what a peer holding the key sends
/// on `ch`, taken as `keel receive` takes it (no devices named here, guests of at most
/// 64 MiB), up to the parsed state. The pages that arrived, or why the stream was refused.
pub fn fuzz_intake<S: Read + Write>(ch: &mut Channel<S>) -> Result<u64, String> {
    let opts = ReceiveOptions {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        key: Vec::new(),
        api_socket: None,
        seccomp: false,
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
    };
    let arrived = take(ch, &opts, |config, _| {
        if config.memory > FUZZ_MAX_MEMORY {
            return Err(bad("more memory than the fuzz target allocates"));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(arrived.pages_in)
}
