//! Live migration of a booted Linux guest between two "hosts" on this machine: network
//! namespaces A and B, each with a bridge holding a tap for the VM and one end of a veth
//! between them (one L2 segment, like two hypervisors on a switch). The guest boots in A
//! from a root disk and a data disk both hosts reach (shared storage), answers pings from A,
//! and is moved to B while A keeps pinging it: a few pings lost at most, traffic following
//! it through the veth once B announced its MAC; then, on B, it reads its data disk (past
//! its page cache) and powers off through its power button. Assets and skips as in
//! `devices.rs`.

#[allow(dead_code)]
mod support;

use libtest_mimic::{Arguments, Failed, Trial};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::console::Vm;
use support::hosts::Hosts;
use support::{asset, fnv, skip_all, Host, Scratch};

struct Assets {
    vmlinux: PathBuf,
    rootfs: PathBuf,
}

/// "N packets transmitted, M received" → (N, M).
fn ping_counts(summary: &str) -> Option<(u32, u32)> {
    let line = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((nums.next()??, nums.next()??))
}

fn linux_guest_moves_host_keeps_answering_pings_and_reads_its_disk(
    a: &Assets,
) -> Result<(), Failed> {
    let dir = Scratch::new("migrate-linux")?;
    let root = dir.path("root.ext4");
    std::fs::copy(&a.rootfs, &root).map_err(|e| e.to_string())?;
    let data = dir.path("data.raw");
    let pattern: Vec<u8> = (0u32..2 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&data, &pattern).map_err(|e| e.to_string())?;
    let want = format!(
        "keel-init: vdb read=65536 fnv={}",
        fnv(&pattern[..64 << 10])
    );
    let key = dir.path("key");
    std::fs::write(&key, b"the key of the two test hosts, 32B").map_err(|e| e.to_string())?;
    let hosts = Hosts::new()?;
    let disks = |cmd: &mut Command| {
        for d in [&root, &data] {
            cmd.args(["--disk", &format!("path={},format=raw", d.display())]);
        }
    };
    let path = |p: &Path| p.display().to_string();

    let api_a = dir.path("a.sock");
    let mut cmd = hosts.keel(0);
    cmd.args([
        "run",
        "--kernel",
        &path(&a.vmlinux),
        "--cpus",
        "1",
        "--memory",
        "256M",
    ]);
    disks(&mut cmd);
    cmd.args(["--net", &format!("tap={}", Hosts::TAP[0])])
        .args(["--api-socket", &path(&api_a), "--shutdown-timeout", "120"])
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 panic=-1 root=/dev/vda rw ip={}::{}:255.255.255.0::eth0:off \
                 keel_report=vdb keel_wait=powerbutton keel_after=vdb",
                hosts.guest_ip(),
                hosts.host_ip(0)
            ),
        ]);
    let mut src = Vm::spawn(cmd)?;
    src.wait_for("keel-init: waiting for power button")?;
    src.expect(&want)?;
    hosts.ping(0, "1").map_err(|e| src.fail(&e))?;

    let port = 47900 + std::process::id() % 100;
    let listen = format!("{}:{port}", hosts.host_ip(1));
    let api_b = dir.path("b.sock");
    let mut cmd = hosts.keel(1);
    cmd.args([
        "receive",
        "--listen",
        &listen,
        "--migration-key",
        &path(&key),
    ])
    .args(["--api-socket", &path(&api_b)]);
    disks(&mut cmd);
    cmd.args(["--net", &format!("tap={}", Hosts::TAP[1])]);
    let mut dst = Vm::spawn(cmd)?;
    std::thread::sleep(Duration::from_millis(500));

    // Host A pings the guest five times a second from before the move to after it.
    let pinger = hosts
        .exec(0, "ping")
        .args(["-i", "0.2", "-c", "40", "-W", "1", &hosts.guest_ip()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ping: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let o = hosts
        .keel(0)
        .args(["migrate", "--vm", &path(&api_a), "--to", &listen])
        .args(["--migration-key", &path(&key)])
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() {
        let source = src.fail("the source");
        return Err(dst.fail(&format!("keel migrate: {:?}: {said}\n{source:?}", o.status)));
    }
    let took = t.elapsed();
    let code = src.wait_exit(Duration::from_secs(20))?;
    if std::env::var_os("KEEL_TEST_DEBUG").is_some() {
        eprintln!("{:?}", src.fail("source"));
    }
    if code != 0 {
        return Err(src.fail(&format!("the source ended with {code}")));
    }
    let pings = pinger.wait_with_output().map_err(|e| e.to_string())?;
    let summary = String::from_utf8_lossy(&pings.stdout).into_owned();
    let (sent, got) =
        ping_counts(&summary).ok_or_else(|| format!("no ping summary in: {summary}"))?;
    // The guest is paused for milliseconds; a ping or two may meet the switch-over.
    if sent < 30 || sent - got > 3 {
        return Err(dst.fail(&format!("pings across the move: {got} of {sent} answered")));
    }
    // Through B only now: A's tap has no VM behind it.
    hosts.ping(0, "3").map_err(|e| dst.fail(&e))?;

    dst.signal(libc::SIGTERM);
    dst.wait_for("keel-init: power button pressed")?;
    dst.wait_for("keel-init: exit=poweroff")?;
    // The destination's serial holds only what the guest printed there: the read after
    // the press, from the disk the destination opened.
    dst.expect(&want)?;
    dst.expect_clean_end("guest powered off")?;
    if std::env::var_os("KEEL_TEST_DEBUG").is_some() {
        eprintln!("{:?}", dst.fail("destination"));
    }
    eprintln!(
        "{} (keel migrate took {:.0} ms); {got} of {sent} pings answered across the move",
        said.trim(),
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let host = Host::probe();
    let name = "linux_guest_moves_host_keeps_answering_pings_and_reads_its_disk";
    let assets = match (
        asset("KEEL_VMLINUX", "vmlinux"),
        asset("KEEL_ROOTFS", "rootfs.ext4"),
    ) {
        (Some(vmlinux), Some(rootfs)) => Ok(Assets { vmlinux, rootfs }),
        _ => Err("guest assets not built (run guest/build.sh)".to_string()),
    };
    let skip = host.no_kvm.clone().or(assets.as_ref().err().cloned());
    let trial = match assets {
        Ok(a) => Trial::test(name, move || {
            linux_guest_moves_host_keeps_answering_pings_and_reads_its_disk(&a)
        }),
        Err(why) => Trial::test(name, move || Err(why.into())),
    };
    let trials = skip_all(vec![trial], "Linux migration test", skip.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
