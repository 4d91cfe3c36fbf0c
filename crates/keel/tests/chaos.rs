//! A hostile guest beside a normal one, through the real `keel` binary (with whatever jail
//! and seccomp filter the CLI applies by default).
//!
//! The chaos VM runs the guest kit's `test=chaos`: random port I/O, MMIO over every BAR, the
//! BAR window, ECAM, IOAPIC, LAPIC and unbacked addresses, PCI configuration garbage (BARs
//! moved onto each other), and corrupt virtqueues on every virtio device (disk, rng, net,
//! vsock, balloon). The normal VM runs `test=blk-soak`, which writes and verifies patterns on
//! its own disk for the same time. Keel must not panic; the chaos VM ends with `KIT-PASS
//! chaos` (or a clear `keel:` error, status 1); the normal VM's workload completes with the
//! data the host then finds in its image; and once both are gone the host has its memory,
//! file handles, tap devices and temporary files back.
//!
//! Short mode: 35 s. `KEEL_LONG_TESTS=1`: 600 s. `KEEL_CHAOS_SEED=N` picks the seed (it is
//! printed, so a failure can be replayed), `KEEL_CHAOS_SECS=N` any other duration.

#[allow(dead_code)] // the asset lookup and the hardware-virt probe serve other tests
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Scratch;
use support::{skip_all, Host};

const DEFAULT_SEED: u64 = 20261125;
const SHORT_SECS: u64 = 35;
const LONG_SECS: u64 = 600;
/// MemAvailable may differ this much before and after (other processes run too).
const MEM_TOLERANCE_KIB: u64 = 64 * 1024;
/// Allocated file handles (system-wide) may differ this much.
const FILE_NR_TOLERANCE: u64 = 256;
const SOAK_DISK: u64 = 1 << 20;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// A `keel run` and what it printed.
struct Vm {
    name: &'static str,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
}

impl Vm {
    fn start(name: &'static str, args: &[String], log: &str) -> Result<Vm, Failed> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("run")
            .args(args)
            .env("KEEL_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run keel: {e}"))?;
        let stdout = collect(child.stdout.take().ok_or("no stdout pipe")?);
        let stderr = collect(child.stderr.take().ok_or("no stderr pipe")?);
        Ok(Vm {
            name,
            child,
            stdout,
            stderr,
            status: None,
        })
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The tail of both streams, for a failure message.
    fn tails(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        format!(
            "--- {} serial (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(self.serial()),
            self.name,
            tail(self.stderr())
        )
    }
}

/// Waits for every VM to end; kills them all after `deadline`.
fn wait_all(vms: &mut [&mut Vm], deadline: Instant) -> Result<(), Failed> {
    loop {
        let mut running = 0;
        for vm in vms.iter_mut() {
            if vm.status.is_none() {
                vm.status = vm.child.try_wait().map_err(|e| format!("wait: {e}"))?;
                running += usize::from(vm.status.is_none());
            }
        }
        if running == 0 {
            // Let the reader threads drain the pipes.
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut msg = String::from("timed out; killed:");
            for vm in vms.iter_mut() {
                if vm.status.is_none() {
                    let _ = vm.child.kill();
                    vm.status = vm.child.wait().ok();
                    msg.push_str(&format!("\n{}", vm.tails()));
                }
            }
            return Err(msg.into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- host resources ----

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn files_allocated() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Samples `f` a few times over ~`ms` and keeps the median: one sample can catch a
/// neighbour's compiler mid-link.
fn settled(f: fn() -> u64, ms: u64) -> u64 {
    let mut v: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(ms / 5));
            f()
        })
        .collect();
    v.sort_unstable();
    v[2]
}

/// Waits up to 20 s for `f` to come within `tolerance` below (or anywhere above) `before`.
fn back_to(what: &str, f: fn() -> u64, before: u64, tolerance: u64) -> Result<u64, Failed> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = settled(f, 500);
        let ok = if what == "MemAvailable" {
            now + tolerance >= before
        } else {
            now <= before + tolerance
        };
        if ok {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(
                format!("{what}: {before} before, {now} after (tolerance {tolerance})").into(),
            );
        }
    }
}

/// The soak guest's disk hash: FNV-1a-style over little-endian u64 words.
fn disk_hash(path: &Path) -> Result<u64, Failed> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in data.chunks_exact(8) {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(h)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn sized_file(path: &Path, len: u64) -> Result<String, Failed> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(len)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

// ---- the test ----

/// How the chaos guest ends (by seed), and the summary Keel prints for it.
fn ending(seed: u64) -> (&'static str, &'static str) {
    match seed % 3 {
        0 => ("poweroff", "keel: guest powered off (ACPI S5)"),
        1 => ("acpi-reset", "keel: guest rebooted (ACPI reset)"),
        _ => ("i8042", "keel: guest rebooted (i8042 reset)"),
    }
}

/// The chaos VM ended acceptably: status 0 with `KIT-PASS chaos` and the expected summary,
/// or status 1 with a `keel:` line saying why Keel stopped the VM (a vCPU failure or a guest
/// crash report: KVM refusing what the guest did). A signal death, a Rust panic (status
/// 101), a `KIT-FAIL` or any other status is not.
fn check_chaos(vm: &Vm, secs: u64, summary: &str) -> Result<(), Failed> {
    let serial = vm.serial();
    let err = vm.stderr();
    let status = vm.status.ok_or("no exit status")?;
    let fails = keel_guest_kit::failures(&serial);
    if !fails.is_empty() {
        return Err(format!("the chaos guest failed itself: {fails:?}\n{}", vm.tails()).into());
    }
    match status.code() {
        Some(0) => {
            if !keel_guest_kit::passed(&serial, "chaos") || !err.contains(summary) {
                return Err(format!(
                    "status 0 without KIT-PASS chaos and {summary:?}\n{}",
                    vm.tails()
                )
                .into());
            }
            if !serial.contains("KIT: chaos rom intact") {
                return Err(
                    format!("a device wrote the read-only ROM area\n{}", vm.tails()).into(),
                );
            }
        }
        Some(1) => {
            let clear = err.lines().any(|l| {
                l.starts_with("keel: vCPU ") && l.contains(" failed: ")
                    || l.starts_with("keel: guest reported a crash")
            });
            if !clear {
                return Err(format!("status 1 without a clear reason\n{}", vm.tails()).into());
            }
            eprintln!("chaos VM stopped by Keel (acceptable):\n{}", vm.tails());
            return Ok(());
        }
        _ => return Err(format!("chaos VM ended with {status}\n{}", vm.tails()).into()),
    }
    // It really did something: progress lines, and Keel saw it.
    let rounds = serial.matches("KIT: chaos round ").count() as u64;
    if rounds < (secs / 10).max(2) {
        return Err(format!("only {rounds} progress lines in {secs} s\n{}", vm.tails()).into());
    }
    for evidence in [
        "unhandled port",
        "unbacked guest-physical",
        "virtio device needs a reset",
    ] {
        if !err.contains(evidence) {
            return Err(format!("Keel's log never mentions {evidence:?}\n{}", vm.tails()).into());
        }
    }
    if let Some(last) = serial.lines().rfind(|l| l.starts_with("KIT: chaos round ")) {
        eprintln!("chaos: {last}");
    }
    Ok(())
}

fn check_soak(vm: &Vm, disk: &Path) -> Result<(), Failed> {
    let serial = vm.serial();
    let status = vm.status.ok_or("no exit status")?;
    if status.code() != Some(0) || !keel_guest_kit::passed(&serial, "blk-soak") {
        return Err(format!(
            "the normal VM's workload did not complete ({status})\n{}",
            vm.tails()
        )
        .into());
    }
    let done = serial
        .lines()
        .find(|l| l.starts_with("KIT: soak done"))
        .ok_or("no `KIT: soak done` line")?;
    eprintln!("soak: {done}");
    let hash = done
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hash=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("no hash in {done:?}"))?;
    let host = disk_hash(disk)?;
    if hash != host {
        return Err(format!(
            "the soak guest read back hash {hash:#x}, the image on the host hashes to {host:#x}"
        )
        .into());
    }
    Ok(())
}

fn chaos_beside_normal() -> Result<(), Failed> {
    let seed = env_u64("KEEL_CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let long = std::env::var("KEEL_LONG_TESTS").is_ok_and(|v| v == "1");
    let secs = env_u64("KEEL_CHAOS_SECS").unwrap_or(if long { LONG_SECS } else { SHORT_SECS });
    let (exit, summary) = ending(seed);
    eprintln!("chaos: seed={seed} secs={secs} exit={exit} (replay with KEEL_CHAOS_SEED={seed})");

    let links_before = links();
    let fds_before = own_fds();
    let files_before = settled(files_allocated, 1000);
    let mem_before = settled(mem_available_kib, 1000);

    let dir = Scratch::new("chaos")?;
    let kernel = KitImage::PvhElf.path().to_string_lossy().into_owned();
    let soak_disk = dir.path("soak.raw");
    let soak_args = vec![
        "--kernel".into(),
        kernel.clone(),
        "--memory".into(),
        "64M".into(),
        "--cmdline".into(),
        format!("test=blk-soak seed={seed} secs={secs}"),
        "--disk".into(),
        format!("path={}", sized_file(&soak_disk, SOAK_DISK)?),
    ];
    let vsock = dir.path("vsock.sock");
    let mut chaos_args = vec![
        "--kernel".into(),
        kernel,
        "--memory".into(),
        "64M".into(),
        "--cmdline".into(),
        format!("test=chaos seed={seed} secs={secs} exit={exit}"),
        "--disk".into(),
        format!("path={}", sized_file(&dir.path("chaos.raw"), 4 << 20)?),
        "--rng".into(),
        "--vsock".into(),
        format!("cid=3,socket={}", vsock.display()),
        "--balloon".into(),
    ];
    if running_as_root() && Path::new("/dev/net/tun").exists() {
        chaos_args.extend(["--net".into(), String::new()]);
    } else {
        eprintln!("chaos: not root or no /dev/net/tun: the chaos VM gets no NIC");
    }

    let mut normal = Vm::start("normal", &soak_args, "info")?;
    // Debug from the exit loop: the first unhandled accesses are the evidence looked for.
    let mut chaos = Vm::start("chaos", &chaos_args, "info,keel_vmm::runner=debug")?;
    let deadline = Instant::now() + Duration::from_secs(secs + 180);
    wait_all(&mut [&mut normal, &mut chaos], deadline)?;

    for vm in [&normal, &chaos] {
        if vm.stderr().contains("panicked") {
            return Err(format!("keel panicked\n{}", vm.tails()).into());
        }
    }
    check_chaos(&chaos, secs, summary)?;
    check_soak(&normal, &soak_disk)?;

    // The host has everything back.
    if vsock.exists() {
        return Err(format!("{} is left behind", vsock.display()).into());
    }
    let mut left: Vec<String> = std::fs::read_dir(&dir.0)
        .map_err(|e| format!("{}: {e}", dir.0.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "soak.raw" && n != "chaos.raw")
        .collect();
    left.sort();
    if !left.is_empty() {
        return Err(format!("files left in the scratch directory: {left:?}").into());
    }
    drop(dir);
    // Taps Keel creates itself are named keel<N>; other links may come and go (other tests).
    let leftover: Vec<String> = links()
        .difference(&links_before)
        .filter(|n| n.starts_with("keel"))
        .cloned()
        .collect();
    if !leftover.is_empty() {
        return Err(format!("tap devices left behind: {leftover:?}").into());
    }
    drop(normal);
    drop(chaos);
    let fds_after = own_fds();
    if fds_after > fds_before {
        return Err(format!("this test holds {fds_before} fds before, {fds_after} after").into());
    }
    let files_after = back_to(
        "allocated file handles",
        files_allocated,
        files_before,
        FILE_NR_TOLERANCE,
    )?;
    let mem_after = back_to(
        "MemAvailable",
        mem_available_kib,
        mem_before,
        MEM_TOLERANCE_KIB,
    )?;
    eprintln!(
        "chaos: MemAvailable {mem_before} -> {mem_after} KiB, file handles {files_before} -> {files_after}"
    );
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let host = Host::probe();
    let trials = vec![Trial::test(
        "chaos_guest_beside_a_normal_vm",
        chaos_beside_normal,
    )];
    let trials = skip_all(trials, "chaos tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
