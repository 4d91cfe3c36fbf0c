//! Device activations queued from vCPU threads to the event loop.
//!
//! A vCPU thread that writes `DRIVER_OK` must not start the device's threads itself: seccomp
//! filters are inherited by the threads a thread creates, so device threads started there
//! would carry the narrow vCPU filter. The transport hands the start to this queue instead;
//! the event loop (the "vmm" thread) runs it. The vCPU never waits for it: it holds the
//! transport's lock while it queues.

use crate::VmmError;
use keel_virtio::{ActivationJob, Activator};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;

pub(crate) struct QueuedActivator {
    jobs: Mutex<VecDeque<ActivationJob>>,
    evt: EventFd,
}

impl QueuedActivator {
    pub(crate) fn new() -> Result<Self, VmmError> {
        Ok(QueuedActivator {
            jobs: Mutex::new(VecDeque::new()),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                what: "activation eventfd",
                source,
            })?,
        })
    }

    /// Readable when activations are waiting.
    pub(crate) fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// Runs the waiting activations, oldest first, on the calling thread.
    pub(crate) fn run_pending(&self) {
        let _ = self.evt.read();
        loop {
            // Take one at a time: a job must not run under the queue's lock (a vCPU queuing
            // meanwhile would wait for a device start).
            let job = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            match job {
                Some(job) => job(),
                None => return,
            }
        }
    }
}

impl Activator for QueuedActivator {
    fn activate(&self, job: ActivationJob) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop for a device activation: {e}");
        }
    }
}
