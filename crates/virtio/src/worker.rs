//! The thread a device's data path runs on: an epoll loop over the device's event sources.

use crate::{run_hook, DeviceError, ThreadHook, VirtioInterrupt};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What runs on a device thread.
pub trait EventHandler: Send {
    /// Event source `token` became readable. An error stops the device (it is marked broken).
    fn handle(&mut self, token: u64) -> Result<(), DeviceError>;
    /// The device is pausing (for a snapshot): finish every request already taken from the
    /// rings (used ring and interrupts up to date), taking no new ones. Runs on the device
    /// thread, after the last `handle`. An error marks the device broken.
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// A running device thread; dropping it stops and joins the thread.
pub struct Worker<H> {
    kill: EventFd,
    /// Set before `kill` is signalled: hand the handler back instead of dropping it.
    pausing: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<H>>>,
}

const KILL_TOKEN: u64 = u64::MAX;

impl<H: EventHandler + 'static> Worker<H> {
    /// Starts `handler` on a thread named `name`, woken for each of `sources` (fd, token).
    /// The thread runs `hook` first; if it fails, the device is marked broken and the
    /// thread does nothing else.
    pub fn spawn(
        name: String,
        sources: Vec<(RawFd, u64)>,
        mut handler: H,
        interrupt: Arc<dyn VirtioInterrupt>,
        hook: Option<ThreadHook>,
    ) -> std::io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        for &(fd, token) in &sources {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let kill_fd = kill.try_clone()?;
        let pausing = Arc::new(AtomicBool::new(false));
        let pause = pausing.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = run_hook(hook) {
                    tracing::error!("{name}: {e}; the device stays stopped");
                    interrupt.device_broken(&e);
                    return None;
                }
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            interrupt.device_broken(&format!("epoll failed: {e}"));
                            return pause.load(Ordering::SeqCst).then_some(handler);
                        }
                    };
                    for ev in events.iter().take(n) {
                        let token = ev.data();
                        if token == KILL_TOKEN {
                            let _ = kill_fd.read();
                            return finish(&name, handler, &pause, &*interrupt);
                        }
                        if let Err(e) = handler.handle(token) {
                            keel_pci::guest_warn!(
                                "{name}: {e}; the device stops until the driver resets it"
                            );
                            interrupt.device_broken(&e.to_string());
                            // Stop listening to the guest; wait to be stopped (driver reset).
                            for &(fd, _) in &sources {
                                let _ =
                                    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            }
                            loop {
                                let mut one = [EpollEvent::default()];
                                match epoll.wait(-1, &mut one) {
                                    Ok(1) => break,
                                    Err(e) if e.kind() != std::io::ErrorKind::Interrupted => break,
                                    _ => {}
                                }
                            }
                            // Broken: nothing to finish, but a pause keeps the queues.
                            return pause.load(Ordering::SeqCst).then_some(handler);
                        }
                    }
                }
            })?;
        Ok(Worker {
            kill,
            pausing,
            thread: Some(thread),
        })
    }

    /// Stops the thread after its handler finished what it had taken
    /// ([`EventHandler::quiesce`]) and returns the handler (queues, positions, backends),
    /// or `None` if the thread had died before doing any work (its hook failed).
    pub fn pause(mut self) -> Option<H> {
        let t = self.thread.take()?;
        self.pausing.store(true, Ordering::SeqCst);
        let _ = self.kill.write(1);
        t.join().ok().flatten()
    }
}

/// The thread's end: on a pause, quiesce and hand the handler back; on a stop, drop it here.
fn finish<H: EventHandler>(
    name: &str,
    mut handler: H,
    pause: &AtomicBool,
    interrupt: &dyn VirtioInterrupt,
) -> Option<H> {
    if !pause.load(Ordering::SeqCst) {
        return None;
    }
    if let Err(e) = handler.quiesce() {
        keel_pci::guest_warn!("{name}: while pausing: {e}; the device needs a reset");
        interrupt.device_broken(&e.to_string());
    }
    Some(handler)
}

impl<H> Worker<H> {
    /// Stops the thread and waits for it; the handler is dropped on the device thread.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.kill.write(1);
            let _ = t.join();
        }
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        self.stop();
    }
}
