//! The `keel` command as a user runs it: bad input gets one line and exit status 2; a guest's
//! power-off and reboot end `keel run` with 0 and a summary; SIGTERM stops a VM cleanly.
//! Tests that boot a guest are reported as ignored (skipped) when /dev/kvm is unusable.

#[allow(dead_code)]
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn keel() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.stdin(Stdio::null());
    c
}

fn output(c: &mut Command) -> Result<Output, Failed> {
    c.output()
        .map_err(|e| format!("cannot run keel: {e}").into())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `keel` failed with status 2 and exactly one line on stderr containing `needle`.
fn expect_usage_error(args: &[&str], needle: &str) -> Result<(), Failed> {
    let o = output(keel().args(args))?;
    let err = stderr(&o);
    if o.status.code() != Some(2) {
        return Err(format!("{args:?}: status {:?}, stderr: {err}", o.status).into());
    }
    if err.trim_end().lines().count() != 1 || !err.contains(needle) {
        return Err(
            format!("{args:?}: expected one line mentioning {needle:?}, got:\n{err}").into(),
        );
    }
    if err.contains("panicked") {
        return Err(format!("{args:?} panicked: {err}").into());
    }
    Ok(())
}

fn tmpfile(name: &str, bytes: &[u8]) -> String {
    let p = std::env::temp_dir().join(format!("keel-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).expect("temp dir is writable");
    p.to_string_lossy().into_owned()
}

fn kit() -> String {
    KitImage::PvhElf.path().to_string_lossy().into_owned()
}

fn usage(name: &str, args: &'static [&'static str], needle: &'static str) -> Trial {
    Trial::test(name, move || expect_usage_error(args, needle))
}

fn no_kvm_trials() -> Vec<Trial> {
    let notkernel = tmpfile(
        "notkernel",
        b"this is not a kernel image at all, just text\n",
    );
    vec![
        usage(
            "cpu_quota_not_a_number",
            &["run", "--kernel", "x", "--cpu-quota", "lots"],
            "not a number of CPUs",
        ),
        usage(
            "cpu_quota_zero",
            &["run", "--kernel", "x", "--cpu-quota", "0"],
            "outside",
        ),
        usage(
            "cpu_weight_out_of_range",
            &["run", "--kernel", "x", "--cpu-weight", "0"],
            "--cpu-weight",
        ),
        usage(
            "missing_kernel_file",
            &["run", "--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        Trial::test("file_that_is_not_a_kernel", move || {
            expect_usage_error(&["run", "--kernel", &notkernel], "not a kernel image")
        }),
        usage(
            "malformed_memory_size",
            &["run", "--kernel", "x", "--memory", "12Q"],
            "not a size",
        ),
        usage(
            "memory_size_overflow",
            &["run", "--kernel", "x", "--memory", "99999999999T"],
            "too large",
        ),
        usage(
            "non_numeric_cpus",
            &["run", "--kernel", "x", "--cpus", "two"],
            "--cpus",
        ),
        usage("missing_required_kernel_flag", &["run"], "--kernel"),
        usage(
            "io_bps_zero",
            &["run", "--kernel", "x", "--io-bps", "0"],
            "at least 1 byte per second",
        ),
        usage(
            "io_bps_not_a_size",
            &["run", "--kernel", "x", "--io-bps", "fast"],
            "not a size",
        ),
        usage(
            "io_iops_zero",
            &["run", "--kernel", "x", "--io-iops", "0"],
            "--io-iops",
        ),
        usage(
            "disk_bps_zero",
            &["run", "--kernel", "x", "--disk", "path=a,bps=0"],
            "bps=0: must be at least 1",
        ),
        usage(
            "disk_iops_not_a_number",
            &["run", "--kernel", "x", "--disk", "path=a,iops=lots"],
            "iops=lots: not a whole number",
        ),
        usage(
            "disk_burst_without_rate",
            &["run", "--kernel", "x", "--disk", "path=a,bps_burst=1M"],
            "add bps=",
        ),
        usage(
            "net_rate_not_a_size",
            &["run", "--kernel", "x", "--net", "tx_bps=1Q"],
            "tx_bps=1Q",
        ),
        usage(
            "net_pps_zero",
            &["run", "--kernel", "x", "--net", "rx_pps=0"],
            "rx_pps=0",
        ),
        usage(
            "unknown_flag",
            &["run", "--kernel", "x", "--frobnicate"],
            "--frobnicate",
        ),
        Trial::test("help_exits_zero", || {
            let o = output(keel().arg("--help"))?;
            let out = String::from_utf8_lossy(&o.stdout);
            if !o.status.success() || !out.contains("host-check") {
                return Err(format!("--help: {:?} {out}", o.status).into());
            }
            Ok(())
        }),
    ]
}

fn run_kit(cmdline: &str, extra: &[&str]) -> Result<Output, Failed> {
    let k = kit();
    let mut args = vec![
        "run",
        "--kernel",
        &k,
        "--cmdline",
        cmdline,
        "--memory",
        "64M",
    ];
    args.extend_from_slice(extra);
    output(keel().args(&args))
}

fn kvm_trials() -> Vec<Trial> {
    let empty_initrd = tmpfile("empty-initrd", b"");
    vec![
        Trial::test("zero_cpus", || {
            expect_usage_error(&["run", "--kernel", &kit(), "--cpus", "0"], "--cpus")
        }),
        Trial::test("cpus_above_kvm_limit", || {
            expect_usage_error(
                &["run", "--kernel", &kit(), "--cpus", "100000"],
                "--cpus 100000",
            )
        }),
        Trial::test("zero_memory", || {
            expect_usage_error(&["run", "--kernel", &kit(), "--memory", "0"], "--memory 0")
        }),
        Trial::test("memory_above_host", || {
            expect_usage_error(
                &["run", "--kernel", &kit(), "--memory", "64T"],
                "more than this host",
            )
        }),
        Trial::test("missing_initrd", || {
            expect_usage_error(
                &["run", "--kernel", &kit(), "--initrd", "/nonexistent/initrd"],
                "/nonexistent/initrd",
            )
        }),
        Trial::test("empty_initrd", move || {
            expect_usage_error(
                &["run", "--kernel", &kit(), "--initrd", &empty_initrd],
                "initrd",
            )
        }),
        Trial::test("cmdline_too_long", || {
            let long = "x".repeat(5000);
            expect_usage_error(
                &["run", "--kernel", &kit(), "--cmdline", &long],
                "command line",
            )
        }),
        Trial::test("host_check_reports_kvm_kind", || {
            let o = output(keel().arg("host-check"))?;
            let out = String::from_utf8_lossy(&o.stdout);
            if !o.status.success() || !out.contains("kind:") || !out.contains("cgroups:") {
                return Err(format!("host-check: {:?}\n{out}", o.status).into());
            }
            let j = output(keel().args(["host-check", "--json"]))?;
            let js = String::from_utf8_lossy(&j.stdout);
            if !js.contains("\"usable\": true") {
                return Err(format!("host-check --json: {js}").into());
            }
            Ok(())
        }),
        Trial::test("poweroff_exits_zero_with_summary", || {
            let o = run_kit("test=hello", &["--cpus", "2"])?;
            let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
            if o.status.code() != Some(0)
                || !out.contains("KIT-PASS hello")
                || !err.contains("guest powered off (ACPI S5) after")
            {
                return Err(format!("status {:?}\nstdout: {out}\nstderr: {err}", o.status).into());
            }
            Ok(())
        }),
        Trial::test("reboot_exits_zero_with_summary", || {
            let o = run_kit("test=hello exit=i8042", &[])?;
            let err = stderr(&o);
            if o.status.code() != Some(0) || !err.contains("guest rebooted (i8042 reset)") {
                return Err(format!("status {:?} stderr: {err}", o.status).into());
            }
            Ok(())
        }),
        Trial::test("vcpu_failure_exits_nonzero_with_registers", || {
            let o = run_kit("test=hello exit=bad-fetch", &[])?;
            let err = stderr(&o);
            if o.status.code() != Some(1)
                || !err.contains("vCPU 0 failed")
                || !err.contains("rip=")
                || err.contains("panicked")
            {
                return Err(format!("status {:?} stderr: {err}", o.status).into());
            }
            Ok(())
        }),
        Trial::test("sigterm_presses_the_power_button_then_stops_the_vm", || {
            sigterm_test(1)
        }),
        Trial::test(
            "cgroup_limits_apply_to_the_vmm_and_go_away",
            cgroup_limits_test,
        ),
        Trial::test("sigterm_with_no_grace_period_stops_at_once", || {
            sigterm_test(0)
        }),
        Trial::test("seccomp_is_on_in_keel_run", || seccomp_test(true)),
        Trial::test("no_seccomp_turns_it_off_with_a_warning", || {
            seccomp_test(false)
        }),
    ]
}

/// `field:` of /proc/PID[/task/TID]/status.
fn status_field(path: &str, field: &str) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// A running `keel run` is in seccomp filter mode on every thread (the vmm filter on the
/// main thread, vmm + vcpu on vCPU threads), and its guest still runs to completion.
fn seccomp_test(on: bool) -> Result<(), Failed> {
    use std::io::Write;
    let kernel = kit();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.as_str(),
        "--cmdline",
        "test=console",
        "--memory",
        "64M",
        "--cpus",
        "2",
    ];
    if !on {
        args.push("--no-seccomp");
    }
    let mut child = keel()
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    // The VMM is keel's jailed child.
    let pid = support::vmm_pid(child.id());
    let main = status_field(&format!("/proc/{pid}/status"), "Seccomp");
    let main_filters = status_field(&format!("/proc/{pid}/status"), "Seccomp_filters");
    let mut vcpus = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with("vcpu") {
                let status = t.path().join("status");
                vcpus.push(status_field(&status.to_string_lossy(), "Seccomp_filters"));
            }
        }
    }
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"hello\n");
    }
    let start = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            return Err("keel did not end within 20 s of its console input".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    if o.status.code() != Some(0) || !out.contains("KIT: console got 'hello'") {
        return Err(format!("status {:?}\nstdout: {out}\nstderr: {err}", o.status).into());
    }
    if err.contains("panicked") || err.contains("forbidden syscall") {
        return Err(format!("stderr: {err}").into());
    }
    // A vCPU thread: the event loop's filter it inherits, the refusal filter, its own.
    let (want_mode, want_main, want_vcpu) = if on { ("2", "1", "3") } else { ("0", "0", "0") };
    if main.as_deref() != Some(want_mode) || main_filters.as_deref() != Some(want_main) {
        return Err(format!("main thread: Seccomp {main:?}, Seccomp_filters {main_filters:?}; want {want_mode}, {want_main}").into());
    }
    if vcpus.len() != 2 || vcpus.iter().any(|v| v.as_deref() != Some(want_vcpu)) {
        return Err(
            format!("vCPU threads' Seccomp_filters: {vcpus:?}; want 2 × {want_vcpu}").into(),
        );
    }
    if !on && !err.contains("--no-seccomp") {
        return Err(format!("--no-seccomp gave no warning: {err}").into());
    }
    Ok(())
}

/// SIGTERM presses the power button; the kit guest ignores it, so after `timeout` seconds
/// Keel stops it (at once with 0).
fn sigterm_test(timeout: u32) -> Result<(), Failed> {
    // The console kit test waits for input; stdin is a pipe we never write to.
    let timeout_arg = timeout.to_string();
    let mut child = keel()
        .args([
            "run",
            "--kernel",
            &kit(),
            "--cmdline",
            "test=console",
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--shutdown-timeout",
            &timeout_arg,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let o = child.wait_with_output().map_err(|e| e.to_string())?;
            let err = stderr(&o);
            if status.code() != Some(143) || !err.contains("stopped by SIGTERM") {
                return Err(format!("status {status:?} stderr: {err}").into());
            }
            let pressed = err.contains("pressed the guest's power button")
                && err.contains("did not power off within");
            if timeout > 0 && (!pressed || start.elapsed() < Duration::from_secs(timeout.into())) {
                return Err(format!("no power-button grace period: {err}").into());
            }
            if timeout == 0 && pressed {
                return Err(format!("--shutdown-timeout 0 still pressed the button: {err}").into());
            }
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            return Err("keel did not stop within 10 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--cpu-quota` and friends put the VMM in a cgroup of its own with those limits, which is
/// gone after the VM ends.
fn cgroup_limits_test() -> Result<(), Failed> {
    let child = keel()
        .args([
            "run",
            "--kernel",
            &kit(),
            "--cmdline",
            "test=console",
            "--memory",
            "64M",
            "--cpu-quota",
            "0.5",
            "--cpu-weight",
            "50",
            "--memory-limit",
            "auto",
            "--pids-max",
            "64",
            "--shutdown-timeout",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    // The cgroup is named for keel (the supervisor) and holds the VMM, its jailed child.
    let pid = child.id();
    let vmm = support::vmm_pid(pid);
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let checks = (|| -> Result<Vec<String>, String> {
        let mut dirs = Vec::new();
        for line in cgroups.lines() {
            let mut f = line.splitn(3, ':');
            let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
            if !path.contains(&format!("/keel/vm-{pid}")) {
                continue;
            }
            // Find the mount of this hierarchy.
            let mount = mounts
                .lines()
                .filter_map(|m| {
                    let w: Vec<&str> = m.split_whitespace().collect();
                    let ok = match (w.get(2), ctrls) {
                        (Some(&"cgroup2"), "") => true,
                        (Some(&"cgroup"), c) if !c.is_empty() => w
                            .get(3)
                            .is_some_and(|o| c.split(',').all(|x| o.split(',').any(|y| y == x))),
                        _ => false,
                    };
                    ok.then(|| w.get(1).map(|s| s.to_string())).flatten()
                })
                .next()
                .ok_or(format!("no mount for {line}"))?;
            dirs.push(format!("{mount}{path}"));
        }
        let read = |f: &str| {
            dirs.iter()
                .find_map(|d| std::fs::read_to_string(format!("{d}/{f}")).ok())
                .unwrap_or_default()
        };
        let quota = read("cpu.cfs_quota_us") + &read("cpu.max");
        if !(quota.trim() == "50000" || quota.trim() == "50000 100000") {
            return Err(format!(
                "CPU quota in the VM's cgroup is {quota:?}; cgroups: {cgroups}"
            ));
        }
        let shares = read("cpu.shares") + &read("cpu.weight");
        if !(shares.trim() == "512" || shares.trim() == "50") {
            return Err(format!("CPU weight is {shares:?}"));
        }
        let mem = read("memory.limit_in_bytes") + &read("memory.max");
        // auto: guest RAM (64 MiB) plus Keel's stated 32 MiB.
        if mem.trim() != (96u64 << 20).to_string() {
            return Err(format!("memory limit is {mem:?}"));
        }
        Ok(dirs)
    })();
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let dirs = checks.map_err(Failed::from)?;
    if dirs.is_empty() {
        return Err(format!("keel is in no keel cgroup: {cgroups}\n{}", stderr(&o)).into());
    }
    if o.status.code() != Some(143) {
        return Err(format!("status {:?}: {}", o.status, stderr(&o)).into());
    }
    for d in dirs {
        if std::path::Path::new(&d).exists() {
            return Err(format!("{d} left behind after the VM ended").into());
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let mut trials = no_kvm_trials();
    let mut kvm = kvm_trials();
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!(
            "\n*** SKIPPING {} KVM CLI tests: /dev/kvm: {e} ***\n",
            kvm.len()
        );
        kvm = kvm.into_iter().map(|t| t.with_ignored_flag(true)).collect();
    }
    trials.append(&mut kvm);
    libtest_mimic::run(&args, trials).exit();
}
