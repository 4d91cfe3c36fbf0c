//! The VMM's control socket (`--api-socket`): one thread serving [`keel_api`] requests
//! while the VM runs.

use crate::VmmError;
use keel_api::{parse_request, BalloonInfo, Reply, Request, Response, VmInfo, VmState, MAX_LINE};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// The balloon as the control plane drives it.
pub(crate) trait BalloonControl: Send + Sync {
    fn set_target(&self, bytes: u64) -> Result<(), String>;
    fn info(&self) -> BalloonInfo;
}

impl BalloonControl for keel_virtio::balloon::BalloonHandle {
    fn set_target(&self, bytes: u64) -> Result<(), String> {
        keel_virtio::balloon::BalloonHandle::set_target(self, bytes).map_err(|e| e.to_string())
    }

    fn info(&self) -> BalloonInfo {
        BalloonInfo {
            target_bytes: self.target(),
            actual_bytes: self.actual(),
            stats: self
                .stats()
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_object().cloned()),
        }
    }
}

/// What the control plane can reach while the VM runs.
pub(crate) struct Control {
    pub info: VmInfo,
    pub balloon: Option<Arc<dyn BalloonControl>>,
    /// /proc/self/statm, opened before the jail hides /proc and before the API thread is
    /// confined (its filter has no `openat`); `None`: RSS reads as 0.
    pub statm: Option<std::fs::File>,
    /// The vCPUs, to pause and resume.
    pub shared: Arc<crate::runner::Shared>,
}

impl Control {
    fn state(&self) -> VmState {
        if self.shared.pause.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::ok(Reply::Pong),
            Request::Info => {
                let mut info = self.info.clone();
                info.vmm_rss_bytes = self.statm.as_ref().and_then(rss_bytes).unwrap_or(0);
                info.state = self.state();
                Response::ok(Reply::Info(info))
            }
            Request::BalloonSet { target_bytes } => match &self.balloon {
                None => Response::error("this VM has no balloon (start it with --balloon)"),
                Some(b) => match b.set_target(target_bytes) {
                    Ok(()) => Response::ok(Reply::Balloon(b.info())),
                    Err(e) => Response::error(e),
                },
            },
            Request::Pause => {
                let sh = &self.shared;
                match sh
                    .pause
                    .pause(|| sh.running_vcpus(), crate::pause::PAUSE_TIMEOUT)
                {
                    Ok(()) => Response::ok(Reply::State(self.state())),
                    Err(e) => Response::error(e),
                }
            }
            Request::Resume => {
                self.shared.pause.resume();
                Response::ok(Reply::State(self.state()))
            }
            Request::BalloonStats => match &self.balloon {
                None => Response::error("this VM has no balloon (start it with --balloon)"),
                Some(b) => Response::ok(Reply::Balloon(b.info())),
            },
        }
    }
}

/// Opens /proc/self/statm, to read [`rss_bytes`] from later.
pub(crate) fn open_statm() -> Option<std::fs::File> {
    std::fs::File::open("/proc/self/statm").ok()
}

/// The VMM process's resident set size, from its /proc/self/statm (read at offset 0 each
/// time: the file is regenerated on every read).
pub(crate) fn rss_bytes(statm: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = statm.read_at(&mut buf, 0).ok()?;
    let s = std::str::from_utf8(buf.get(..n)?).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.checked_mul(u64::try_from(page).ok()?)
}

/// Binds the socket at `path`: a stale socket nobody listens on is replaced; anything else
/// there is an error.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, VmmError> {
    let err = |reason: String| VmmError::ApiSocket {
        path: path.to_path_buf(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err("a file that is not a socket is in the way".into()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err("another process is listening on it".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    let l = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    l.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    Ok(l)
}

/// The running server; dropping it stops the thread and removes the socket file.
pub(crate) struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    pub(crate) fn start(
        listener: UnixListener,
        path: PathBuf,
        control: Arc<Control>,
        seccomp: bool,
    ) -> Result<ApiServer, VmmError> {
        let io = |source| VmmError::Io {
            what: "starting the API socket thread",
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let stop2 = stop.try_clone().map_err(io)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = crate::confine::apply(seccomp, keel_seccomp::ThreadKind::Api) {
                    tracing::error!("API socket: {e}; not serving requests");
                    return;
                }
                serve(&listener, &stop2, &control)
            })
            .map_err(io)?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
            path,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, stop: &EventFd, control: &Control) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((conn, _)) => serve_connection(conn, control),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one client until it hangs up, goes quiet for 30 s or sends a line too long.
fn serve_connection(conn: UnixStream, control: &Control) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = reply(&mut writer, &Response::error("request line too long"));
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = match parse_request(&line) {
            Ok(req) => control.handle(req),
            Err(e) => Response::error(e),
        };
        if reply(&mut writer, &resp).is_err() {
            return;
        }
    }
}

fn reply(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_string(r).unwrap_or_else(|_| r#"{"ok":false}"#.into());
    s.push('\n');
    w.write_all(s.as_bytes())
}
