//! The contract between a virtio device and its transport.

use crate::GuestMemory;
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// The largest queue any Keel device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// How a device interrupts the driver.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in queue `queue`'s used ring.
    fn signal_queue(&self, queue: u16);
    /// The device's configuration space changed.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from (a malformed ring): it stops, sets
    /// `DEVICE_NEEDS_RESET` and tells the driver.
    fn device_broken(&self, why: &str);
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// One per queue the device declared, in order; queues the driver did not enable are
    /// not ready (`Queue::ready()` is false).
    pub queues: Vec<Queue>,
    /// Signalled when the driver notifies the matching queue.
    pub queue_events: Vec<EventFd>,
    /// The features the driver accepted.
    pub features: u64,
    /// Run first thing on each thread the device starts.
    pub hooks: ThreadHooks,
}

/// Runs first thing on a thread a device (or its I/O engine) starts, before it touches any
/// guest data: the VMM confines the thread there (its seccomp filter). An error stops the
/// thread before it does any work.
pub use keel_block::ThreadHook;

/// What runs first on the threads a device starts; `None` runs nothing (unit tests, VMs
/// without seccomp).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadHooks {
    /// Device threads (the epoll loop of each device, the vsock muxer).
    pub device: Option<ThreadHook>,
    /// Block I/O engine workers.
    pub block_io: Option<ThreadHook>,
}

/// Runs `hook` (if any) on the calling thread; says why not when it fails.
pub fn run_hook(hook: Option<ThreadHook>) -> Result<(), String> {
    match hook {
        Some(h) => h(),
        None => Ok(()),
    }
}

/// Where device activations run. The transport validates the driver's setup on the vCPU
/// thread that wrote `DRIVER_OK`, then hands the start of the device (its threads, its I/O
/// engine) to an activator, so that device threads are never children of a vCPU thread
/// (seccomp filters are inherited): the VMM queues it to its event loop; unit tests run it
/// at once ([`InlineActivator`]). The activator must not run the job while the caller is
/// inside it (the caller holds the transport's lock) unless it runs it inline.
pub trait Activator: Send + Sync {
    fn activate(&self, job: ActivationJob);
}

/// A pending activation: starts the device unless the driver reset it meanwhile.
pub type ActivationJob = Box<dyn FnOnce() + Send>;

/// Runs activations on the calling thread, at once.
pub struct InlineActivator;

impl Activator for InlineActivator {
    fn activate(&self, job: ActivationJob) {
        job()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(usize),
    #[error("cannot start the device thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A fault in a device's data path: the guest's rings or the host backend.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtio queue {queue}: {source}")]
    Queue {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("virtio queue {queue}: the available index moves while nothing is available: the driver's rings overlap")]
    OverlappingRings { queue: u16 },
    #[error("{0}")]
    Backend(String),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`crate::types`]).
    fn device_type(&self) -> u32;
    /// Short name for logs ("rng", "block vda", ...).
    fn name(&self) -> String;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device feature bits (the transport adds VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the data path.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the data path (driver reset or VM teardown). The device may be activated again.
    fn reset(&mut self);
    /// Pauses the data path for a snapshot: takes no new chains, finishes every one already
    /// taken (used ring and interrupts up to date), stops the device's threads and returns
    /// the queues it ran, by index, with their positions. Backends (image, tap, sockets)
    /// stay open. Returns nothing if the data path was not running. `resume` or `reset`
    /// follows.
    fn pause(&mut self) -> Vec<(usize, Queue)>;
    /// Restarts the data path after `pause` (or after `restore_state` on a fresh device)
    /// on `ctx`'s queues, which carry the saved positions.
    fn resume(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activate(ctx)
    }
    /// The device's own state (not running: never activated or paused).
    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Stateless
    }
    /// Takes the device's own state back, on a fresh device; says why it cannot.
    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        match state {
            crate::DeviceState::Stateless => Ok(()),
            other => Err(format!(
                "{} state for a {} device",
                other.kind(),
                self.name()
            )),
        }
    }
}

/// Copies `src` (a device's configuration structure) into `data` at `offset`: bytes out of
/// range read as zero.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, out) in data.iter_mut().enumerate() {
        *out = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Ends one pass over queue `index` that took `popped` chains: re-enables notifications and
/// says whether more chains arrived meanwhile (go round again). More announced after a pass
/// that found nothing means the device's own ring writes move the driver's available index
/// (overlapping rings): that is an error, so the device stops instead of spinning forever.
pub fn rearm(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: u16,
    popped: usize,
) -> Result<bool, DeviceError> {
    use virtio_queue::QueueT;
    let more = queue
        .enable_notification(mem)
        .map_err(|source| DeviceError::Queue {
            queue: index,
            source,
        })?;
    if more && popped == 0 {
        return Err(DeviceError::OverlappingRings { queue: index });
    }
    Ok(more)
}

/// A descriptor chain popped from a queue.
pub type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemory>;

/// Runs `serve` on every chain the driver made available on `queue` (number `index`), with
/// notification suppression handled, and interrupts the driver if it asked to be. `serve`
/// returns the number of bytes it wrote into the chain's writable buffers, or `None` to stop
/// early and leave the chain unconsumed for later (e.g. the host side has no room).
///
/// A malformed ring (available index further ahead than the queue size, rings outside guest
/// memory) is an error: the device must stop. A malformed chain is `serve`'s to fail.
pub fn process_queue(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemory,
    interrupt: &dyn VirtioInterrupt,
    mut serve: impl FnMut(Chain<'_>) -> Option<u32>,
) -> Result<(), DeviceError> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let err = |source| DeviceError::Queue {
        queue: index,
        source,
    };
    let mut used_any = false;
    'outer: loop {
        queue.disable_notification(mem).map_err(err)?;
        let mut popped = 0usize;
        loop {
            let chain = {
                let mut it = queue.iter(mem).map_err(err)?;
                it.next()
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            popped += 1;
            match serve(chain) {
                Some(len) => {
                    queue.add_used(mem, head, len).map_err(err)?;
                    used_any = true;
                }
                None => {
                    queue.go_to_previous_position();
                    break 'outer;
                }
            }
        }
        if !rearm(queue, mem, index, popped)? {
            break;
        }
    }
    if used_any && queue.needs_notification(mem).map_err(err)? {
        interrupt.signal_queue(index);
    }
    Ok(())
}
