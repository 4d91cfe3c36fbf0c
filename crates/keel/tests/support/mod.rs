//! What the guest-booting integration tests share: finding guest assets, and deciding which
//! tests this host can run (and saying loudly why not).

pub mod console;
pub mod hosts;
pub mod kit;

use libtest_mimic::Trial;
use std::path::{Path, PathBuf};

/// A guest asset: `$var` if set, else `file` in the guest cache (`$KEEL_CACHE_DIR/guest`,
/// default `~/.cache/keel/guest`); `None` when it is not there.
pub fn asset(var: &str, file: &str) -> Option<PathBuf> {
    let p = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("KEEL_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keel")))?
            .join("guest")
            .join(file),
    };
    p.is_file().then_some(p)
}

/// Why this host cannot run guests at all (`/dev/kvm` unusable), and why it cannot run
/// tests that need hardware VT-x/AMD-V.
pub struct Host {
    pub no_kvm: Option<String>,
    pub no_hardware_virt: Option<String>,
}

impl Host {
    pub fn probe() -> Host {
        let no_kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .err()
            .map(|e| format!("/dev/kvm: {e}"));
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let hw = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            .unwrap_or(false);
        let no_hardware_virt = if pvm || !hw {
            Some("needs hardware VT-x/AMD-V: stock distribution kernels cannot boot on PVM".into())
        } else {
            no_kvm.clone()
        };
        Host {
            no_kvm,
            no_hardware_virt,
        }
    }
}

/// Marks every trial ignored, announcing `what` and `why` on stderr, when `why` is set.
pub fn skip_all(trials: Vec<Trial>, what: &str, why: Option<&str>) -> Vec<Trial> {
    let Some(why) = why else {
        return trials;
    };
    eprintln!("\n*** SKIPPING {} {what}: {why} ***\n", trials.len());
    trials
        .into_iter()
        .map(|t| t.with_ignored_flag(true))
        .collect()
}

/// The VMM process of the `keel run` with PID `keel`: its jailed child, or `keel` itself
/// under `--no-jail`. Waits up to 10 s for the child to appear.
#[allow(dead_code)]
pub fn vmm_pid(keel: u32) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{keel}/task/{keel}/children"))
            .unwrap_or_default();
        if let Some(c) = children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
        {
            return c;
        }
        if std::time::Instant::now() > deadline {
            return keel;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A scratch directory of the test's own (`$TMPDIR/keel-<tag>-<pid>`), removed at the end.
#[allow(dead_code)]
pub struct Scratch(pub PathBuf);

#[allow(dead_code)]
impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch, String> {
        let p = std::env::temp_dir().join(format!("keel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Scratch(p))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// FNV-1a (64-bit) of `bytes`, in hex: what keel-init reports for a disk it read
/// (`keel_report=vdb`).
#[allow(dead_code)] // the Linux disk tests' only
pub fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}
