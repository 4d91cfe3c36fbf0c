//! A Linux guest's console for the end-to-end tests: a `keel` process whose serial output
//! and stderr are collected as they come, waited on by what the guest prints.
#![allow(dead_code)]

use libtest_mimic::Failed;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// A running `keel run`, its console collected as it comes.
pub struct Vm {
    pub child: Child,
    console: Option<std::process::ChildStdin>,
    serial: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    start: Instant,
}

pub fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = b.lock() {
                s.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    buf
}

impl Vm {
    pub fn start(args: &[String]) -> Result<Vm, Failed> {
        Vm::start_verb("run", args)
    }

    /// `keel VERB ARGS...` (run, restore).
    pub fn start_verb(verb: &str, args: &[String]) -> Result<Vm, Failed> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.arg(verb).args(args);
        Vm::spawn(cmd)
    }

    /// `cmd` (a `keel` command line, perhaps behind `ip netns exec`), its console piped.
    pub fn spawn(mut cmd: Command) -> Result<Vm, Failed> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start keel: {e}"))?;
        let console = child.stdin.take();
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let err = child.stderr.take().ok_or("no stderr pipe")?;
        Ok(Vm {
            child,
            console,
            serial: collect(out),
            stderr: collect(err),
            start: Instant::now(),
        })
    }

    pub fn serial(&self) -> String {
        self.serial.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn fail(&self, why: &str) -> Failed {
        let serial = self.serial();
        let tail: Vec<&str> = serial.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        format!(
            "{why}\nafter {:.1} s\n--- stderr ---\n{stderr}\n--- serial (last 60 lines) ---\n{}",
            self.start.elapsed().as_secs_f64(),
            tail.join("\n")
        )
        .into()
    }

    pub fn wait_for(&self, needle: &str) -> Result<(), Failed> {
        while self.start.elapsed() < BOOT_TIMEOUT {
            if self.serial().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(self.fail(&format!("timed out waiting for {needle:?}")))
    }

    pub fn expect(&self, needle: &str) -> Result<(), Failed> {
        if self.serial().contains(needle) {
            Ok(())
        } else {
            Err(self.fail(&format!("serial console lacks {needle:?}")))
        }
    }

    /// Types `line` and Enter on the guest's serial console.
    pub fn type_line(&mut self, line: &str) -> Result<(), Failed> {
        let c = self.console.as_mut().ok_or("no console pipe")?;
        c.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("console input: {e}"))?;
        Ok(())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32, Failed> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                std::thread::sleep(Duration::from_millis(200)); // let the readers drain
                return s
                    .code()
                    .ok_or_else(|| self.fail(&format!("keel died: {s:?}")));
            }
            if t.elapsed() > timeout {
                return Err(self.fail("keel did not exit in time"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn expect_clean_end(&mut self, summary: &str) -> Result<(), Failed> {
        let code = self.wait_exit(BOOT_TIMEOUT)?;
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        if code != 0 || !stderr.contains(summary) || stderr.contains("panicked") {
            return Err(self.fail(&format!("expected exit 0 and {summary:?}, got {code}")));
        }
        Ok(())
    }

    pub fn rss_kib(&self) -> Result<u64, Failed> {
        // The VMM is keel's jailed child.
        let vmm = super::vmm_pid(self.child.id());
        let s =
            std::fs::read_to_string(format!("/proc/{vmm}/status")).map_err(|e| e.to_string())?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| "no VmRSS".into())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn run_cmd(cmd: &str, args: &[&str]) -> Result<String, Failed> {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
