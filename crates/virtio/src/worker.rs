//! The thread a device's data path runs on: an epoll loop over the device's event sources.

use crate::{run_hook, DeviceError, ThreadHook, VirtioInterrupt};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What runs on a device thread.
pub trait EventHandler: Send {
    /// Event source `token` became readable. An error stops the device (it is marked broken).
    fn handle(&mut self, token: u64) -> Result<(), DeviceError>;
}

/// A running device thread; dropping it stops and joins the thread.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

const KILL_TOKEN: u64 = u64::MAX;

impl Worker {
    /// Starts `handler` on a thread named `name`, woken for each of `sources` (fd, token).
    /// The thread runs `hook` first; if it fails, the device is marked broken and the
    /// thread does nothing else.
    pub fn spawn<H: EventHandler + 'static>(
        name: String,
        sources: Vec<(RawFd, u64)>,
        mut handler: H,
        interrupt: Arc<dyn VirtioInterrupt>,
        hook: Option<ThreadHook>,
    ) -> std::io::Result<Worker> {
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
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Err(e) = run_hook(hook) {
                    tracing::error!("{name}: {e}; the device stays stopped");
                    interrupt.device_broken(&e);
                    return;
                }
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            interrupt.device_broken(&format!("epoll failed: {e}"));
                            return;
                        }
                    };
                    for ev in events.iter().take(n) {
                        let token = ev.data();
                        if token == KILL_TOKEN {
                            let _ = kill_fd.read();
                            return;
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
                                    Ok(1) => return,
                                    Err(e) if e.kind() != std::io::ErrorKind::Interrupted => return,
                                    _ => {}
                                }
                            }
                        }
                    }
                }
            })?;
        Ok(Worker {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.kill.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
