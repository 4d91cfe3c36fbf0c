//! A running `keel run` seen from outside, the way an operator sees it: its console lines
//! time-stamped as they arrive, and its cgroup found as the `keel/*` directory below the
//! test's own cgroup whose `cgroup.procs` holds `keel` or one of its descendants (the VMM may
//! run as a child of `keel run`), with readers for that cgroup's CPU and memory files.

use keel_guest_kit::KitImage;
use libtest_mimic::Failed;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type R<T> = Result<T, Failed>;

pub fn fail<T>(msg: impl Into<String>) -> R<T> {
    Err(Failed::from(msg.into()))
}

/// A running `keel run`, its console lines time-stamped as they arrive.
pub struct Vm {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    /// The test's cpu cgroup `keel run` joined, if any.
    cpu_parent: Option<PathBuf>,
}

pub struct Ended {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Vm {
    /// Starts `keel run` on the kit with `cmdline` and `args`; `pin` puts it (and every
    /// thread and child it makes) on host CPU 0.
    pub fn start(name: &'static str, cmdline: &str, args: &[&str], pin: bool) -> R<Vm> {
        Self::start_in(name, cmdline, args, pin, None)
    }

    /// [`Vm::start`], with `keel run` joining the test's cgroup `parent` before exec (so the
    /// VM's own cgroup is created below it).
    pub fn start_in(
        name: &'static str,
        cmdline: &str,
        args: &[&str],
        pin: bool,
        parent: Option<&TestCgroup>,
    ) -> R<Vm> {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
        c.arg("run")
            .arg("--kernel")
            .arg(KitImage::PvhElf.path())
            .args(["--cmdline", cmdline, "--shutdown-timeout", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if pin {
            // SAFETY: the closure runs in the forked child before exec and only makes the
            // async-signal-safe sched_setaffinity(2) call on a stack-local CPU set.
            unsafe {
                c.pre_exec(|| {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(0, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(parent) = parent {
            let procs = parent.procs.clone();
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe calls (open, write, close) on a path built before the fork.
            unsafe {
                c.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the writing process itself.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(err);
                    }
                    Ok(())
                });
            }
        }
        let mut child = c.spawn().map_err(|e| format!("cannot run keel: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push((Instant::now(), l));
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Ok(Vm {
            name,
            child,
            lines,
            stderr,
            cpu_parent: parent.map(|p| p.dir.clone()),
        })
    }

    pub fn stdout(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    pub fn context(&self) -> String {
        format!(
            "{} console:\n{}{} stderr:\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    /// When the console line starting with `prefix` arrived, waiting up to `timeout`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> R<(Instant, String)> {
        let start = Instant::now();
        loop {
            if let Some(hit) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.starts_with(prefix))
            {
                return Ok(hit.clone());
            }
            let exited = self.child.try_wait().ok().flatten().is_some();
            if exited || start.elapsed() > timeout {
                // Let the readers drain, then say what the VM did instead.
                std::thread::sleep(Duration::from_millis(200));
                let why = if exited { "the VM ended" } else { "timed out" };
                return fail(format!(
                    "{why} before {prefix:?} ({} s)\n{}",
                    start.elapsed().as_secs(),
                    self.context()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for `keel run` to end (kills it after that).
    pub fn wait(mut self, timeout: Duration) -> R<Ended> {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return fail(format!(
                    "{} did not end within {timeout:?}\n{}",
                    self.name,
                    self.context()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        Ok(Ended {
            status,
            stdout: self.stdout(),
            stderr: self.stderr.lock().unwrap().clone(),
        })
    }

    /// Stops the VM (SIGTERM; `--shutdown-timeout 0` makes that immediate).
    pub fn stop(self) -> R<Ended> {
        // SAFETY: kill(2) on the pid of a child we own and have not waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(10))
    }

    /// The VM's directory in the hierarchy of `controller` (v2 name), waiting up to 5 s.
    pub fn cgroup(&mut self, controller: &'static str) -> R<PathBuf> {
        let layout = keel_cgroup::Layout::detect().map_err(|e| e.to_string())?;
        let own = match (&self.cpu_parent, controller) {
            (Some(p), "cpu") => p.clone(),
            _ => layout
                .hierarchy_for(controller)
                .map_err(|e| e.to_string())?
                .own_path()
                .to_path_buf(),
        };
        let base = own.join("keel");
        let start = Instant::now();
        loop {
            let family = descendants(self.child.id());
            for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                let procs =
                    std::fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
                if procs
                    .lines()
                    .filter_map(|p| p.trim().parse::<u32>().ok())
                    .any(|p| family.contains(&p))
                {
                    return Ok(entry.path());
                }
            }
            if start.elapsed() > Duration::from_secs(5) {
                return fail(format!(
                    "no cgroup below {} holds keel (pid {}) or a child of it\n{}",
                    base.display(),
                    self.child.id(),
                    self.context()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A cgroup v1 `cpu` directory this test makes to hold its VMs, with a high `cpu.shares` so
/// the other work on a shared host barely moves what is measured: the VMs' shares of what
/// this parent gets. (On v2, or without the v1 cpu controller, the VMs stay where the test
/// runs.) Removed on drop, with the `keel/` directory Keel leaves in it.
pub struct TestCgroup {
    dir: PathBuf,
    procs: std::ffi::CString,
}

impl TestCgroup {
    pub fn cpu(shares: u64) -> R<Option<TestCgroup>> {
        let layout = keel_cgroup::Layout::detect().map_err(|e| e.to_string())?;
        let own = match layout.hierarchy_for("cpu").map_err(|e| e.to_string())? {
            keel_cgroup::Hierarchy::V1 { own, .. } => own,
            keel_cgroup::Hierarchy::V2 { .. } => return Ok(None),
        };
        let dir = own.join(format!("keel-limits-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cg = TestCgroup {
            procs: std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
                .map_err(|e| e.to_string())?,
            dir,
        };
        std::fs::write(cg.dir.join("cpu.shares"), shares.to_string())
            .map_err(|e| format!("{}: {e}", cg.dir.display()))?;
        Ok(Some(cg))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.dir.join("keel"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for Vm {
    /// A failed trial leaves no VM behind to skew the next one.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `pid` and every process descended from it.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(pp) = ppid {
            parent.insert(p, pp);
        }
    }
    let mut family = vec![pid];
    let mut grew = true;
    while grew {
        grew = false;
        for (&p, pp) in &parent {
            if family.contains(pp) && !family.contains(&p) {
                family.push(p);
                grew = true;
            }
        }
    }
    family
}

pub fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// A `key value` line of a cgroup stat file.
pub fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// CPU time the cgroup's tasks have used, in ns: `cpuacct.usage` (v1 with cpu and cpuacct
/// mounted together), `cpu.stat` `usage_usec` (v2), else (v1 with cpu on its own, as on the
/// PVM test bed) the sum of every task's run time from `/proc/<tid>/schedstat`.
pub fn cpu_usage_ns(dir: &Path) -> R<u64> {
    if let Some(n) = read(dir, "cpuacct.usage").and_then(|s| s.trim().parse().ok()) {
        return Ok(n);
    }
    if let Some(us) = read(dir, "cpu.stat").and_then(|s| stat_field(&s, "usage_usec")) {
        return Ok(us * 1000);
    }
    let tasks = read(dir, "tasks").ok_or(format!("{}: no tasks file", dir.display()))?;
    Ok(tasks
        .lines()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{}/schedstat", t.trim())).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Every thread in the cgroup may only run on host CPU 0.
pub fn check_pinned(dir: &Path) -> R<()> {
    let tasks = read(dir, "tasks")
        .or_else(|| read(dir, "cgroup.threads"))
        .unwrap_or_default();
    let mut n = 0;
    for t in tasks.lines() {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", t.trim())).unwrap_or_default();
        if let Some(cpus) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            n += 1;
            if cpus.trim() != "0" {
                return fail(format!("task {t} may run on CPUs {cpus}, not only 0"));
            }
        }
    }
    if n == 0 {
        return fail(format!("no tasks in {}", dir.display()));
    }
    Ok(())
}

/// A `/proc/meminfo` field, in bytes.
pub fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let kb = l.strip_prefix(key)?.strip_prefix(':')?.trim();
                kb.strip_suffix(" kB").unwrap_or(kb).parse::<u64>().ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// The memory files of a VM's cgroup, v1 or v2.
pub struct MemFiles {
    pub dir: PathBuf,
}

impl MemFiles {
    pub fn limit(&self) -> Option<u64> {
        read(&self.dir, "memory.limit_in_bytes")
            .or_else(|| read(&self.dir, "memory.max"))?
            .trim()
            .parse()
            .ok()
    }
    /// Peak usage: `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2).
    pub fn peak(&self) -> Option<u64> {
        read(&self.dir, "memory.max_usage_in_bytes")
            .or_else(|| read(&self.dir, "memory.peak"))?
            .trim()
            .parse()
            .ok()
    }
    /// How often usage hit the limit: `memory.failcnt` (v1) or `max` in `memory.events`.
    pub fn limit_hits(&self) -> Option<u64> {
        read(&self.dir, "memory.failcnt")
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| stat_field(&read(&self.dir, "memory.events")?, "max"))
    }
    /// The swap limit, where the kernel accounts swap: RAM + swap (v1) or swap alone (v2).
    pub fn swap_limit(&self) -> Option<String> {
        read(&self.dir, "memory.memsw.limit_in_bytes")
            .or_else(|| read(&self.dir, "memory.swap.max"))
            .map(|s| s.trim().to_string())
    }
}

/// Polls `f` every 50 ms while `vm` runs, returning the last value seen.
pub fn watch<T>(vm: &mut Vm, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut last = None;
    while vm.child.try_wait().ok().flatten().is_none() {
        if let Some(v) = f() {
            last = Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    last
}
