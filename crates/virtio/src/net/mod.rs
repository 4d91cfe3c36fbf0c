//! virtio-net (virtio 1.2 §5.1) on a host tap device.
//!
//! One receive and one transmit queue, no control queue. Frames cross the tap with the
//! 12-byte virtio 1.x header (`struct virtio_net_hdr_v1`) in front, which is exactly what the
//! guest puts in front of every frame it sends and expects in front of every frame it
//! receives, so checksum and segmentation offloads pass straight through: the tap is told
//! (`TUNSETOFFLOAD`) to hand over only what the driver said it takes.
//!
//! - Transmit: each chain's readable buffers are gathered straight from guest memory into one
//!   writev(2) on the tap; nothing is copied by the device.
//! - Receive: a frame is read from the tap into a host buffer, then copied into the guest's
//!   receive buffers, spread over several chains when `VIRTIO_NET_F_MRG_RXBUF` is acked. With
//!   no receive buffers posted, the device holds the frame it has, stops watching the tap, and
//!   carries on when the driver posts buffers: nothing is dropped that could wait, and nothing
//!   spins.
//!
//! Everything the guest puts in its rings is hostile: a malformed chain (buffers outside RAM,
//! writable buffers in a transmit chain, a loop, absurd lengths) costs that chain its frame,
//! never the device; only a malformed ring stops the device (`DEVICE_NEEDS_RESET`).

mod datapath;
#[cfg(test)]
mod tests;

use crate::device::read_config_bytes;
use crate::{
    features, types, ActivateContext, ActivateError, VirtioDevice, Worker, QUEUE_MAX_SIZE,
};
use datapath::{HeldFrame, NetHandler};
use keel_net::{MacAddr, Offloads, Tap, VNET_HDR_LEN};
use keel_rate_limiter::{Budget, RateLimiter};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};

/// The receive queue's index.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue's index.
pub const TX_QUEUE: u16 = 1;

/// The longest frame the device moves in either direction, virtio-net header included:
/// a 64 KiB TSO segment behind a 14-byte Ethernet header and the 12-byte header
/// (65562 bytes, as Linux's vhost-net and other VMMs use).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 14 + 64 * 1024;

/// Feature bit `bit` as a mask.
const fn bit(bit: u32) -> u64 {
    1 << bit
}

/// Offloads that depend on the tap: the guest may send (`HOST_*`) and receive (`GUEST_*`)
/// partial checksums and TCP segments only if the tap takes them.
const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);

/// Features offered whatever the tap.
const BASE_FEATURES: u64 = bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | features::RING_EVENT_IDX
    | features::RING_INDIRECT_DESC;

/// Why a tap cannot back a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net on tap {tap}: cannot set the 12-byte virtio 1.x header: {source}")]
    VnetHdr {
        tap: String,
        #[source]
        source: keel_net::Error,
    },
    #[error("virtio-net on tap {tap}: cannot probe its offloads: {source}")]
    Offloads {
        tap: String,
        #[source]
        source: keel_net::Error,
    },
    #[error("virtio-net on tap {tap}: cannot make it non-blocking: {source}")]
    NonBlocking {
        tap: String,
        #[source]
        source: keel_net::Error,
    },
}

/// Live counters of one device, shared with whoever holds [`Net::stats_handle`]. They keep
/// counting across driver resets. Serialises as the plain numbers ([`NetCounters`]' shape).
#[derive(Debug, Default, Serialize)]
pub struct NetStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_bad_buffers: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
    wakeups: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes, Ethernet header included, virtio-net header not.
    pub rx_bytes: u64,
    /// Frames read from the tap the guest never got: longer than the guest's buffers (without
    /// merged buffers) or than [`MAX_FRAME_LEN`], or shorter than a virtio-net header.
    pub rx_dropped: u64,
    /// Receive chains handed back unused (length 0) because they were malformed: readable
    /// buffers, buffers outside guest RAM, a loop.
    pub rx_bad_buffers: u64,
    /// Frames the tap took from the guest.
    pub tx_frames: u64,
    /// Their bytes, Ethernet header included, virtio-net header not.
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed: writable buffers, buffers outside guest RAM,
    /// shorter than the header or longer than [`MAX_FRAME_LEN`], a loop.
    pub tx_dropped: u64,
    /// Frames the tap refused (a bad header, a full queue, the interface down).
    pub tx_errors: u64,
    /// Times the device thread woke up (queue notifications and tap readiness).
    pub wakeups: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
            wakeups: get(&self.wakeups),
        }
    }
}

/// Adds `n` to a counter.
fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A virtio-net device backed by a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: MacAddr,
    /// What the tap accepts, probed once.
    tap_offloads: Offloads,
    features: u64,
    stats: Arc<NetStats>,
    /// Receive and transmit budgets (bytes and frames per second); `None`: unlimited.
    rx_limit: Option<Budget>,
    tx_limit: Option<Budget>,
    worker: Option<Worker<NetHandler>>,
    /// A frame read from the tap that was waiting for receive buffers when the device was
    /// paused: handed to the next data path of this process (a snapshot must not drop
    /// traffic of the VM that goes on).
    held_rx: Option<HeldFrame>,
}

/// What a snapshot keeps of a virtio-net device: its MAC address (it may have been random),
/// which the guest read at probe time and keeps using.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: MacAddr,
}

/// One activation's limiters (each with its own timerfd), for the device thread.
pub(crate) struct Limiters {
    pub(crate) rx: Option<RateLimiter>,
    pub(crate) tx: Option<RateLimiter>,
}

impl Net {
    /// Makes `tap` the device's backend and `mac` the guest's address: sets the tap's header
    /// size to 12 bytes, makes it non-blocking and finds which offloads it takes (those the
    /// device offers the driver).
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Net, NetError> {
        let name = || tap.name().to_string();
        tap.set_vnet_hdr_size(VNET_HDR_LEN)
            .map_err(|source| NetError::VnetHdr {
                tap: name(),
                source,
            })?;
        tap.set_nonblocking(true)
            .map_err(|source| NetError::NonBlocking {
                tap: name(),
                source,
            })?;
        let tap_offloads = tap.probe_offloads().map_err(|source| NetError::Offloads {
            tap: name(),
            source,
        })?;
        let features = BASE_FEATURES | offload_features(tap_offloads);
        tracing::debug!(
            tap = tap.name(),
            %mac,
            ?tap_offloads,
            features = format_args!("{features:#x}"),
            "virtio-net ready"
        );
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            tap_offloads,
            features,
            stats: Arc::default(),
            rx_limit: None,
            tx_limit: None,
            worker: None,
            held_rx: None,
        })
    }

    /// Limits what the guest receives (`rx`) and sends (`tx`): Ethernet bytes (the virtio-net
    /// header is not counted) and frames per second. Over budget, transmit chains wait in
    /// their ring and received frames wait in the tap's queue. The budgets outlive resets.
    pub fn with_rate_limits(mut self, rx: Option<Budget>, tx: Option<Budget>) -> Self {
        let limited = |b: Option<Budget>| b.filter(|b| !b.config().is_unlimited());
        self.rx_limit = limited(rx);
        self.tx_limit = limited(tx);
        self
    }

    /// The device's counters, live.
    pub fn stats_handle(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap, for sending host-made frames as the guest's (a migrated guest's
    /// announcement, [`Tap::announce`]).
    pub fn tap_handle(&self) -> Arc<Tap> {
        self.tap.clone()
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The configuration space (virtio 1.2 §5.1.4): `mac`, `status`, `max_virtqueue_pairs`.
    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac.octets());
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

/// The offload features a tap that takes `tap` can back, with the spec's dependencies
/// (virtio 1.2 §5.1.3.1): TSO needs checksum offload, ECN needs TSO.
fn offload_features(tap: Offloads) -> u64 {
    if !tap.contains(Offloads::CSUM) {
        return 0;
    }
    let mut f = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
    if tap.contains(Offloads::TSO4) {
        f |= bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO4);
    }
    if tap.contains(Offloads::TSO6) {
        f |= bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_HOST_TSO6);
    }
    let tso = tap.contains(Offloads::TSO4) || tap.contains(Offloads::TSO6);
    if tso && tap.contains(Offloads::TSO_ECN) {
        f |= bit(VIRTIO_NET_F_GUEST_ECN) | bit(VIRTIO_NET_F_HOST_ECN);
    }
    f & OFFLOAD_FEATURES
}

/// What the tap may hand over once the driver acked `acked`: the receive (`GUEST_*`)
/// offloads, kept to combinations the kernel takes and to what this tap supports.
fn tap_offloads_for(acked: u64, supported: Offloads) -> Offloads {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return Offloads::NONE;
    }
    let mut o = Offloads::CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        o |= Offloads::TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        o |= Offloads::TSO6;
    }
    let o = o & supported;
    let tso = o.contains(Offloads::TSO4) || o.contains(Offloads::TSO6);
    if tso && has(VIRTIO_NET_F_GUEST_ECN) && supported.contains(Offloads::TSO_ECN) {
        o | Offloads::TSO_ECN
    } else {
        o
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        types::NET
    }

    fn name(&self) -> String {
        format!("net {}", self.tap.name())
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // A restart after a reset: the old thread must be gone before a new one reads the tap.
        self.worker = None;
        let acked = ctx.features & self.features;
        let offloads = tap_offloads_for(acked, self.tap_offloads);
        self.tap.set_offloads(offloads).map_err(|e| {
            ActivateError::Backend(format!("setting the tap's offloads to {offloads:?}: {e}"))
        })?;
        let interrupt = ctx.interrupt.clone();
        let limiter = |b: &Option<Budget>| {
            b.as_ref()
                .map(|b| RateLimiter::with_budgets(vec![b.clone()]))
                .transpose()
                .map_err(|e| ActivateError::Backend(e.to_string()))
        };
        let limiters = Limiters {
            rx: limiter(&self.rx_limit)?,
            tx: limiter(&self.tx_limit)?,
        };
        let hook = ctx.hooks.device;
        let (mut handler, sources) = NetHandler::new(
            ctx,
            self.tap.clone(),
            self.stats.clone(),
            acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            limiters,
        )?;
        if let Some(held) = self.held_rx.take() {
            handler.hold(held);
        }
        let worker = Worker::spawn(
            format!("vnet-{}", self.tap.name()),
            sources,
            handler,
            interrupt,
            hook,
        )
        .map_err(ActivateError::Thread)?;
        tracing::debug!(
            tap = self.tap.name(),
            acked = format_args!("{acked:#x}"),
            ?offloads,
            "virtio-net activated"
        );
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Stops the worker; its data path clears the tap's offloads as it ends, on the
        // device thread (a reset runs on the vCPU thread, whose filter has no tap ioctls).
        self.worker = None;
        if self.held_rx.take().is_some() {
            self.stats
                .rx_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn pause(&mut self) -> Vec<(usize, virtio_queue::Queue)> {
        // Every transmit chain taken was sent within its wake-up; receive chains are only
        // consumed with a frame in them. A frame read from the tap and still waiting for
        // receive buffers is kept for the next data path (the tap keeps the rest); a restore
        // in another process starts without it, as if the ring had been full. The offloads
        // are cleared on the device thread and set again from the driver's features when the
        // data path restarts.
        let Some(mut h) = self.worker.take().and_then(Worker::pause) else {
            return Vec::new();
        };
        self.held_rx = h.take_held();
        let (rx, tx) = h.take_queues();
        vec![(usize::from(RX_QUEUE), rx), (usize::from(TX_QUEUE), tx)]
    }

    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Net(NetState { mac: self.mac })
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        match state {
            crate::DeviceState::Net(n) => {
                self.mac = n.mac;
                Ok(())
            }
            other => Err(format!("{} state for a net device", other.kind())),
        }
    }
}
