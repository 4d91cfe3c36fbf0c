//! Kit tests on the PCI bus and the virtio-pci devices: enumeration, the kit's own virtio
//! driver on virtio-rng and virtio-blk, and a hostile guest.
//!
//! Each VM runs in a child process (this test binary, re-executed with the VM's
//! configuration in `KEEL_KIT_CHILD_VM`): a panic on a device thread shows on the child's
//! stderr, and a crash or a hang of Keel cannot take the whole suite down with it.

use super::{run_with, MEM};
use keel_guest_kit::{failures, passed, KitImage};
use keel_vmm::device_config::{DiskConfig, DiskFormat};
use keel_vmm::{ExitReason, VmConfig};
use libtest_mimic::{Failed, Trial};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in a child: the JSON of the [`VmConfig`] to run.
pub const CHILD_ENV: &str = "KEEL_KIT_CHILD_VM";
/// The child's last stdout line starts with this, followed by the exit reason as JSON.
const OUTCOME_MARK: &str = "KIT-CHILD-OUTCOME ";
/// A child still running after this long is killed (its own watchdog stops a hung guest at
/// 60 s; this catches a Keel that does not stop).
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// The disk the kit's virtio-blk tests read: 1 MiB, byte `i` = `disk_byte(i)`
/// (guest/kit/virtio.c computes the same).
const DISK_SIZE: usize = 1 << 20;
const SECTOR: usize = 512;

fn disk_byte(i: usize) -> u8 {
    ((i >> 9) * 31 + i * 7 + 3) as u8
}

/// What the virtio-blk test writes to sector 1.
fn written_byte(j: usize) -> u8 {
    (j * 5 + 0x4b) as u8
}

/// In a child process: runs the VM, prints its serial output and then the outcome line.
pub fn child_main(spec: &str) -> ! {
    let cfg: VmConfig = match serde_json::from_str(spec) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{CHILD_ENV} is not a VmConfig: {e}");
            std::process::exit(2);
        }
    };
    match run_with(cfg, None) {
        Ok(r) => {
            print!("{}", r.serial);
            let line = serde_json::json!({
                "reason": r.outcome.reason,
                "wall_ms": r.outcome.wall_time.as_millis() as u64,
            });
            println!("\n{OUTCOME_MARK}{line}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("{}", e.message().unwrap_or("the VM failed"));
            std::process::exit(3);
        }
    }
}

pub(super) struct ChildRun {
    pub(super) serial: String,
    /// The exit reason, as JSON.
    reason: String,
    pub(super) wall_ms: u64,
    stderr: String,
}

impl ChildRun {
    pub(super) fn report(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- stderr ---\n{}",
            self.serial, self.stderr
        )
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

pub(super) fn run_in_child(cfg: &VmConfig) -> Result<ChildRun, Failed> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let spec = serde_json::to_string(cfg).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the child VM process: {e}"))?;
    let out = drain(child.stdout.take().ok_or("no child stdout")?);
    let err = drain(child.stderr.take().ok_or("no child stderr")?);
    let start = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => break Some(s),
            None if start.elapsed() > CHILD_DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let (serial, outcome) = match stdout.rfind(OUTCOME_MARK) {
        Some(at) => (
            stdout[..at].to_string(),
            stdout[at + OUTCOME_MARK.len()..].trim().to_string(),
        ),
        None => (stdout.clone(), String::new()),
    };
    let run = ChildRun {
        serial,
        reason: String::new(),
        wall_ms: 0,
        stderr,
    };
    let Some(status) = status else {
        return Err(format!(
            "Keel did not stop within {CHILD_DEADLINE:?}\n{}",
            run.report()
        )
        .into());
    };
    if !status.success() || outcome.is_empty() {
        return Err(format!("the child VM process ended with {status}\n{}", run.report()).into());
    }
    let v: serde_json::Value =
        serde_json::from_str(&outcome).map_err(|e| format!("bad outcome line '{outcome}': {e}"))?;
    Ok(ChildRun {
        reason: v["reason"].to_string(),
        wall_ms: v["wall_ms"].as_u64().unwrap_or(0),
        ..run
    })
}

/// The guest passed `name`, printed every marker in `markers`, powered off through ACPI,
/// and nothing in Keel panicked.
pub(super) fn expect_clean(r: &ChildRun, name: &str, markers: &[&str]) -> Result<(), Failed> {
    if r.serial.contains("panicked") || r.stderr.contains("panicked") {
        return Err(format!("Keel panicked\n{}", r.report()).into());
    }
    let f = failures(&r.serial);
    if !f.is_empty() {
        return Err(format!("guest reported failures: {f:#?}\n{}", r.report()).into());
    }
    let want = serde_json::to_string(&ExitReason::PowerOff { source: "ACPI S5" })
        .map_err(|e| e.to_string())?;
    if r.reason != want {
        return Err(format!(
            "VM ended with {}, expected {want}\n{}",
            r.reason,
            r.report()
        )
        .into());
    }
    for m in markers {
        if !r.serial.lines().any(|l| l.contains(m)) {
            return Err(format!("no '{m}' in the serial output\n{}", r.report()).into());
        }
    }
    if !passed(&r.serial, name) {
        return Err(format!("no KIT-PASS {name}\n{}", r.report()).into());
    }
    // A kit guest is quick; a slow one means something waited for a timeout.
    if r.wall_ms > 20_000 {
        return Err(format!("the guest took {} ms\n{}", r.wall_ms, r.report()).into());
    }
    Ok(())
}

/// A raw disk image filled with the kit's pattern, removed when dropped.
pub(super) struct TempDisk(PathBuf);

impl TempDisk {
    fn new(tag: &str) -> Result<Self, Failed> {
        Self::with_bytes(tag, &(0..DISK_SIZE).map(disk_byte).collect::<Vec<u8>>())
    }

    /// A disk holding exactly `bytes`.
    pub(super) fn with_bytes(tag: &str, bytes: &[u8]) -> Result<Self, Failed> {
        let path = std::env::temp_dir().join(format!("keel-kit-{}-{tag}.img", std::process::id()));
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDisk(path))
    }

    pub(super) fn config(&self) -> DiskConfig {
        DiskConfig {
            format: Some(DiskFormat::Raw),
            ..DiskConfig::new(self.0.clone())
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn vm(cmdline: &str, disks: Vec<DiskConfig>, rng: bool) -> VmConfig {
    VmConfig {
        cmdline: cmdline.into(),
        vcpus: 1,
        memory: MEM,
        host_quirks: false,
        disks,
        rng,
        ..VmConfig::new(KitImage::PvhElf.path())
    }
}

fn pci_enum() -> Result<(), Failed> {
    let disk = TempDisk::new("enum")?;
    let r = run_in_child(&vm("test=pci-enum devices=2", vec![disk.config()], true))?;
    // Devices go on the bus in VmConfig order: disks, then rng.
    let layout = "size=0x8000 queues=1 msix=2 notify_mult=4 caps=msix,1,3,4,2,5";
    expect_clean(
        &r,
        "pci-enum",
        &[
            "KIT: pci 00:00.0 1b36:0008 host bridge class=0600",
            "KIT: pci 00:01.0 1af4:1042 virtio-blk bar0=0xc",
            "KIT: pci 00:02.0 1af4:1044 virtio-rng bar0=0xc",
            "KIT: pci-enum found 2 virtio devices",
            "KIT: pci-enum done",
        ],
    )?;
    for dev in ["1af4:1042", "1af4:1044"] {
        if !r
            .serial
            .lines()
            .any(|l| l.contains(dev) && l.contains(layout))
        {
            return Err(format!("{dev}: expected '{layout}'\n{}", r.report()).into());
        }
    }
    Ok(())
}

fn virtio_rng() -> Result<(), Failed> {
    let r = run_in_child(&vm("test=virtio-rng", Vec::new(), true))?;
    expect_clean(&r, "virtio-rng", &["KIT: virtio-rng done"])
}

fn virtio_blk() -> Result<(), Failed> {
    let disk = TempDisk::new("blk")?;
    let cmdline = format!("test=virtio-blk sectors={}", DISK_SIZE / SECTOR);
    let r = run_in_child(&vm(&cmdline, vec![disk.config()], false))?;
    expect_clean(&r, "virtio-blk", &["KIT: blk id '", "KIT: virtio-blk done"])?;
    // Sector 1 holds what the guest wrote; every other byte is as the host left it.
    let img = std::fs::read(disk.path()).map_err(|e| e.to_string())?;
    if img.len() != DISK_SIZE {
        return Err(format!("the image is now {} bytes", img.len()).into());
    }
    for (i, &b) in img.iter().enumerate() {
        let want = if (SECTOR..2 * SECTOR).contains(&i) {
            written_byte(i - SECTOR)
        } else {
            disk_byte(i)
        };
        if b != want {
            return Err(format!(
                "image byte {i} (sector {}) is {b:#04x}, expected {want:#04x}",
                i / SECTOR
            )
            .into());
        }
    }
    Ok(())
}

/// The hostile cases against one device (`dev`: "blk" or "rng"), with both on the bus.
fn virtio_hostile(dev: &'static str) -> Result<(), Failed> {
    let disk = TempDisk::new(&format!("hostile-{dev}"))?;
    let r = run_in_child(&vm(
        &format!("test=virtio-hostile dev={dev} exit=poweroff"),
        vec![disk.config()],
        true,
    ))?;
    let mut markers: Vec<String> = [
        "garbage",
        "outside-ram",
        "loops",
        "overflow",
        "rings",
        "msix",
    ]
    .iter()
    .map(|case| format!("KIT: hostile {dev} {case} done"))
    .collect();
    markers.push(format!("KIT: hostile {dev} done"));
    markers.push("KIT: virtio-hostile done".into());
    let markers: Vec<&str> = markers.iter().map(String::as_str).collect();
    expect_clean(&r, "virtio-hostile", &markers)
}

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("pci_enumeration_bars_and_capabilities", pci_enum),
        Trial::test("virtio_rng_driver_with_msix", virtio_rng),
        Trial::test("virtio_blk_read_write_flush_id_and_errors", virtio_blk),
        Trial::test("virtio_hostile_guest_leaves_blk_and_keel_standing", || {
            virtio_hostile("blk")
        }),
        Trial::test("virtio_hostile_guest_leaves_rng_and_keel_standing", || {
            virtio_hostile("rng")
        }),
    ]
}
