//! Keel's CPU and memory limits, measured on real VMs run by the `keel` binary:
//!
//! - fair share: two VMs pinned to one host CPU with equal `--cpu-weight`; a 2-vCPU guest that
//!   spins slows a 1-vCPU guest's fixed job by at most 2.2× (its share is half the CPU);
//! - quota: a spinning 2-vCPU guest under `--cpu-quota 0.5` uses at most 110% of its quota over
//!   10 s, and is throttled (it would use more);
//! - memory: a guest that touches all its RAM stays under `--memory-limit` (guest RAM plus
//!   [`STATED_OVERHEAD`]) without ever reaching it; a guest whose RAM is above its limit is
//!   stopped by the kernel's OOM killer and `keel run` says so (exit 137, "out of memory"),
//!   while another VM and the host carry on.
//!
//! The VM's cgroup is found from the outside, as an operator would: the `keel/*` directory
//! below this process's cgroup whose `cgroup.procs` holds `keel` or one of its descendants
//! (the VMM may run as a child of `keel run`). Trials run one at a time: they measure time.
//! The CPU trial's VMs run below a cgroup of the test's own with 100 times a process's CPU
//! share, so other work on a shared host barely moves what is measured.

// Shared with the other guest-booting tests; this one uses only part of it.
#[allow(dead_code)]
mod support;

#[path = "limits/vm.rs"]
mod vm;

use libtest_mimic::{Arguments, Trial};
use std::time::{Duration, Instant};
use support::{skip_all, Host};
use vm::{
    check_pinned, cpu_usage_ns, fail, meminfo, read, stat_field, watch, MemFiles, TestCgroup, Vm, R,
};

/// What Keel itself needs on top of guest RAM, the figure `keel run --help` states for
/// `--memory-limit`. Measured (this test prints it): ~2 MiB for a kit guest (heap, thread
/// stacks, KVM's kernel memory); a Linux guest with devices peaks at 26 MiB of RSS in all
/// (docs/benchmarks.md), guest pages included.
const STATED_OVERHEAD: u64 = 32 << 20;
/// Iterations of the kit's `cpu-job`: 2-4 s alone on the PVM test bed (kernel-mode code is
/// emulated there).
const JOB_ITERS: u64 = 500_000;
const MIB: u64 = 1 << 20;

/// The checksum the kit's `cpu-job` prints for `iters` (the same hash, computed here).
fn job_checksum(iters: u64) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..iters {
        h ^= i;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
    }
    h
}

/// Seconds between the cpu-job's start and done lines; checks the checksum and the exit.
fn run_job(vm: Vm) -> R<f64> {
    let mut vm = vm;
    let (start, _) = vm.wait_line("KIT: job start", Duration::from_secs(20))?;
    let (done, line) = vm.wait_line("KIT: job done", Duration::from_secs(120))?;
    let want = format!("checksum={:#x}", job_checksum(JOB_ITERS));
    if !line.contains(&want) {
        return fail(format!("job line {line:?} lacks {want}"));
    }
    let e = vm.wait(Duration::from_secs(10))?;
    if e.status.code() != Some(0) || !keel_guest_kit::passed(&e.stdout, "cpu-job") {
        return fail(format!("cpu-job: {:?}\n{}{}", e.status, e.stdout, e.stderr));
    }
    Ok(done.duration_since(start).as_secs_f64())
}

fn job_vm(parent: Option<&TestCgroup>) -> R<Vm> {
    let cmdline = format!("test=cpu-job iters={JOB_ITERS}");
    let args = ["--memory", "64M", "--cpu-weight", "100"];
    Vm::start_in("victim", &cmdline, &args, true, parent)
}

/// Fair share on one host CPU, then the quota, in one trial (both measure time).
fn cpu_test() -> R<()> {
    // 100 times a process's default share: other work on this host gets ~1% of CPU 0.
    let parent = TestCgroup::cpu(102_400)?;
    let parent = parent.as_ref();
    let alone = run_job(job_vm(parent)?)?;
    let mut hog = Vm::start_in(
        "hog",
        "test=spin secs=60 cpus=2",
        &["--cpus", "2", "--memory", "64M", "--cpu-weight", "100"],
        true,
        parent,
    )?;
    hog.wait_line("KIT: spinning on 2 vCPUs", Duration::from_secs(20))?;
    let hog_cg = hog.cgroup("cpu")?;
    check_pinned(&hog_cg)?;
    let mut victim = job_vm(parent)?;
    let victim_cg = victim.cgroup("cpu")?;
    check_pinned(&victim_cg)?;
    let shared = run_job(victim)?;
    let ratio = shared / alone;
    // The hog on its own (no quota, no competitor): what it takes when nothing stops it.
    let u0 = cpu_usage_ns(&hog_cg)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let hog_free = (cpu_usage_ns(&hog_cg)? - u0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    hog.stop()?;
    eprintln!(
        "fair share: job alone {alone:.2} s, beside a 2-vCPU spinning VM at equal weight \
         {shared:.2} s: ratio {ratio:.2} (limit 2.2); the hog alone on CPU 0 used \
         {hog_free:.2} CPUs"
    );
    if ratio > 2.2 {
        return fail(format!(
            "the victim's job took {ratio:.2}x its time alone (> 2.2): equal weights did \
             not give it half the CPU"
        ));
    }
    if ratio < 1.5 {
        return fail(format!(
            "the victim's job took only {ratio:.2}x its time alone: the two VMs did not \
             compete for one CPU, so this measured nothing"
        ));
    }
    quota_test(hog_free, parent)
}

/// A 2-vCPU spinning VM (not pinned: it could use both host CPUs) under `--cpu-quota 0.5`.
fn quota_test(hog_free: f64, parent: Option<&TestCgroup>) -> R<()> {
    const QUOTA: f64 = 0.5;
    const WINDOW: f64 = 10.0;
    let mut hog = Vm::start_in(
        "quota-hog",
        "test=spin secs=30 cpus=2",
        &["--cpus", "2", "--memory", "64M", "--cpu-quota", "0.5"],
        false,
        parent,
    )?;
    hog.wait_line("KIT: spinning on 2 vCPUs", Duration::from_secs(20))?;
    let cg = hog.cgroup("cpu")?;
    let throttled_before = read(&cg, "cpu.stat")
        .and_then(|s| stat_field(&s, "nr_throttled"))
        .unwrap_or(0);
    let mut samples = vec![(Instant::now(), cpu_usage_ns(&cg)?)];
    while samples[0].0.elapsed().as_secs_f64() < WINDOW {
        std::thread::sleep(Duration::from_millis(100));
        samples.push((Instant::now(), cpu_usage_ns(&cg)?));
    }
    let throttled = read(&cg, "cpu.stat")
        .and_then(|s| stat_field(&s, "nr_throttled"))
        .unwrap_or(0)
        - throttled_before;
    let e = hog.stop()?;
    let (first, last) = (samples[0], samples[samples.len() - 1]);
    let secs = last.0.duration_since(first.0).as_secs_f64();
    let used = (last.1 - first.1) as f64 / 1e9;
    // 1 s sub-windows, for the record: how even the throttling is.
    let mut worst: f64 = 0.0;
    for (i, a) in samples.iter().enumerate() {
        if let Some(b) = samples[i..]
            .iter()
            .find(|b| b.0.duration_since(a.0) >= Duration::from_secs(1))
        {
            let rate = (b.1 - a.1) as f64 / 1e9 / b.0.duration_since(a.0).as_secs_f64();
            worst = worst.max(rate);
        }
    }
    eprintln!(
        "quota: {used:.2} s of CPU in {secs:.2} s = {:.3} CPUs under --cpu-quota {QUOTA} \
         (allowed {:.2} s); busiest 1 s: {worst:.3} CPUs; throttled in {throttled} periods; \
         without a quota it used {hog_free:.2} CPUs",
        used / secs,
        1.1 * QUOTA * secs
    );
    if used > 1.1 * QUOTA * secs {
        return fail(format!(
            "the hog used {used:.2} s of CPU in {secs:.2} s: over 110% of its {QUOTA} CPU quota"
        ));
    }
    if throttled == 0 {
        return fail(format!(
            "the hog was never throttled (used {used:.2} s in {secs:.2} s): the quota did \
             not bind, so this measured nothing\n{}",
            e.stderr
        ));
    }
    if hog_free <= 1.1 * QUOTA {
        return fail(format!(
            "without a quota the hog used only {hog_free:.2} CPUs: the quota check could \
             not have failed"
        ));
    }
    Ok(())
}

/// The guest touches every page of its 256 MiB; the VMM stays under RAM + the stated
/// overhead without ever reaching the limit.
fn touch_under_limit() -> R<()> {
    let guest = 256 * MIB;
    // `auto` is guest RAM plus the stated overhead.
    let limit = guest + STATED_OVERHEAD;
    let mut vm = Vm::start(
        "touch",
        "test=touch-ram hold=1",
        &["--memory", "256M", "--memory-limit", "auto"],
        false,
    )?;
    let mem = MemFiles {
        dir: vm.cgroup("memory")?,
    };
    if mem.limit() != Some(limit) {
        return fail(format!(
            "cgroup memory limit {:?}, want {limit}",
            mem.limit()
        ));
    }
    let swap = mem.swap_limit();
    if swap
        .as_deref()
        .is_some_and(|s| s != limit.to_string() && s != "0")
    {
        return fail(format!("swap is not capped: swap limit {swap:?}"));
    }
    let seen = watch(&mut vm, || Some((mem.peak()?, mem.limit_hits()?)));
    let e = vm.wait(Duration::from_secs(30))?;
    if e.status.code() != Some(0) || !keel_guest_kit::passed(&e.stdout, "touch-ram") {
        return fail(format!(
            "touch-ram: {:?}\n{}{}",
            e.status, e.stdout, e.stderr
        ));
    }
    let touched = e
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("KIT: touched ")?.strip_suffix(" pages"))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or("no 'KIT: touched N pages' line")?
        * 4096;
    let (peak, hits) = seen.ok_or("never read the VM's memory usage")?;
    eprintln!(
        "memory: {} MiB guest, touched {} MiB; cgroup peak {:.2} MiB (limit {} MiB): Keel's own \
         {:.2} MiB above the touched pages; limit reached {hits} times; swap: host {} MiB, \
         cgroup swap limit {}",
        guest / MIB,
        touched / MIB,
        peak as f64 / MIB as f64,
        limit / MIB,
        (peak as f64 - touched as f64) / MIB as f64,
        meminfo("SwapTotal") / MIB,
        swap.as_deref().unwrap_or("(no swap accounting)"),
    );
    if peak > limit || hits > 0 {
        return fail(format!(
            "peak {peak} bytes, limit reached {hits} times: guest RAM + {} MiB is not enough",
            STATED_OVERHEAD / MIB
        ));
    }
    if peak < touched {
        return fail(format!(
            "peak {peak} bytes is below the {touched} bytes the guest touched: guest memory \
             is not charged to the VM's cgroup"
        ));
    }
    Ok(())
}

/// A 256 MiB guest under a 160 MiB limit touches its RAM: the kernel stops that VM and Keel
/// says why; a second VM running meanwhile finishes normally and the host recovers.
fn oom_test() -> R<()> {
    let before = meminfo("MemAvailable");
    let mut other = Vm::start(
        "bystander",
        "test=touch-ram hold=6",
        &["--memory", "128M", "--memory-limit", "160M"],
        false,
    )?;
    other.wait_line("KIT: touched", Duration::from_secs(20))?;
    let mut vm = Vm::start(
        "oom",
        "test=touch-ram",
        &["--memory", "256M", "--memory-limit", "160M"],
        false,
    )?;
    let dir = vm.cgroup("memory")?;
    let mem = MemFiles { dir: dir.clone() };
    let peak = watch(&mut vm, || mem.peak());
    let e = vm.wait(Duration::from_secs(30))?;
    if let Some(p) = peak {
        if p > 160 * MIB {
            return fail(format!(
                "the VM's cgroup peaked at {p} bytes, over its limit"
            ));
        }
    }
    let o = other.wait(Duration::from_secs(30))?;
    // A VMM killed outright cannot remove its cgroup: do it here so the host stays clean, and
    // say so (a supervising `keel run` should have).
    let left = dir.exists();
    let oom_kills = read(&dir, "memory.oom_control")
        .or_else(|| read(&dir, "memory.events"))
        .and_then(|s| stat_field(&s, "oom_kill"));
    if left {
        let _ = std::fs::remove_dir(&dir);
    }
    let after = meminfo("MemAvailable");
    eprintln!(
        "oom: keel run {:?}, stderr: {}; bystander {:?}; MemAvailable {} MiB before, {} MiB \
         after; kernel OOM kills in the VM's cgroup: {}{}",
        e.status,
        e.stderr.trim(),
        o.status,
        before / MIB,
        after / MIB,
        oom_kills.map_or("(cgroup gone)".to_string(), |n| n.to_string()),
        if left {
            "; the VM's cgroup was left behind"
        } else {
            ""
        }
    );
    if o.status.code() != Some(0)
        || !keel_guest_kit::passed(&o.stdout, "touch-ram")
        || !o.stdout.contains("bad=0")
    {
        return fail(format!(
            "the other VM was disturbed: {:?}\n{}{}",
            o.status, o.stdout, o.stderr
        ));
    }
    if after + 256 * MIB < before {
        return fail(format!(
            "MemAvailable did not recover: {} MiB before, {} MiB after",
            before / MIB,
            after / MIB
        ));
    }
    if keel_guest_kit::passed(&e.stdout, "touch-ram") {
        return fail(format!(
            "the guest touched 256 MiB under a 160 MiB limit and passed\n{}",
            e.stdout
        ));
    }
    if e.status.code() != Some(137) || !e.stderr.contains("out of memory") {
        return fail(format!(
            "expected `keel run` to exit with status 137 and say \"out of memory\" on stderr; \
             got {:?} and stderr:\n{}",
            e.status, e.stderr
        ));
    }
    Ok(())
}

/// Why the cgroup trials cannot run here, if they cannot.
fn no_cgroups(controller: &'static str) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating cgroups needs root".into());
    }
    let layout = keel_cgroup::Layout::detect().map_err(|e| e.to_string());
    layout
        .and_then(|l| l.hierarchy_for(controller).map_err(|e| e.to_string()))
        .err()
}

fn main() {
    let mut args = Arguments::from_args();
    // The trials measure time and CPU: never two at once.
    args.test_threads = Some(1);
    let host = Host::probe();
    let cpu = vec![Trial::test(
        "equal_weights_share_one_cpu_and_a_quota_caps_a_spinning_vm",
        cpu_test,
    )];
    let mem = vec![
        Trial::test(
            "a_guest_touching_all_its_ram_stays_under_ram_plus_overhead",
            touch_under_limit,
        ),
        Trial::test(
            "a_vm_over_its_memory_limit_is_stopped_and_reported_others_unaffected",
            oom_test,
        ),
    ];
    let why = |c| host.no_kvm.clone().or_else(|| no_cgroups(c));
    let mut trials = skip_all(cpu, "CPU limit tests", why("cpu").as_deref());
    trials.extend(skip_all(
        mem,
        "memory limit tests",
        why("memory").as_deref(),
    ));
    libtest_mimic::run(&args, trials).exit();
}
