//! Disk rate limits as the guest sees them: a guest-kit guest (`test=blk-read-rate`) reads a
//! whole 16 MiB disk in 64 KiB requests, four in flight, between two markers on its serial
//! console; the host times the markers. With `--io-bps`, a disk's own `bps=`, or `--io-iops`,
//! the rate must be within 10% of the configured one (the bucket starts full: its burst is
//! subtracted); without a limit the same read must be far faster, so the limited runs
//! measure the limiter and not the machine. With `--io-bps` the VM's cgroup must also carry
//! the I/O throttle for the block device holding the image (when it is on one).
//! Reported as ignored, with the reason, when /dev/kvm is unusable.

#[allow(dead_code)] // the helpers this file does not need
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::{skip_all, Host};

const DISK: u64 = 16 << 20;
const REQ: u64 = 64 << 10;
const RATE: u64 = 4 << 20;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The kit's disk pattern (guest/kit/virtio.c `disk_byte`) in a file removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Result<Disk, Failed> {
        let p =
            std::env::temp_dir().join(format!("keel-limits-io-{}-{tag}.img", std::process::id()));
        let bytes: Vec<u8> = (0..DISK)
            .map(|i| ((i >> 9) * 31 + i * 7 + 3) as u8)
            .collect();
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Disk(p))
    }
    fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What one run showed.
struct Run {
    /// Host time between the start and end markers.
    elapsed: Duration,
    /// The VM's blkio/io throttle files as read while it ran (empty if it had no cgroup).
    throttle: String,
}

/// The VM's I/O throttle settings, read from its cgroup (v1 blkio or v2 io.max).
fn read_throttle(pid: u32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut out = String::new();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if !path.contains("/keel/vm-") {
            continue;
        }
        let files: &[&str] = if ctrls.split(',').any(|c| c == "blkio") {
            &[
                "/sys/fs/cgroup/blkio{}/blkio.throttle.read_bps_device",
                "/sys/fs/cgroup/blkio{}/blkio.throttle.write_bps_device",
            ]
        } else if ctrls.is_empty() {
            &["/sys/fs/cgroup{}/io.max"]
        } else {
            &[]
        };
        for f in files {
            out += &std::fs::read_to_string(f.replace("{}", path)).unwrap_or_default();
        }
    }
    out
}

fn run(args: &[&str], disk: &str) -> Result<Run, Failed> {
    let kit = KitImage::PvhElf.path().to_string_lossy().into_owned();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "run",
            "--kernel",
            &kit,
            "--memory",
            "64M",
            "--cmdline",
            "test=blk-read-rate req=64",
            "--disk",
            disk,
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run keel: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let (mut start, mut end, mut throttle) = (None, None, String::new());
    let mut serial = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if line.starts_with("KIT: blk-read-rate start") {
                    start = Some(at);
                    // The cgroup holds the VMM: keel's jailed child.
                    throttle = read_throttle(support::vmm_pid(pid));
                } else if line.starts_with("KIT: blk-read-rate end") {
                    end = Some(at);
                }
                serial += &line;
                serial.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() || serial.contains("KIT-FAIL") || !serial.contains("KIT-PASS") {
        return Err(format!("keel {args:?}: {status}\nserial:\n{serial}\nstderr:\n{err}").into());
    }
    match (start, end) {
        (Some(s), Some(e)) => Ok(Run {
            elapsed: e - s,
            throttle,
        }),
        _ => Err(format!("markers missing:\n{serial}").into()),
    }
}

/// `units` (bytes or requests) done in `elapsed` beyond a `burst` the full bucket gave at
/// once: within 10% of `rate`.
fn expect_rate(
    what: &str,
    units: u64,
    burst: u64,
    rate: u64,
    elapsed: Duration,
) -> Result<(), Failed> {
    let measured = (units - burst) as f64 / elapsed.as_secs_f64();
    let ratio = measured / rate as f64;
    eprintln!(
        "{what}: {units} in {:.3} s (burst {burst}): {measured:.0}/s against {rate}/s ({:+.1}%)",
        elapsed.as_secs_f64(),
        (ratio - 1.0) * 100.0
    );
    if (ratio - 1.0).abs() > 0.10 {
        return Err(format!("{what}: {measured:.0}/s is not within 10% of {rate}/s").into());
    }
    Ok(())
}

fn vm_wide_bps() -> Result<(), Failed> {
    let disk = Disk::new("vm-bps")?;
    let r = run(&["--io-bps", "4M"], &format!("path={}", disk.path()))?;
    // The default burst is 100 ms worth.
    expect_rate("--io-bps 4M", DISK, RATE / 10, RATE, r.elapsed)?;
    // The cgroup throttle names the image's block device, if it is on one.
    match keel_cgroup::block_device_of(&disk.0).map_err(|e| e.to_string())? {
        Some((major, minor)) => {
            let want = format!("{major}:{minor}");
            let ok = r
                .throttle
                .lines()
                .any(|l| l.starts_with(&want) && (l.contains(&RATE.to_string())));
            if !ok {
                return Err(format!(
                    "no cgroup throttle of {RATE} on {want}; found {:?}",
                    r.throttle
                )
                .into());
            }
        }
        None => eprintln!("the disk image is not on a block device: no cgroup throttle to check"),
    }
    Ok(())
}

fn per_disk_bps() -> Result<(), Failed> {
    let disk = Disk::new("disk-bps")?;
    let r = run(&[], &format!("path={},bps=4M,bps_burst=64K", disk.path()))?;
    expect_rate("--disk bps=4M", DISK, 64 << 10, RATE, r.elapsed)
}

fn vm_wide_iops() -> Result<(), Failed> {
    let disk = Disk::new("vm-iops")?;
    let r = run(&["--io-iops", "64"], &format!("path={}", disk.path()))?;
    // 256 requests of 64 KiB; a 6-request burst (100 ms of 64/s).
    expect_rate("--io-iops 64", DISK / REQ, 6, 64, r.elapsed)
}

fn unlimited_is_much_faster() -> Result<(), Failed> {
    let disk = Disk::new("free")?;
    let r = run(&[], &format!("path={}", disk.path()))?;
    let rate = DISK as f64 / r.elapsed.as_secs_f64();
    eprintln!("no limit: {DISK} bytes in {:.3} s", r.elapsed.as_secs_f64());
    if rate < 3.0 * RATE as f64 {
        return Err(format!(
            "without a limit the read ran at {rate:.0} B/s, not far above {RATE}: the limited \
             runs cannot tell the limiter from the machine"
        )
        .into());
    }
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One VM at a time: timing runs must not compete with each other for the CPU.
    args.test_threads = Some(1);
    let trials = vec![
        Trial::test("io_bps_limits_the_vm_wide_read_rate", vm_wide_bps),
        Trial::test("disk_bps_limits_the_read_rate", per_disk_bps),
        Trial::test("io_iops_limits_the_request_rate", vm_wide_iops),
        Trial::test("unlimited_reads_are_much_faster", unlimited_is_much_faster),
    ];
    let host = Host::probe();
    let trials = skip_all(trials, "disk rate-limit tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
