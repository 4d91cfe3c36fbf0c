//! virtio-rng (virtio 1.2 §5.4): entropy from the host's getrandom(2) into guest buffers.

use crate::device::{process_queue, read_config_bytes};
use crate::{
    features, types, ActivateContext, ActivateError, DeviceError, EventHandler, GuestMemory,
    VirtioDevice, VirtioInterrupt, Worker, QUEUE_MAX_SIZE,
};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Most bytes handed out per request: a guest asking for a huge buffer gets a short fill
/// (the driver asks again), so one request cannot keep the device thread busy.
const MAX_PER_REQUEST: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    worker: Option<Worker<RngHandler>>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        types::RNG
    }
    fn name(&self) -> String {
        "rng".into()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE]
    }
    fn features(&self) -> u64 {
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let (Some(queue), Some(event)) = (ctx.queues.pop(), ctx.queue_events.pop()) else {
            return Err(ActivateError::QueueNotReady(0));
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        let fd = event.as_raw_fd();
        let handler = RngHandler {
            mem: ctx.mem,
            queue,
            event,
            interrupt: ctx.interrupt.clone(),
        };
        self.worker = Some(
            Worker::spawn(
                "virtio-rng".into(),
                vec![(fd, 0)],
                handler,
                ctx.interrupt,
                ctx.hooks.device,
            )
            .map_err(ActivateError::Thread)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
    fn pause(&mut self) -> Vec<(usize, Queue)> {
        // Each request completes within one wake-up: nothing is left to finish.
        self.worker
            .take()
            .and_then(Worker::pause)
            .map(|h| vec![(0, h.queue)])
            .unwrap_or_default()
    }
}

use virtio_queue::QueueT;

struct RngHandler {
    mem: GuestMemory,
    queue: Queue,
    event: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Fills `buf` from getrandom(2); returns how many bytes it got.
fn getrandom(buf: &mut [u8]) -> usize {
    // SAFETY: getrandom writes at most `buf.len()` bytes into the valid, writable `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).unwrap_or(0)
}

impl EventHandler for RngHandler {
    fn handle(&mut self, _token: u64) -> Result<(), DeviceError> {
        let _ = self.event.read();
        let mem = &self.mem;
        process_queue(&mut self.queue, 0, mem, &*self.interrupt, |chain| {
            // A chain with no writable buffer, or buffers outside guest RAM, gets 0 bytes.
            let Ok(mut w) = chain.writer(mem) else {
                return Some(0);
            };
            let want = w.available_bytes().min(MAX_PER_REQUEST);
            let mut buf = vec![0u8; want];
            let got = getrandom(&mut buf);
            let n = w.write(&buf[..got]).unwrap_or(0);
            Some(n as u32)
        })
    }
}
