//! Kit guests under `keel run` / `keel receive` for the migration tests: a process whose
//! ticks (the tick guest's, the disk guest's counts, the migrate guest's seconds) arrive on a
//! channel as they come, its stderr collected (and readable as it comes).
#![allow(dead_code)]

use keel_guest_kit::KitImage;
use libtest_mimic::Failed;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// "KIT: gap second=S max_us=X all_max_us=Y ticks=T" → (S, X).
pub fn gap_line(line: &str) -> Option<(u32, u64)> {
    let rest = line.strip_prefix("KIT: gap second=")?;
    let (second, rest) = rest.split_once(' ')?;
    let max = rest.strip_prefix("max_us=")?.split(' ').next()?;
    Some((second.parse().ok()?, max.parse().ok()?))
}

/// A free-looking loopback port per test (tests run side by side).
pub fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    47100 + (std::process::id() % 500) as u16 * 4 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A `keel` process whose stdout ticks arrive on a channel and whose stderr is collected.
pub struct Vm {
    pub child: Child,
    pub ticks: mpsc::Receiver<u32>,
    /// The migrate guest's "KIT: gap second=S max_us=X" lines, (S, X), as they came.
    pub gaps: Arc<Mutex<Vec<(u32, u64)>>>,
    /// The last tick taken from `ticks`.
    pub last: std::cell::Cell<Option<u32>>,
    err: Option<std::thread::JoinHandle<String>>,
    /// Stderr so far, as it comes.
    err_now: Arc<Mutex<String>>,
}

impl Vm {
    pub fn spawn(cmd: &mut Command) -> Result<Vm, Failed> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut err = child.stderr.take().ok_or("no stderr")?;
        let (tx, ticks) = mpsc::channel();
        let gaps = Arc::new(Mutex::new(Vec::new()));
        let g = gaps.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The migrate guest's seconds count as its ticks.
                if let Some((second, max_us)) = gap_line(&line) {
                    if let Ok(mut g) = g.lock() {
                        g.push((second, max_us));
                    }
                    if tx.send(second).is_err() {
                        break;
                    }
                    continue;
                }
                // The tick guest's "KIT: tick N", the disk guest's "KIT: count=N tsc=T".
                let n = line
                    .strip_prefix("KIT: tick ")
                    .or_else(|| {
                        line.strip_prefix("KIT: count=")
                            .and_then(|r| r.split(' ').next())
                    })
                    .and_then(|n| n.trim().parse().ok());
                if let Some(n) = n {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
            }
        });
        let err_now = Arc::new(Mutex::new(String::new()));
        let e = err_now.clone();
        let err = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                if let Ok(mut s) = e.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
            e.lock().map(|s| s.clone()).unwrap_or_default()
        });
        Ok(Vm {
            child,
            ticks,
            gaps,
            last: std::cell::Cell::new(None),
            err: Some(err),
            err_now,
        })
    }

    /// The source: the tick guest with an API socket.
    pub fn source(api: &Path) -> Result<Vm, Failed> {
        Vm::spawn(
            keel()
                .args([
                    "run",
                    "--kernel",
                    &KitImage::PvhElf.path().display().to_string(),
                ])
                .args([
                    "--cmdline",
                    "test=ticks secs=120",
                    "--memory",
                    "64M",
                    "--cpus",
                    "2",
                ])
                .args([
                    "--shutdown-timeout",
                    "0",
                    "--api-socket",
                    &api.display().to_string(),
                ]),
        )
    }

    pub fn receiver(port: u16, key: &Path, api: &Path) -> Result<Vm, Failed> {
        Vm::receiver_with(port, key, api, &[])
    }

    /// `keel receive` on loopback `port`, with `extra` arguments (this host's devices).
    pub fn receiver_with(port: u16, key: &Path, api: &Path, extra: &[&str]) -> Result<Vm, Failed> {
        Vm::spawn(
            keel()
                .args(["receive", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--migration-key")
                .arg(key)
                .arg("--api-socket")
                .arg(api)
                .args(extra),
        )
    }

    /// Ticks until one is at least `want`; every tick seen, in order.
    pub fn ticks_to(&self, want: u32, within: Duration) -> Result<Vec<u32>, Failed> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ticks.recv_timeout(left) {
                Ok(n) => {
                    self.last.set(Some(n));
                    seen.push(n);
                    if n >= want {
                        return Ok(seen);
                    }
                }
                Err(_) => {
                    return Err(format!("no tick {want} within {within:?} (saw {seen:?})").into())
                }
            }
        }
    }

    /// Waits for the process to end (at most `within`); its status and stderr.
    pub fn end(&mut self, within: Duration) -> Result<(Option<i32>, String), Failed> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                let err = self
                    .err
                    .take()
                    .and_then(|t| t.join().ok())
                    .unwrap_or_default();
                return Ok((st.code(), err));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let said = self.err_now.lock().map(|s| s.clone()).unwrap_or_default();
                return Err(format!("still running after {within:?}; it said:\n{said}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `within`) until the process has said `what` on stderr.
    pub fn said(&self, what: &str, within: Duration) -> Result<(), Failed> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.err_now.lock().is_ok_and(|s| s.contains(what)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!("no {what:?} within {within:?}").into())
    }

    pub fn stop(mut self) -> Result<(Option<i32>, String), Failed> {
        // SAFETY: kill(2) on the pid of a child we own and have not waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.end(Duration::from_secs(10))
    }
}

pub fn migrate(api: &Path, port: u16, key: &Path) -> Result<std::process::Output, Failed> {
    keel()
        .args(["migrate", "--vm", &api.display().to_string()])
        .args(["--to", &format!("127.0.0.1:{port}")])
        .args(["--migration-key", &key.display().to_string()])
        .output()
        .map_err(|e| e.to_string().into())
}

pub fn wait_socket(p: &Path) -> Result<(), Failed> {
    let t = Instant::now();
    while !p.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} never appeared", p.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The source's end: its status and stderr, and its last tick.
pub fn src_end(mut src: Vm) -> Result<((Option<i32>, u32), String), Failed> {
    let (code, err) = src.end(Duration::from_secs(10))?;
    let last = src
        .ticks
        .try_iter()
        .last()
        .or(src.last.get())
        .ok_or("the source never ticked")?;
    Ok(((code, last), err))
}
