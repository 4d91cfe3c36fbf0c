//! Pausing and resuming the guest: every vCPU thread leaves `KVM_RUN` and parks until resumed.
//!
//! A pause request sets a flag and kicks each vCPU thread (the kick signal makes `KVM_RUN`
//! return at once, also when it lands just before the call); a vCPU checks the flag before
//! each entry and parks on a condition variable. The request returns once every vCPU that is
//! still running has parked, so the guest is not executing when it answers.

use keel_hypervisor::VcpuState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a pause waits for every vCPU to park.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request for every parked vCPU to save its state (a snapshot).
struct Capture {
    msr_indices: Vec<u32>,
    /// By vCPU id.
    results: Vec<Option<Result<VcpuState, String>>>,
}

#[derive(Default)]
struct State {
    /// vCPUs parked now.
    parked: u32,
    capture: Option<Capture>,
}

#[derive(Default)]
pub(crate) struct PauseGate {
    requested: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
    /// The vCPU threads, to kick out of KVM_RUN (filled once they exist).
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl PauseGate {
    pub(crate) fn register_threads(&self, threads: Vec<libc::pthread_t>) {
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = threads;
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// On a vCPU thread, before entering the guest: parks while a pause is requested (or
    /// until `stopping` says the VM ends), saving its state with `save` when a snapshot asks
    /// (vCPU `id`). True when it parked.
    pub(crate) fn park_if_requested(
        &self,
        id: u32,
        stopping: impl Fn() -> bool,
        save: impl Fn(&[u32]) -> Result<VcpuState, String>,
    ) -> bool {
        if !self.requested.load(Ordering::SeqCst) {
            return false;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.parked += 1;
        self.cv.notify_all();
        while self.requested.load(Ordering::SeqCst) && !stopping() {
            if let Some(c) = st.capture.as_mut() {
                if let Some(slot @ None) = c.results.get_mut(id as usize) {
                    *slot = Some(save(&c.msr_indices));
                    self.cv.notify_all();
                }
            }
            // A timeout, so a stop needs no wake-up of its own.
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.parked -= 1;
        self.cv.notify_all();
        true
    }

    /// Pauses the guest: returns once `running()` vCPUs are parked, or an error after
    /// `timeout` ([`PAUSE_TIMEOUT`] from the API; the guest is then resumed, as it was).
    pub(crate) fn pause(&self, running: impl Fn() -> u32, timeout: Duration) -> Result<(), String> {
        self.requested.store(true, Ordering::SeqCst);
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            // SAFETY: `t` names a vCPU thread of this process that is joined only after the
            // API server (the caller) has stopped; the kick handler only sets a flag.
            unsafe { libc::pthread_kill(t, keel_hypervisor::kick_signal()) };
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.parked < running() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (parked, want) = (st.parked, running());
                drop(st);
                self.resume();
                return Err(format!(
                    "only {parked} of {want} vCPUs stopped within {} ms; the VM keeps running",
                    timeout.as_millis()
                ));
            }
            st = self
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// While paused: has each of the `vcpus` parked vCPUs save its state (on its own thread:
    /// it owns its vCPU), in vCPU id order.
    pub(crate) fn capture(
        &self,
        msr_indices: Vec<u32>,
        vcpus: usize,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        if !self.is_paused() {
            return Err("the VM is not paused".into());
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.capture = Some(Capture {
            msr_indices,
            results: (0..vcpus).map(|_| None).collect(),
        });
        self.cv.notify_all();
        loop {
            let done = st
                .capture
                .as_ref()
                .is_some_and(|c| c.results.iter().all(Option::is_some));
            if done {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.capture = None;
                return Err(format!(
                    "not every vCPU saved its state within {} ms",
                    timeout.as_millis()
                ));
            }
            st = self
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(20)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let c = st.capture.take().map(|c| c.results).unwrap_or_default();
        c.into_iter()
            .enumerate()
            .map(|(i, r)| match r {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i} saved nothing")),
            })
            .collect()
    }

    /// Lets parked vCPUs run again.
    pub(crate) fn resume(&self) {
        let _st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let entries = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (g, s, e) = (gate.clone(), stop.clone(), entries.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::SeqCst) {
                        g.park_if_requested(
                            0,
                            || s.load(Ordering::SeqCst),
                            |_| Err("no vCPU".into()),
                        );
                        e.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        gate.pause(|| 3, PAUSE_TIMEOUT).unwrap();
        assert!(gate.is_paused());
        let n = entries.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            entries.load(Ordering::SeqCst),
            n,
            "a paused vCPU entered the guest"
        );
        gate.resume();
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            entries.load(Ordering::SeqCst) > n,
            "resumed vCPUs did not run"
        );
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_pause_no_vcpu_answers_fails_and_leaves_the_vm_running() {
        let gate = PauseGate::default();
        // One vCPU counted as running but none ever parks.
        let start = Instant::now();
        let err = gate.pause(|| 1, Duration::from_millis(100)).unwrap_err();
        assert!(err.contains("0 of 1"), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(!gate.is_paused());
    }
}
