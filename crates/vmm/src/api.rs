//! The VMM's control socket (`--api-socket`): one thread serving [`keel_api`] requests
//! while the VM runs.

use crate::snapshot::{Done, Work};
use crate::VmmError;
use keel_api::{parse_request, BalloonInfo, Reply, Request, Response, VmInfo, VmState, MAX_LINE};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    /// Where snapshot requests go (run by the event loop).
    pub snapshots: Option<Arc<crate::snapshot::Requests>>,
    /// The disks' chains as they are now (updated by each snapshot).
    pub disks: Arc<std::sync::Mutex<Vec<keel_api::DiskInfo>>>,
    /// A restored VM's memory pager.
    pub pager: Option<Arc<crate::snapshot::lazy::LazyMemory>>,
}

impl Control {
    /// A snapshot or a migration, done by the event loop with the VM paused.
    fn on_event_loop(&self, work: Work, fds: Vec<OwnedFd>) -> Response {
        let Some(q) = &self.snapshots else {
            return Response::error("snapshots and migration are not available for this VM");
        };
        match q.take(work, fds) {
            Ok(Done::Snapshot(r)) => Response::ok(Reply::Snapshot(r)),
            Ok(Done::Migrated(r)) => Response::ok(Reply::Migrated(r)),
            Err(e) => Response::error(e),
        }
    }

    fn state(&self) -> VmState {
        if self.shared.pause.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn handle(&self, req: Request, fds: Vec<OwnedFd>) -> Response {
        if !fds.is_empty() && !matches!(req, Request::Snapshot(_) | Request::Migrate(_)) {
            return Response::error("this request takes no file descriptors");
        }
        match req {
            Request::Ping => Response::ok(Reply::Pong),
            Request::Info => {
                let mut info = self.info.clone();
                info.vmm_rss_bytes = self.statm.as_ref().and_then(rss_bytes).unwrap_or(0);
                info.state = self.state();
                info.disks = self.disks.lock().unwrap_or_else(|p| p.into_inner()).clone();
                info.memory_pager = self.pager.as_ref().map(|p| p.stats());
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
            Request::Snapshot(req) => self.on_event_loop(Work::Snapshot(req), fds),
            Request::Migrate(req) => self.on_event_loop(Work::Migrate(req), fds),
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

/// Most descriptors one read of the socket takes (a snapshot: memory, state, one overlay
/// per disk); more are closed by the kernel.
const MAX_FDS: usize = 64;

/// Request lines, and the descriptors (SCM_RIGHTS) that came with them.
struct LineReader {
    conn: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

enum Line {
    Request(String, Vec<OwnedFd>),
    TooLong,
    End,
}

impl LineReader {
    fn next(&mut self) -> Line {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let fds = std::mem::take(&mut self.fds);
                return Line::Request(String::from_utf8_lossy(&line).into_owned(), fds);
            }
            if self.buf.len() > MAX_LINE {
                return Line::TooLong;
            }
            let mut chunk = [0u8; 4096];
            let mut raw = [-1 as RawFd; MAX_FDS];
            let mut iov = [libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            }];
            // SAFETY: the iovec points at `chunk`, alive and writable for the call; `raw`
            // has room for MAX_FDS descriptors.
            let r = unsafe { self.conn.recv_with_fds(&mut iov, &mut raw) };
            let (n, nfds) = match r {
                Ok(v) => v,
                Err(_) => return Line::End,
            };
            for &fd in raw.iter().take(nfds) {
                if fd >= 0 {
                    // SAFETY: the kernel just installed `fd` in this process for us; nothing
                    // else owns it.
                    self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            if n == 0 {
                return Line::End;
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
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
    let mut reader = LineReader {
        conn,
        buf: Vec::new(),
        fds: Vec::new(),
    };
    loop {
        let (line, fds) = match reader.next() {
            Line::End => return,
            Line::TooLong => {
                let _ = reply(&mut writer, &Response::error("request line too long"));
                return;
            }
            Line::Request(l, fds) => (l, fds),
        };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match parse_request(&line) {
            Ok(req) => control.handle(req, fds),
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
