//! End-to-end: `keel run` boots real Linux guests and the guests' own logs prove it.
//!
//! Each boot checks many things at once (a Linux boot costs 30-50 s on a PVM host): every vCPU
//! brought up, the memory the kernel found, user space reached, and how the guest's
//! power-off, reboot or panic ends `keel run`. Guest assets come from `guest/build.sh`
//! (paths in KEEL_VMLINUX, KEEL_BZIMAGE, KEEL_INITRD_TINY, KEEL_INITRD_BUSYBOX,
//! KEEL_STOCK_KERNEL, or the default cache). Missing assets, a missing /dev/kvm, or (for the
//! stock kernel) a host without VT-x/AMD-V make the tests report as ignored, with the reason.

mod support;

use libtest_mimic::{Arguments, Failed, Trial};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{asset, skip_all, Host};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

struct Boot {
    status: Option<i32>,
    serial: String,
    stderr: String,
    secs: f64,
}

fn boot(
    kernel: &PathBuf,
    initrd: &PathBuf,
    cpus: u32,
    memory: &str,
    extra_cmdline: &str,
) -> Result<Boot, Failed> {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cpus", &cpus.to_string(), "--memory", memory])
        .args([
            "--cmdline",
            &format!("console=ttyS0 panic=-1 {extra_cmdline}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start keel: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut err = child.stderr.take().ok_or("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s.code();
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let serial = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(Boot {
        status,
        serial,
        stderr,
        secs: start.elapsed().as_secs_f64(),
    })
}

impl Boot {
    fn fail(&self, why: &str) -> Failed {
        let tail: Vec<&str> = self.serial.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "{why}\nstatus {:?} after {:.1} s\n--- stderr ---\n{}\n--- serial (last 40 lines) ---\n{}",
            self.status,
            self.secs,
            self.stderr,
            tail.join("\n")
        )
        .into()
    }

    fn expect(&self, needle: &str) -> Result<(), Failed> {
        if self.serial.contains(needle) {
            Ok(())
        } else {
            Err(self.fail(&format!("serial console lacks {needle:?}")))
        }
    }

    fn expect_end(&self, status: i32, summary: &str) -> Result<(), Failed> {
        if self.status != Some(status) || !self.stderr.contains(summary) {
            return Err(self.fail(&format!("expected exit status {status} and {summary:?}")));
        }
        if self.stderr.contains("panicked") {
            return Err(self.fail("keel panicked"));
        }
        Ok(())
    }

    /// The kernel's "Memory: A/BK available" line: B is the RAM it found.
    fn kernel_memory_kib(&self) -> Result<u64, Failed> {
        let line = self
            .serial
            .lines()
            .find(|l| l.contains("Memory: ") && l.contains("K available"))
            .ok_or_else(|| self.fail("no 'Memory: ...K available' line"))?;
        let after = line.split("Memory: ").nth(1).unwrap_or_default();
        let total = after
            .split('/')
            .nth(1)
            .and_then(|s| s.split('K').next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.fail(&format!("cannot parse {line:?}")))?;
        Ok(total)
    }

    /// Every vCPU up (kernel log), the memory asked for (less what the platform reserves
    /// below 1 MiB), and the init's own view of both.
    fn expect_machine(&self, cpus: u32, memory_mib: u64) -> Result<(), Failed> {
        let up = if cpus == 1 {
            "smp: Brought up 1 node, 1 CPU".to_string()
        } else {
            format!("smp: Brought up 1 node, {cpus} CPUs")
        };
        self.expect(&up)?;
        self.expect(&format!("keel-init: cpus={cpus}"))?;
        let found = self.kernel_memory_kib()?;
        let asked = memory_mib * 1024;
        // Keel reserves the EBDA, VGA hole and ROM area (385 KiB) below 1 MiB; the kernel
        // rounds to pages. Anything further off means memory went missing.
        if found > asked || asked - found > 1024 {
            return Err(self.fail(&format!(
                "kernel found {found} KiB of RAM, asked for {asked} KiB"
            )));
        }
        Ok(())
    }
}

struct Assets {
    vmlinux: PathBuf,
    bzimage: PathBuf,
    tiny: PathBuf,
    busybox: Option<PathBuf>,
}

fn linux_trials(a: &Assets) -> Vec<Trial> {
    let (v, b, t) = (a.vmlinux.clone(), a.bzimage.clone(), a.tiny.clone());
    let (v2, t2) = (v.clone(), t.clone());
    let (v3, t3) = (v.clone(), t.clone());
    let mut trials = vec![
        Trial::test("linux_pvh_vmlinux_1cpu_256m_poweroff", move || {
            let r = boot(&v, &t, 1, "256M", "keel_exit=poweroff")?;
            r.expect("KEEL-INIT-OK")?;
            r.expect_machine(1, 256)?;
            r.expect_end(0, "guest powered off")
        }),
        Trial::test("linux_bzimage_2cpus_2g_reboot", move || {
            let r = boot(&b, &t2, 2, "2G", "keel_exit=reboot")?;
            r.expect("KEEL-INIT-OK")?;
            r.expect_machine(2, 2048)?;
            r.expect_end(0, "guest rebooted")
        }),
        Trial::test("linux_pvh_vmlinux_2cpus_512m_panic", move || {
            let r = boot(&v2, &t3, 2, "512M", "keel_exit=panic")?;
            r.expect("Kernel panic")?;
            r.expect_machine(2, 512)?;
            r.expect_end(0, "guest rebooted")
        }),
    ];
    if let Some(bb) = a.busybox.clone() {
        trials.push(Trial::test("linux_busybox_userspace_2cpus", move || {
            let r = boot(&v3, &bb, 2, "512M", "")?;
            r.expect("KEEL-INIT-OK")?;
            r.expect_end(0, "guest powered off")
        }));
    }
    trials
}

fn stock_trial(kernel: Option<PathBuf>, initrd: Option<PathBuf>) -> Trial {
    Trial::test("stock_debian_cloud_kernel_boots_to_userspace", move || {
        let (Some(k), Some(i)) = (kernel.clone(), initrd.clone()) else {
            return Err("stock kernel or busybox initramfs missing (guest/build.sh stock)".into());
        };
        let r = boot(&k, &i, 2, "1G", "")?;
        r.expect("KEEL-INIT-OK")?;
        r.expect_end(0, "guest powered off")
    })
}

fn main() {
    let mut args = Arguments::from_args();
    // A Linux boot keeps a host core busy per vCPU for tens of seconds on PVM: boots run one
    // at a time unless --test-threads says otherwise, so none starves the others into a
    // timeout.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let host = Host::probe();

    let assets = match (
        asset("KEEL_VMLINUX", "vmlinux"),
        asset("KEEL_BZIMAGE", "bzImage"),
        asset("KEEL_INITRD_TINY", "initramfs-tiny.cpio.gz"),
    ) {
        (Some(vmlinux), Some(bzimage), Some(tiny)) => Ok(Assets {
            vmlinux,
            bzimage,
            tiny,
            busybox: asset("KEEL_INITRD_BUSYBOX", "initramfs-busybox.cpio.gz"),
        }),
        _ => Err("guest assets not built (run guest/build.sh)".to_string()),
    };

    let trials = match &assets {
        Ok(a) => linux_trials(a),
        Err(_) => linux_trials(&Assets {
            vmlinux: PathBuf::new(),
            bzimage: PathBuf::new(),
            tiny: PathBuf::new(),
            busybox: None,
        }),
    };
    let skip_linux = host.no_kvm.clone().or(assets.as_ref().err().cloned());
    let mut trials = skip_all(trials, "Linux boot tests", skip_linux.as_deref());

    let stock = stock_trial(
        asset("KEEL_STOCK_KERNEL", "stock/vmlinuz"),
        asset("KEEL_INITRD_BUSYBOX", "initramfs-busybox.cpio.gz"),
    );
    match host.no_hardware_virt {
        Some(why) => {
            eprintln!("*** SKIPPING stock_debian_cloud_kernel_boots_to_userspace: {why} ***");
            trials.push(stock.with_ignored_flag(true));
        }
        None => trials.push(stock),
    }
    libtest_mimic::run(&args, trials).exit();
}
