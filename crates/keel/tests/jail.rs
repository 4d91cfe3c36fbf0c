//! The jail `keel run` puts every VMM in (issue 4): checked from the host on a running VM —
//! its credentials, capabilities, namespaces, root and limits — and what is left once it ends.
//! Without a usable /dev/kvm every test is reported ignored (skipped), loudly.

#[allow(dead_code)]
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

fn kit() -> String {
    KitImage::PvhElf.path().display().to_string()
}

/// Starts a kit guest that waits for console input (stdin stays open) with `extra` flags.
fn start(extra: &[&str]) -> Child {
    keel()
        .args([
            "run",
            "--kernel",
            &kit(),
            "--cmdline",
            "test=console",
            "--memory",
            "64M",
        ])
        .args(["--shutdown-timeout", "0"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Waits until the VMM has dropped root and its seccomp filter is on: it is then confined and
/// running the guest.
fn confined_vmm(keel: &Child) -> Result<u32, Failed> {
    let pid = support::vmm_pid(keel.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let uid = status_field(pid, "Uid");
        if !uid.is_empty() && !uid.starts_with("0\t") && status_field(pid, "Seccomp") == "2" {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "the VMM (pid {pid}) never ran unprivileged with its seccomp filter (Uid {:?}, Seccomp {:?})",
        status_field(pid, "Uid"),
        status_field(pid, "Seccomp")
    )
    .into())
}

fn stop(mut child: Child) -> Result<(std::process::ExitStatus, String), Failed> {
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("keel did not stop within 20 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok((o.status, String::from_utf8_lossy(&o.stderr).into_owned()))
}

/// Every path below `root` (relative, with a leading '/').
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            out.insert(rel.clone());
            // Do not descend into directories the jail bind-mounts whole (their contents are
            // the host's); the expectation lists them as leaves.
            if e.file_type().is_ok_and(|t| t.is_dir()) && !rel.starts_with("/run/keel/cid") {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// A path and all its ancestors, as `tree` lists them.
fn with_parents(paths: &[PathBuf]) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for p in paths {
        let mut cur = PathBuf::from("/");
        for c in p.components().skip(1) {
            cur.push(c);
            s.insert(cur.display().to_string());
        }
    }
    s
}

/// The Done-when check: a jailed VM's status, namespaces and root, then a clean end.
fn confined_test() -> Result<(), Failed> {
    let dir = support::Scratch::new("jail-confined")?;
    let disk = dir.path("disk.img");
    let ro = dir.path("ro.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&ro, vec![0u8; 1 << 20]).unwrap();
    let api = dir.path("api.sock");
    let cid = 40_000 + std::process::id() % 20_000;
    let child = start(&[
        "--disk",
        &format!("path={}", disk.display()),
        "--disk",
        &format!("path={},readonly=on", ro.display()),
        "--api-socket",
        &api.display().to_string(),
        "--vsock",
        &format!("cid={cid}"),
        "--net",
        "",
        "--rng",
    ]);
    let keel_pid = child.id();
    let checks = (|| -> Result<(), Failed> {
        let pid = confined_vmm(&child)?;
        if pid == keel_pid {
            return Err(
                "the VMM runs in the keel process itself: no supervisor, no PID namespace".into(),
            );
        }
        for (key, want) in [
            ("CapInh", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapEff", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("NoNewPrivs", "1"),
            ("Seccomp", "2"),
            ("Groups", ""),
        ] {
            let got = status_field(pid, key);
            if got != want {
                return Err(format!("{key}: {got:?}, want {want:?}").into());
            }
        }
        for key in ["Uid", "Gid"] {
            let ids = status_field(pid, key);
            if ids.split_whitespace().count() != 4 || ids.split_whitespace().any(|i| i == "0") {
                return Err(format!("{key}: {ids:?}: the VMM still has id 0").into());
            }
        }
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                .map_err(|e| format!("{ns} namespace of the VMM: {e}"))?;
            if mine == its {
                return Err(format!("the VMM shares the host's {ns} namespace ({mine:?})").into());
            }
        }
        // Its root: exactly what it uses.
        let kernel = std::fs::canonicalize(kit()).unwrap();
        let vsock_dir = PathBuf::from(format!("/run/keel/cid{cid}"));
        let want = with_parents(&[
            kernel,
            disk.clone(),
            ro.clone(),
            api.clone(),
            vsock_dir,
            "/dev/kvm".into(),
            "/dev/net/tun".into(),
        ]);
        let got = tree(Path::new(&format!("/proc/{pid}/root")));
        if got != want {
            let extra: Vec<_> = got.difference(&want).collect();
            let missing: Vec<_> = want.difference(&got).collect();
            return Err(
                format!("the jail's root holds {extra:?} too and lacks {missing:?}").into(),
            );
        }
        // Read-only where the VM only reads; nothing executable or setuid.
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let opts = |p: &Path| {
            mounts
                .lines()
                .find(|l| l.split_whitespace().nth(4) == Some(&p.display().to_string()))
                .map(|l| l.split_whitespace().nth(5).unwrap_or("").to_string())
        };
        let ro_opts = opts(&ro).ok_or("the read-only disk is not a mount in the jail")?;
        let rw_opts = opts(&disk).ok_or("the disk is not a mount in the jail")?;
        if !ro_opts.split(',').any(|o| o == "ro") || !rw_opts.split(',').any(|o| o == "rw") {
            return Err(format!("mount options: ro disk {ro_opts}, rw disk {rw_opts}").into());
        }
        if !rw_opts.contains("nosuid") || !rw_opts.contains("noexec") || !rw_opts.contains("nodev")
        {
            return Err(format!("disk mount options {rw_opts} lack nosuid/noexec/nodev").into());
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or("");
        if core.split_whitespace().nth(4) != Some("0") {
            return Err(format!("core dumps allowed: {core}").into());
        }
        // The control socket still answers from inside the jail.
        let o = keel()
            .args(["ctl", "--api-socket", &api.display().to_string(), "ping"])
            .output()
            .unwrap();
        if !o.status.success() {
            return Err(format!("ctl ping: {}", String::from_utf8_lossy(&o.stderr)).into());
        }
        Ok(())
    })();
    let (status, err) = stop(child)?;
    checks.map_err(|e| {
        Failed::from(format!(
            "{}\nkeel's stderr:\n{err}",
            e.message().unwrap_or_default()
        ))
    })?;
    if status.code() != Some(143) {
        return Err(format!("status {status:?} after SIGTERM\n{err}").into());
    }
    // Nothing left on the host: jail mount point, sockets, vsock directory.
    for p in [
        PathBuf::from(format!("/run/keel/jail/vm-{keel_pid}")),
        api.clone(),
        PathBuf::from(format!("/run/keel/cid{cid}")),
    ] {
        if p.exists() {
            return Err(format!("{} left behind\n{err}", p.display()).into());
        }
    }
    Ok(())
}

/// `--jail-uid/--jail-gid` choose the identity; 0 is refused with a clear error.
fn identity_test() -> Result<(), Failed> {
    let child = start(&["--jail-uid", "4242", "--jail-gid", "4343"]);
    let pid = confined_vmm(&child);
    let ids = pid.map(|p| (status_field(p, "Uid"), status_field(p, "Gid")));
    let (_, err) = stop(child)?;
    let (uid, gid) = ids?;
    if !uid.starts_with("4242\t") || !gid.starts_with("4343\t") {
        return Err(format!("Uid {uid:?} Gid {gid:?}\n{err}").into());
    }
    let o = keel()
        .args(["run", "--kernel", &kit(), "--jail-uid", "0"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(2) || !e.contains("uid or gid 0") {
        return Err(format!("--jail-uid 0: status {:?}: {e}", o.status).into());
    }
    Ok(())
}

/// `--no-jail` runs in place, as root, and says so.
fn no_jail_test() -> Result<(), Failed> {
    let child = start(&["--no-jail"]);
    std::thread::sleep(Duration::from_millis(300));
    let pid = support::vmm_pid(child.id());
    let uid = status_field(pid, "Uid");
    let (_, err) = stop(child)?;
    if !uid.starts_with("0\t") || !err.contains("--no-jail") {
        return Err(format!("pid {pid}, Uid {uid:?}\n{err}").into());
    }
    Ok(())
}

/// Killing the supervisor takes the VMM with it: no orphaned VM.
fn orphan_test() -> Result<(), Failed> {
    let mut child = start(&[]);
    let pid = confined_vmm(&child);
    let killed = child.kill();
    let _ = child.wait();
    let pid = pid?;
    killed.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            // SAFETY: kill(2) with a plain pid; cleaning up after a failed test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err("the VMM outlived its killed supervisor".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The supervisor says how the VMM died when it could not say so itself: by SIGSYS (what a
/// seccomp kill is), or by SIGKILL without an OOM in its cgroup.
fn death_report_test() -> Result<(), Failed> {
    for (sig, status, needle) in [
        (libc::SIGSYS, 159, "killed by SIGSYS"),
        (libc::SIGKILL, 137, "killed by signal 9"),
    ] {
        let child = start(&[]);
        let pid = confined_vmm(&child);
        if let Ok(p) = pid {
            // SAFETY: kill(2) with a plain pid: keel's jailed child, alive (just checked).
            unsafe { libc::kill(p as i32, sig) };
        }
        let o = child.wait_with_output().map_err(|e| e.to_string())?;
        pid?;
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(status) || !err.contains(needle) || err.contains("out of memory")
        {
            return Err(format!("signal {sig}: status {:?}\n{err}", o.status).into());
        }
    }
    Ok(())
}

/// `--netns` joins a namespace: the VMM's taps are created there.
fn netns_test() -> Result<(), Failed> {
    let name = format!("keeljail{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output();
    match ip(&["netns", "add", &name]) {
        Ok(o) if o.status.success() => {}
        other => return Err(format!("cannot create a network namespace: {other:?}").into()),
    }
    let path = format!("/var/run/netns/{name}");
    let child = start(&["--netns", &path, "--net", "tap=keeljailtap0"]);
    let checks = (|| -> Result<(), Failed> {
        let pid = confined_vmm(&child)?;
        let its = std::fs::read_link(format!("/proc/{pid}/ns/net")).map_err(|e| e.to_string())?;
        let target = std::fs::metadata(&path).map_err(|e| e.to_string())?;
        let want = format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&target));
        if its.display().to_string() != want {
            return Err(format!("VMM net namespace {its:?}, want {want}").into());
        }
        let o = ip(&["-n", &name, "link", "show", "keeljailtap0"]).map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err("the tap is not in the joined namespace".into());
        }
        Ok(())
    })();
    let (_, err) = stop(child)?;
    let _ = ip(&["netns", "del", &name]);
    checks.map_err(|e| Failed::from(format!("{}\n{err}", e.message().unwrap_or_default())))
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("jailed_vmm_is_confined_and_leaves_nothing", confined_test),
        Trial::test("jail_identity_is_chosen_and_never_root", identity_test),
        Trial::test("no_jail_runs_in_place_with_a_warning", no_jail_test),
        Trial::test("vmm_dies_with_its_supervisor", orphan_test),
        Trial::test("supervisor_reports_how_the_vmm_died", death_report_test),
        Trial::test("netns_is_joined_with_its_taps", netns_test),
    ];
    let host = support::Host::probe();
    let trials = support::skip_all(trials, "jail tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
