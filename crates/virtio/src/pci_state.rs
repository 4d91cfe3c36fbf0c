//! Starting the data path, and pausing, saving and restoring a virtio-pci device for
//! snapshots (the transport's half; each device saves its own part, [`crate::DeviceState`]).

use super::{PciInterrupt, VirtioPciDevice, BAR_SIZE, NO_VECTOR};
use crate::device::{ActivateContext, VirtioInterrupt};
use crate::state::{SavedQueue, StateError, VirtioPciState};
use crate::{features, status};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

impl VirtioPciDevice {
    /// Hands the device its queues and starts it through the activator (`resume`: after a
    /// pause or a restore). The transport keeps copies of what the driver programmed, so the
    /// driver reads its registers back while the device owns the queues.
    pub(super) fn launch(&mut self, resume: bool) {
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PciInterrupt(self.signals.clone()));
        let mut queues = Vec::with_capacity(self.queues.len());
        for (q, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            // A fresh queue of the same maximum cannot fail to build: `new` validated it.
            let fresh = Queue::new(max).unwrap_or_default();
            let theirs = std::mem::replace(q, fresh);
            q.set_size(theirs.size());
            let hi_lo = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = hi_lo(theirs.desc_table());
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = hi_lo(theirs.avail_ring());
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = hi_lo(theirs.used_ring());
            q.set_used_ring_address(lo, hi);
            q.set_ready(theirs.ready());
            q.set_event_idx(theirs.state().event_idx_enabled);
            queues.push(theirs);
        }
        let events = match self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(e) => e,
            Err(e) => {
                interrupt.device_broken(&format!("cannot clone queue eventfds: {e}"));
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: interrupt.clone(),
            queues,
            queue_events: events,
            features: self.driver_features,
            hooks: self.runtime.hooks,
        };
        // The device starts on the activator's thread (the VMM's event loop), not on this
        // vCPU thread. Notifications that arrive before its thread runs stay counted in the
        // queue eventfds (level-triggered epoll sees them); a reset or a pause before the
        // job runs takes the context back and the job does nothing.
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx);
        let pending = self.pending.clone();
        let device = self.device.clone();
        let name = self.name.clone();
        self.runtime.activator.activate(Box::new(move || {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ctx) = pending.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                tracing::debug!("{name}: start cancelled (reset or pause)");
                return;
            };
            let res = if resume {
                dev.resume(ctx)
            } else {
                dev.activate(ctx)
            };
            match res {
                Ok(()) => tracing::debug!("{name}: started"),
                Err(e) => interrupt.device_broken(&format!("{name}: {e}")),
            }
        }));
    }

    /// Quiesces the data path for a snapshot: the device thread(s) stop taking new chains,
    /// every request already taken from the avail ring completes (block: the I/O engine
    /// drains and the image is flushed; net: transmit chains taken are sent; the used ring
    /// and interrupts are up to date), then the threads stop, keeping queue positions and
    /// backends. Idempotent; a device that was never activated just records that. Call
    /// with the vCPUs paused.
    pub fn pause(&mut self) -> Result<(), StateError> {
        if self.paused {
            return Ok(());
        }
        self.paused = true;
        if !self.activated {
            return Ok(());
        }
        let device = self.device.clone();
        let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
        let queued = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let queues: Vec<(usize, Queue)> = match queued {
            // The start never ran: the queues are where the context left them.
            Some(ctx) => ctx.queues.into_iter().enumerate().collect(),
            None => dev.pause(),
        };
        for (i, q) in queues {
            if let Some(slot) = self.queues.get_mut(i) {
                *slot = q;
            }
        }
        tracing::debug!("{}: paused", self.name);
        Ok(())
    }

    /// Restarts the data path after [`Self::pause`] or [`Self::restore_state`] (same
    /// queues, same positions), through the activator like a driver's start. A device the
    /// driver had not started, or that needs a reset, stays stopped.
    pub fn resume(&mut self) -> Result<(), StateError> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        let bad = status::DEVICE_NEEDS_RESET | status::FAILED;
        if self.activated && self.status() & bad == 0 {
            self.launch(true);
        }
        Ok(())
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Everything needed to rebuild the device; only while paused or never started.
    pub fn save_state(&self) -> Result<VirtioPciState, StateError> {
        if self.activated && !self.paused {
            return Err(StateError::NotPaused {
                device: self.name.clone(),
            });
        }
        let s = &self.signals;
        let msix = s
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        // One lock, dropped before the struct is built (a guard in it would live to its end).
        let (device_type, device) = {
            let dev = self.dev();
            (dev.device_type(), dev.save_state())
        };
        Ok(VirtioPciState {
            device_type,
            pci: self.config.save_state(),
            msix,
            status: s.status.load(Ordering::SeqCst),
            isr: s.isr.load(Ordering::SeqCst),
            config_generation: s.generation.load(Ordering::SeqCst),
            config_vector: s.config_vector.load(Ordering::SeqCst),
            queue_vectors: s
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            ring_addrs: self.ring_addrs.clone(),
            activated: self.activated,
            device,
        })
    }

    fn invalid(&self, why: impl Into<String>) -> StateError {
        StateError::Invalid {
            device: self.name.clone(),
            why: why.into(),
        }
    }

    /// Checks saved queue `i` and builds it.
    fn saved_queue(&self, i: usize, saved: &SavedQueue, live: bool) -> Result<Queue, StateError> {
        let err = |why: String| StateError::Queue {
            device: self.name.clone(),
            queue: i,
            why,
        };
        let max = self.max_sizes.get(i).copied().unwrap_or(0);
        if saved.max_size != max {
            return Err(err(format!(
                "maximum size {} but the device offers {max}",
                saved.max_size
            )));
        }
        let q = Queue::try_from(QueueState::from(*saved)).map_err(|e| {
            err(format!(
                "{e} (size {}, rings {:#x}/{:#x}/{:#x})",
                saved.size, saved.desc_table, saved.avail_ring, saved.used_ring
            ))
        })?;
        // A paused device finished everything it took: fewer chains than the queue holds
        // can be outstanding (the balloon holds one stats buffer).
        let outstanding = saved.next_avail.wrapping_sub(saved.next_used);
        if outstanding > saved.size {
            return Err(err(format!(
                "next_avail {} is {outstanding} entries past next_used {}, more than its {} \
                 entries",
                saved.next_avail, saved.next_used, saved.size
            )));
        }
        if !saved.ready && (saved.next_avail, saved.next_used) != (0, 0) {
            return Err(err("a queue that is not ready has moved".into()));
        }
        if live && saved.ready && !q.is_valid(&self.mem) {
            return Err(err(
                "its rings lie outside guest memory (restore the memory first)".into(),
            ));
        }
        Ok(q)
    }

    /// Restores the device from `state`, on a device freshly built by the VMM from the same
    /// configuration, before any vCPU runs: PCI configuration space (moving the BAR and its
    /// ioeventfds), MSI-X (re-programming the routes), the virtio registers, the queues with
    /// their positions and the device's own state. The device is left paused: if the driver
    /// had started it, the next [`Self::resume`] starts its data path. Nothing in `state` is
    /// trusted; on an error the device must be thrown away.
    pub fn restore_state(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        if self.activated {
            return Err(StateError::AlreadyStarted {
                device: self.name.clone(),
            });
        }
        let dtype = self.dev().device_type();
        if state.device_type != dtype {
            return Err(StateError::WrongDevice {
                device: self.name.clone(),
                expected: dtype,
                found: state.device_type,
            });
        }
        let n = self.queues.len();
        for len in [
            state.queues.len(),
            state.queue_vectors.len(),
            state.ring_addrs.len(),
        ] {
            if len != n {
                return Err(StateError::QueueCount {
                    device: self.name.clone(),
                    expected: n,
                    found: len,
                });
            }
        }
        let ready = status::FEATURES_OK | status::DRIVER_OK;
        if state.activated && state.status & ready != ready {
            return Err(self.invalid(format!(
                "started, but the status {:#x} lacks FEATURES_OK|DRIVER_OK",
                state.status
            )));
        }
        if state.isr & !3 != 0 {
            return Err(self.invalid(format!("ISR {:#x} has undefined bits", state.isr)));
        }
        if state.status & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            let extra = state.driver_features & !offered;
            if extra != 0 || state.driver_features & features::VERSION_1 == 0 {
                return Err(self.invalid(format!(
                    "the driver's features {:#x} are not ones this device offers ({offered:#x}; \
                     {extra:#x} missing): is the host's backend (tap offloads, image mode) the \
                     same as the snapshot's?",
                    state.driver_features
                )));
            }
        }
        let vectors = self.signals.queue_vectors.len() + 1;
        for (what, &v) in std::iter::once(("configuration", &state.config_vector))
            .chain(state.queue_vectors.iter().map(|v| ("queue", v)))
        {
            if v != NO_VECTOR && usize::from(v) >= vectors {
                return Err(self.invalid(format!(
                    "{what} MSI-X vector {v} out of range (the device has {vectors})"
                )));
            }
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| self.saved_queue(i, q, state.activated))
            .collect::<Result<Vec<_>, _>>()?;
        let pci_err = |source| StateError::Pci {
            device: self.name.clone(),
            source,
        };
        let mut config = self.config.clone();
        config.restore_state(&state.pci).map_err(pci_err)?;
        let new_bar = config.bar_address(0);
        if let Some(addr) = new_bar {
            let (base, size) = self.bar_window;
            let inside = addr >= base
                && addr
                    .checked_add(BAR_SIZE)
                    .is_some_and(|end| end <= base.saturating_add(size));
            if !inside {
                return Err(self.invalid(format!(
                    "BAR 0 at {addr:#x} lies outside the PCI window {base:#x}+{size:#x}"
                )));
            }
        }
        // Mutations start here: only the MSI-X table and the device state can still fail.
        self.signals
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(&state.msix, &config)
            .map_err(pci_err)?;
        let restored = self.dev().restore_state(&state.device);
        restored.map_err(|why| self.invalid(why))?;
        self.config = config;
        let old_bar = self.bar_addr;
        if old_bar != new_bar {
            use keel_pci::PciDevice;
            self.bar_moved(0, old_bar, new_bar);
        }
        let s = &self.signals;
        s.status.store(state.status, Ordering::SeqCst);
        s.isr.store(state.isr, Ordering::SeqCst);
        s.generation
            .store(state.config_generation, Ordering::SeqCst);
        s.config_vector.store(state.config_vector, Ordering::SeqCst);
        for (slot, &v) in s.queue_vectors.iter().zip(&state.queue_vectors) {
            slot.store(v, Ordering::SeqCst);
        }
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.ring_addrs = state.ring_addrs.clone();
        self.queues = queues;
        self.activated = state.activated;
        self.paused = true;
        Ok(())
    }
}

#[cfg(test)]
#[path = "pci_state_tests.rs"]
mod tests;
