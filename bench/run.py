#!/usr/bin/env python3
"""Keel benchmark harness: Keel side by side with QEMU (and Firecracker / Cloud Hypervisor).

    python3 bench/run.py [--runs N] [--only a|b|io|snap|mig] [--skip a,b,io,snap,mig] [--out docs/benchmarks.md]

Measurements (see bench/README.md and docs/benchmarks.md):
  (a) launch -> first guest I/O exit: a tiny PVH guest (bench/guests/first_io.S) whose first
      instructions are port writes that end each VMM; time from spawn to process exit.
  (b) launch -> user-space marker: the Keel test kernel with its tiny initramfs; time until
      `KEEL-INIT-OK` arrives on the serial console (VMM stdout, read as a pipe), and to exit.
  (io) block and network throughput in the guest (virtio-blk /dev/vdb with O_DIRECT; TCP over
      a tap) against the same program on the host: bench/iobench.py, needs root.
  (snap) snapshot time and restore -> running latency of an idle 256 MiB and 2 GiB guest:
      bench/snapbench.py.
  (mig) live migration of a 1 GiB guest (idle, and dirtying 64 MiB/s) between two network
      namespaces over a veth: total time, downtime, the guest's own gap: bench/migbench.py.

Runs alternate between VMM variants (keel, qemu-pc, qemu-microvm, keel, ...) so that noise
hits all of them alike. Peak RSS is ru_maxrss from os.wait4() on the VMM process itself
(it is spawned directly, never through a shell). Python standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ in the checkout
import iobench  # noqa: E402  bench/iobench.py (sys.path[0] is bench/ when run as a script)
import migbench  # noqa: E402  bench/migbench.py
import snapbench  # noqa: E402  bench/snapbench.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
CACHE = os.path.join(
    os.environ.get("KEEL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "keel")),
    "bench",
)

MARKER = b"KEEL-INIT-OK"
RUN_INIT = b"Run /init"
LINUX_VERSION = b"Linux version"
POWER_DOWN = b"reboot: Power down"
# What Linux prints instead when the platform offers no way to power off (Firecracker).
SYSTEM_HALTED = b"reboot: System halted"
MEMORY_MIB = 256
# Kernel parameters every VMM gets in (b); the PVM ones come from `guest/build.sh cmdline`.
BASE_CMDLINE = "console=ttyS0 panic=-1 keel_exit=poweroff"
PVM_QUIRKS = ("noxsave nofsgsbase nopcid noinvpcid "
              "clearcpuid=cx16,smap,popcnt,rdtscp,serialize,rdpid,114 vdso32=0")
QEMU_COMMON = ["-enable-kvm", "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot"]
# A VMM that printed "reboot: Power down" (or "reboot: System halted") but does not exit within
# this many seconds is killed (Firecracker has no power-off device: for it the line itself
# counts as the exit).
POWER_DOWN_GRACE = 10.0


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(f"ERROR: {msg}")
    sys.exit(1)


# --------------------------------------------------------------------------- host & tools --

def host_kvm_kind():
    """A short name for what /dev/kvm is on this host."""
    mods = set(os.listdir("/sys/module")) if os.path.isdir("/sys/module") else set()
    if "kvm_pvm" in mods:
        native = ""
        try:
            with open("/sys/module/kvm_pvm/parameters/pvm_native") as f:
                native = ", native mode" if f.read().strip() == "Y" else ""
        except OSError:
            pass
        return f"PVM (kvm_pvm{native}: software KVM, no VT-x)"
    if "kvm_intel" in mods:
        return "KVM (Intel VT-x)"
    if "kvm_amd" in mods:
        return "KVM (AMD-V)"
    if os.path.exists("/dev/kvm"):
        return "KVM (unknown kind)"
    return "no /dev/kvm"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def first_line(argv):
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "crates"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes in crates/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ensure_qemu():
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        return qemu
    if os.geteuid() != 0:
        die("qemu-system-x86_64 is missing; install qemu-system-x86 (needs root)")
    log("qemu-system-x86_64 missing: apt-get install qemu-system-x86")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    inst = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"]
    if subprocess.run(inst, env=env, stdin=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL)
        if subprocess.run(inst, env=env, stdin=subprocess.DEVNULL).returncode != 0:
            die("apt-get install qemu-system-x86 failed")
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        die("qemu-system-x86_64 still missing after installing qemu-system-x86")
    return qemu


def build_keel(skip):
    keel = os.environ.get("KEEL_BIN") or os.path.join(REPO, "target", "release", "keel")
    if not skip and not os.environ.get("KEEL_BIN"):
        log("cargo build --release -p keel")
        r = subprocess.run(["cargo", "build", "--release", "-p", "keel"], cwd=REPO,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            die("cargo build --release -p keel failed (use --no-build to bench an existing binary)")
    if not os.access(keel, os.X_OK):
        die(f"no Keel binary at {keel}")
    return keel


def build_first_io_guest():
    """Assemble bench/guests/first_io.S (and its S5-first variant for Cloud Hypervisor)."""
    src = os.path.join(BENCH, "guests", "first_io.S")
    lds = os.path.join(BENCH, "guests", "first_io.ld")
    os.makedirs(CACHE, exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for name, defs in (("first_io", []), ("first_io_s5first", ["-DS5_FIRST"])):
            obj = os.path.join(tmp, name + ".o")
            elf = os.path.join(CACHE, name + ".elf")
            for argv in (["gcc", "-c", *defs, "-o", obj, src],
                         ["ld", "-nostdlib", "-static", "-z", "noexecstack", "--build-id=none",
                          "-T", lds, "-o", elf + ".tmp", obj]):
                r = subprocess.run(argv, capture_output=True, text=True)
                if r.returncode != 0:
                    die(f"{' '.join(argv)} failed:\n{r.stderr}")
            os.replace(elf + ".tmp", elf)
            out[name] = elf
    return out


def guest_assets(wait_s):
    """KEEL_VMLINUX, KEEL_BZIMAGE, KEEL_INITRD_TINY from guest/build.sh paths (waits up to
    wait_s for them to appear: another process may be building the kernel)."""
    script = os.path.join(REPO, "guest", "build.sh")
    r = subprocess.run(["bash", script, "paths"], capture_output=True, text=True)
    if r.returncode != 0:
        die(f"guest/build.sh paths failed:\n{r.stderr}")
    paths = dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)
    need = ["KEEL_VMLINUX", "KEEL_BZIMAGE", "KEEL_INITRD_TINY"]
    deadline = time.monotonic() + wait_s
    while True:
        missing = [paths.get(k, k) for k in need if not os.path.isfile(paths.get(k, ""))]
        if not missing:
            break
        if time.monotonic() >= deadline:
            die("guest assets missing: " + ", ".join(missing) +
                " (build them with `guest/build.sh kernel initramfs`, or pass --wait-assets SEC)")
        log(f"waiting for guest assets: {', '.join(missing)}")
        time.sleep(min(30, max(1, deadline - time.monotonic())))
    r = subprocess.run(["bash", script, "cmdline"], capture_output=True, text=True)
    quirks = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else PVM_QUIRKS
    return paths, quirks


# ----------------------------------------------------------------------------- one run --

def run_once(argv, timeout, marker=None, power_down_is_exit=False, log_path=None):
    """Spawn argv (no shell), read stdout/stderr as pipes, and wait for it with os.wait4.

    Returns a dict: t_exit (s since spawn, or None on timeout), t_first_out (first byte on
    stdout), t_linux ("Linux version"), t_marker, t_run_init, t_power_down, rc, maxrss_mib (ru_maxrss of the VMM
    process), timed_out, killed. The log file gets stdout with each line's arrival time.
    """
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, close_fds=True)
    pidfd = os.pidfd_open(p.pid)
    fds = {p.stdout.fileno(): bytearray(), p.stderr.fileno(): bytearray()}
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    for fd in fds:
        os.set_blocking(fd, False)
    poller = select.poll()
    for fd in (*fds, pidfd):
        poller.register(fd, select.POLLIN)
    res = {"t_exit": None, "t_first_out": None, "t_linux": None, "t_marker": None,
           "t_run_init": None,
           "t_power_down": None,
           "timed_out": False, "killed": None}
    watch = {"t_marker": marker, "t_linux": LINUX_VERSION, "t_run_init": RUN_INIT,
             "t_power_down": POWER_DOWN}
    deadline = t0 + timeout
    exited = False
    open_fds = set(fds)
    chunks = []  # (arrival time, stdout bytes)

    def kill(why):
        if res["killed"] is None:
            res["killed"] = why
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def drain(fd, now):
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                open_fds.discard(fd)
                poller.unregister(fd)
                return
            buf = fds[fd]
            start = max(0, len(buf) - 64)
            buf += data
            if fd == out_fd:
                chunks.append((now - t0, data))
                if res["t_first_out"] is None:
                    res["t_first_out"] = now - t0
                for key, pat in watch.items():
                    if pat and res[key] is None and buf.find(pat, start) >= 0:
                        res[key] = now - t0
                if res["t_power_down"] is None and buf.find(SYSTEM_HALTED, start) >= 0:
                    res["t_power_down"] = now - t0

    while not exited:
        now = time.monotonic()
        if now >= deadline:
            res["timed_out"] = True
            kill(f"timeout after {timeout:.0f} s")
            deadline = float("inf")
        if res["t_power_down"] is not None and res["killed"] is None:
            if power_down_is_exit:
                res["t_exit"] = res["t_power_down"]
                kill("'reboot: Power down' on the console (no power-off device)")
            elif now - t0 - res["t_power_down"] > POWER_DOWN_GRACE:
                kill(f"still running {POWER_DOWN_GRACE:.0f} s after 'reboot: Power down'")
        wait = deadline - now
        if res["t_power_down"] is not None and res["killed"] is None:
            wait = min(wait, 0.5)
        events = poller.poll(None if wait == float("inf") else max(0, int(wait * 1000) + 1))
        now = time.monotonic()
        for fd, _ in events:
            if fd == pidfd:
                exited = True
                if res["t_exit"] is None and not res["timed_out"] and res["killed"] is None:
                    res["t_exit"] = now - t0
            elif fd in open_fds:
                drain(fd, now)
    # The process is gone: collect the rest of its output (no timing), then reap it.
    for fd in list(open_fds):
        os.set_blocking(fd, True)
        while fd in open_fds:
            drain(fd, time.monotonic())
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    os.close(pidfd)
    p.stdout.close()
    p.stderr.close()
    res["rc"] = p.returncode
    res["maxrss_mib"] = ru.ru_maxrss / 1024.0  # Linux: KiB
    res["cpu_s"] = ru.ru_utime + ru.ru_stime  # all threads; on PVM guest time is system time
    res["stdout"] = bytes(fds[out_fd])
    res["stderr"] = bytes(fds[err_fd])
    if log_path:
        with open(log_path, "wb") as f:
            meta = {k: v for k, v in res.items() if k not in ("stdout", "stderr")}
            f.write(b"# argv: " + shlex.join(argv).encode() + b"\n")
            f.write(b"# result: " + json.dumps(meta).encode() + b"\n")
            f.write(b"# ---- stdout (serial console) ----\n" + res["stdout"])
            f.write(b"\n# ---- stderr ----\n" + res["stderr"])
            f.write(b"\n# ---- stdout lines with host arrival time (s since spawn) ----\n")
            f.write(timed_lines(chunks))
    return res


def timed_lines(chunks):
    """stdout as lines, each prefixed with the arrival time of its last byte."""
    out, line = [], b""
    for t, data in chunks:
        parts = data.split(b"\n")
        for part in parts[:-1]:
            out.append(b"[+%8.3f] " % t + (line + part).rstrip(b"\r") + b"\n")
            line = b""
        line += parts[-1]
    if line:
        out.append(b"[+%8.3f] " % chunks[-1][0] + line + b"\n")
    return b"".join(out)


# ---------------------------------------------------------------------------- variants --

class Variant:
    def __init__(self, vid, label, argv, ok_rc=(0,), power_down_is_exit=False, setup=None,
                 note=None):
        self.vid, self.label, self.argv = vid, label, argv
        self.ok_rc = ok_rc
        self.power_down_is_exit = power_down_is_exit
        self.setup = setup  # callable run before the first run (e.g. write a config file)
        self.note = note
        self.results = []


def firecracker_config(path, kernel, initrd, cmdline, cpus):
    boot = {"kernel_image_path": kernel, "boot_args": cmdline}
    if initrd:
        boot["initrd_path"] = initrd
    cfg = {"boot-source": boot, "drives": [],
           "machine-config": {"vcpu_count": cpus, "mem_size_mib": MEMORY_MIB}}

    def write():
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    return write


def peers(tmpdir, kernel, initrd, cmdline, cpus, tag, ch_kernel=None):
    """Firecracker and Cloud Hypervisor variants, when their binaries are given."""
    out, skipped = [], []
    fc = os.environ.get("FIRECRACKER_BIN")
    if fc and os.access(fc, os.X_OK):
        cfg = os.path.join(tmpdir, f"firecracker-{tag}.json")
        out.append(Variant(
            "firecracker", "Firecracker (ELF)",
            [fc, "--no-api", "--config-file", cfg],
            setup=firecracker_config(cfg, kernel, initrd, cmdline, cpus),
            power_down_is_exit=True))
    else:
        skipped.append("Firecracker (FIRECRACKER_BIN " +
                       ("is not executable" if fc else "not set") + ")")
    ch = os.environ.get("CLOUD_HYPERVISOR_BIN")
    if ch and os.access(ch, os.X_OK):
        argv = [ch, "--kernel", ch_kernel or kernel]
        if initrd:
            argv += ["--initramfs", initrd]
        if cmdline:
            argv += ["--cmdline", cmdline]
        argv += ["--cpus", f"boot={cpus}", "--memory", f"size={MEMORY_MIB}M",
                 "--serial", "tty", "--console", "off"]
        out.append(Variant("cloud-hypervisor", "Cloud Hypervisor (ELF)", argv))
    else:
        skipped.append("Cloud Hypervisor (CLOUD_HYPERVISOR_BIN " +
                       ("is not executable" if ch else "not set") + ")")
    return out, skipped


def variants_a(keel, qemu, guests, cpus, tmpdir):
    g = guests["first_io"]
    mem = f"{MEMORY_MIB}M"
    qemu_tail = ["-m", mem, "-smp", str(cpus), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                 "-kernel", g]
    vs = [
        Variant("keel", "Keel (PVH)",
                [keel, "run", "--kernel", g, "--cpus", str(cpus), "--memory", mem,
                 "--no-host-quirks"]),
        # The same with the jail off: the difference is what the jail costs at launch.
        Variant("keel-nojail", "Keel (PVH) --no-jail",
                [keel, "run", "--kernel", g, "--cpus", str(cpus), "--memory", mem,
                 "--no-host-quirks", "--no-jail"]),
        Variant("qemu-pc", "QEMU -M pc (PVH)", [qemu, "-M", "pc", *QEMU_COMMON, *qemu_tail],
                ok_rc=(3,)),
        Variant("qemu-microvm", "QEMU -M microvm (PVH)",
                [qemu, "-M", "microvm", *QEMU_COMMON, *qemu_tail], ok_rc=(3,)),
    ]
    more, skipped = peers(tmpdir, g, None, None, cpus, "a", ch_kernel=guests["first_io_s5first"])
    return vs + more, skipped


def variants_b(keel, qemu, assets, cmdline, cpus, tmpdir):
    vml, bz, initrd = assets["KEEL_VMLINUX"], assets["KEEL_BZIMAGE"], assets["KEEL_INITRD_TINY"]
    mem = f"{MEMORY_MIB}M"

    def k(kernel):
        return [keel, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
                "--cpus", str(cpus), "--memory", mem, "--no-host-quirks"]

    def q(machine, kernel):
        return [qemu, "-M", machine, *QEMU_COMMON, "-m", mem, "-smp", str(cpus),
                "-kernel", kernel, "-initrd", initrd, "-append", cmdline]

    vs = [
        Variant("keel-pvh", "Keel (PVH)", k(vml)),
        Variant("keel-bzimage", "Keel (bzImage)", k(bz)),
        Variant("qemu-microvm", "QEMU -M microvm (PVH)", q("microvm", vml)),
        Variant("qemu-pc-pvh", "QEMU -M pc (PVH)", q("pc", vml)),
        Variant("qemu-pc-bzimage", "QEMU -M pc (bzImage)", q("pc", bz)),
    ]
    more, skipped = peers(tmpdir, vml, initrd, cmdline, cpus, "b")
    for v in more:
        if v.vid == "firecracker":
            v.note = ("Firecracker has no power-off device: its exit time is when "
                      "'reboot: Power down' reaches the console; it is then killed")
    return vs + more, skipped


# ----------------------------------------------------------------------------- running --

def run_measurement(name, variants, runs, timeout, marker, log_dir, warmup):
    for v in variants:
        if v.setup:
            v.setup()
    if warmup:
        for v in variants:
            log(f"({name}) warm-up: {v.label}")
            run_once(v.argv, timeout, marker, v.power_down_is_exit)
    for i in range(runs):
        for v in variants:  # alternate: every variant once per round
            lp = os.path.join(log_dir, f"{name}-{v.vid}-{i + 1}.log")
            r = run_once(v.argv, timeout, marker, v.power_down_is_exit, lp)
            # completed: ended by itself (or by the power-down line, for Firecracker) with the
            # expected status; ok: completed and, in (b), the marker arrived.
            r["completed"] = (not r["timed_out"] and r["t_exit"] is not None
                              and (v.power_down_is_exit or r["rc"] in v.ok_rc))
            r["ok"] = r["completed"] and (marker is None or r["t_marker"] is not None)
            v.results.append(r)
            if marker:
                desc = (f"marker {fmt(r['t_marker'], 2)} s, exit {fmt(r['t_exit'], 2)} s")
            else:
                desc = f"exit {fmt(r['t_exit'], 4)} s"
            status = ("ok" if r["ok"] else "TIMEOUT" if r["timed_out"]
                      else "NO MARKER" if r["completed"] else f"FAILED rc={r['rc']}")
            log(f"({name}) run {i + 1}/{runs} {v.label}: {desc}, rc {r['rc']}, "
                f"peak RSS {r['maxrss_mib']:.1f} MiB — {status}")


def jail_cost(variants):
    """What the jail (fork, namespaces, pivot_root, privilege drop) adds to Keel's launch:
    the difference of the medians of `keel` and `keel-nojail`, when both ran."""
    by = {v.vid: stats([r["t_exit"] for r in v.results if r["ok"]])[0] for v in variants}
    on, off = by.get("keel"), by.get("keel-nojail")
    if on is None or off is None:
        return ""
    return (f"Jail cost (median with the jail − median with `--no-jail`): "
            f"{(on - off) * 1000:+.1f} ms.\n\n")


def fmt(x, nd):
    return "—" if x is None else f"{x:.{nd}f}"


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def table(variants, key, nd, extra_cols=()):
    """Markdown table: variant | median | min | max | ratio to the first variant | extras |
    peak RSS | ok runs."""
    base = stats([r[key] for r in variants[0].results if r["ok"]])[0] if variants else None
    head = ["VMM variant", "median s", "min", "max", f"ratio to {variants[0].label}"]
    head += [c[0] for c in extra_cols] + ["peak RSS MiB", "ok runs"]
    # Median/min/max/ratio: successful runs only. Extra columns and RSS: every run that
    # completed (so a run whose marker never arrived still shows when it booted and exited).
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        ok = [r for r in v.results if r["ok"]]
        med, lo, hi = stats([r[key] for r in ok])
        ratio = "—" if med is None or not base else f"{med / base:.2f}×"
        done = [r for r in v.results if r["completed"]]
        rss = stats([r["maxrss_mib"] for r in done or v.results])[0]
        row = [v.label, fmt(med, nd), fmt(lo, nd), fmt(hi, nd), ratio]
        for col in extra_cols:
            k, knd = col[1], col[2]
            x = stats([r[k] for r in done])[0]
            if len(col) > 3:  # a ratio column: this key's median over the first variant's
                b = stats([r[k] for r in variants[0].results if r["completed"]])[0]
                row.append("—" if x is None or not b else f"{x / b:.2f}×")
            else:
                row.append(fmt(x, knd))
        nto = sum(r["timed_out"] for r in v.results)
        okc = f"{len(ok)}/{len(v.results)}" + (f" ({nto} timeout)" if nto else "")
        row += [fmt(rss, 1), okc]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def failure_notes(variants):
    notes = []
    for v in variants:
        bad = [r for r in v.results if not r["ok"]]
        if not bad:
            continue
        parts = []
        nto = sum(r["timed_out"] for r in bad)
        nomark = sum(r["completed"] for r in bad)
        other = [r for r in bad if not r["timed_out"] and not r["completed"]]
        if nto:
            parts.append(f"{nto} timed out (killed after the timeout)")
        if nomark:
            parts.append(f"{nomark} ran to the end (exit status 0) but `{MARKER.decode()}` never "
                         "reached the console")
        if other:
            parts.append(f"{len(other)} failed (exit status "
                         f"{', '.join(str(r['rc']) for r in other)})")
        notes.append(f"- **{v.label}**: {len(bad)} of {len(v.results)} runs not ok: "
                     + "; ".join(parts) + ".")
    return ("\n" + "\n".join(notes)) if notes else ""


def argv_doc(v, subst):
    s = shlex.join(v.argv)
    for path, name in subst:
        s = s.replace(path, name)
    return f"- {v.label}: `{s}`" + (f" — {v.note}" if v.note else "")


PARTS = ["a", "b", "io", "snap", "mig"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int,
                    help="timed runs per variant (default 3; snap: boots per VMM and size, "
                    "default 2)")
    ap.add_argument("--runs-a", type=int,
                    help="timed runs per variant for (a), which is cheap (default: max(10, --runs))")
    ap.add_argument("--only", choices=PARTS, help="run only measurement a, b, io, snap or mig")
    ap.add_argument("--skip", default="",
                    help="comma-separated measurements not to run, e.g. --skip io")
    ap.add_argument("--out", help="append the results as a dated section to this markdown file")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs for every VMM (default 1)")
    ap.add_argument("--timeout", type=float, default=180, help="kill a VMM after this many s")
    ap.add_argument("--variants", help="comma-separated variant ids to run (diagnostics), e.g. "
                    "keel-pvh,qemu-microvm (b) or keel,qemu-pc (a)")
    ap.add_argument("--cmdline-extra", default="",
                    help="append to the (b) and io kernel command lines (diagnostics, e.g. "
                    "printk.time=1)")
    ap.add_argument("--wait-assets", type=float, default=0,
                    help="wait up to SEC for the guest kernel/initrd to appear")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run cargo build; bench the existing target/release/keel "
                    "(or $KEEL_BIN)")
    iobench.add_arguments(ap)
    snapbench.add_arguments(ap)
    migbench.add_arguments(ap)
    args = ap.parse_args()
    args.runs_given = args.runs is not None  # snap has its own default (2 boots)
    if args.runs is None:
        args.runs = 3
    skip = {p for p in args.skip.split(",") if p}
    if skip - set(PARTS):
        die(f"--skip: unknown measurement(s) {', '.join(sorted(skip - set(PARTS)))}")
    parts = [p for p in PARTS if (args.only in (None, p)) and p not in skip]
    if not parts:
        die("nothing to run (--only/--skip leave no measurement)")
    io_unavailable = iobench.check_root() if "io" in parts else None
    if io_unavailable:
        if args.only == "io":
            die(f"io: {io_unavailable}")
        log(f"WARNING: skipping io: {io_unavailable}")
        parts.remove("io")
    if args.runs < 1 or args.cpus < 1:
        die("--runs and --cpus must be at least 1")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        die("/dev/kvm is not accessible")

    command = "python3 " + shlex.join(sys.argv)
    kind = host_kvm_kind()
    qemu = ensure_qemu()
    keel = build_keel(args.no_build)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = os.path.join(CACHE, "logs", stamp)
    os.makedirs(log_dir, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="keel-bench-")
    pick = set(args.variants.split(",")) if args.variants else None

    def select_variants(vs):
        return [v for v in vs if pick is None or v.vid in pick]

    info = [
        f"- Host: {kind}; {cpu_model()}; {os.cpu_count()} CPUs; Linux {platform.release()}",
        f"- Keel: {git_rev()} (`{os.path.relpath(keel, REPO)}`); "
        f"{first_line([qemu, '--version'])}",
    ]
    for env in ("FIRECRACKER_BIN", "CLOUD_HYPERVISOR_BIN"):
        if os.environ.get(env) and os.access(os.environ[env], os.X_OK):
            info.append(f"- {env}: {first_line([os.environ[env], '--version'])}")
    info.append("- Load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    shape = (f"{args.cpus} vCPU(s), {MEMORY_MIB} MiB" if set(parts) - {"snap", "mig"}
             else f"1 vCPU, {args.snap_sizes}" if "snap" in parts else "1 vCPU, 1 GiB")
    info.append(f"- Runs alternate between variants; {shape}; serial logs in `{log_dir}`")
    sections = []
    skipped_all = set()
    if io_unavailable:
        skipped_all.add(f"io ({io_unavailable})")

    if "a" in parts:
        guests = build_first_io_guest()
        vs, skipped = variants_a(keel, qemu, guests, args.cpus, tmpdir)
        vs = select_variants(vs)
        skipped_all.update(skipped)
        log(f"(a) launch -> first guest I/O exit: {', '.join(v.label for v in vs)}")
        runs_a = args.runs_a or max(10, args.runs)
        run_measurement("a", vs, runs_a, args.timeout, None, log_dir, warmup=True)
        subst = [(guests["first_io_s5first"], "first_io_s5first.elf"),
                 (guests["first_io"], "first_io.elf"), (keel, "keel"), (qemu, "qemu-system-x86_64")]
        sections.append(
            "### (a) launch → first guest I/O exit (tiny PVH guest `bench/guests/first_io.S`)\n\n"
            + table(vs, "t_exit", 4) + failure_notes(vs) + "\n\n" + jail_cost(vs)
            + f"Time from spawn to VMM process exit; {runs_a} timed runs per variant, after one "
            "untimed warm-up run each.\n"
            + "\n".join(argv_doc(v, subst) for v in vs))

    if "b" in parts:
        assets, quirks = guest_assets(args.wait_assets)
        cmdline = f"{BASE_CMDLINE} {quirks}" + (f" {args.cmdline_extra}" if args.cmdline_extra
                                                else "")
        vs, skipped = variants_b(keel, qemu, assets, cmdline, args.cpus, tmpdir)
        vs = select_variants(vs)
        skipped_all.update(skipped)
        log(f"(b) launch -> user-space marker: {', '.join(v.label for v in vs)}")
        run_measurement("b", vs, args.runs, args.timeout, MARKER, log_dir, warmup=False)
        subst = [(assets["KEEL_VMLINUX"], "vmlinux"), (assets["KEEL_BZIMAGE"], "bzImage"),
                 (assets["KEEL_INITRD_TINY"], "initramfs-tiny.cpio.gz"), (keel, "keel"),
                 (qemu, "qemu-system-x86_64"), (shlex.quote(cmdline), "\"$CMDLINE\""),
                 (cmdline, "\"$CMDLINE\"")]
        sections.append(
            "### (b) launch → user-space marker (`KEEL-INIT-OK` on the serial console)\n\n"
            + table(vs, "t_marker", 2, extra_cols=(("→ `Linux version` s", "t_linux", 2),
                                                   ("→ `Run /init` s", "t_run_init", 2),
                                                   ("→ exit s", "t_exit", 2),
                                                   ("exit ratio", "t_exit", 2, "ratio")))
            + failure_notes(vs) + "\n\n"
            f"{args.runs} timed runs per variant (no warm-up). "
            "Keel test kernel (`guest/build.sh`) + `initramfs-tiny.cpio.gz`; "
            "`→ Linux version`: when the kernel's first console line arrived (its log buffer "
            "is flushed when the serial console registers, so this covers VMM start-up, "
            "firmware, loading and early boot up to console_init); `→ Run /init`: when the kernel's \"Run /init as init "
            "process\" line arrived; "
            "`→ exit`: VMM process exit after the guest powered off (these columns: medians over every run that completed, marker or not; `exit ratio`: to Keel (PVH)).\n"
            f"CMDLINE=`{cmdline}`\n"
            + "\n".join(argv_doc(v, subst) for v in vs))

    if "io" in parts:
        assets, quirks = guest_assets(args.wait_assets)
        cmdline = f"{BASE_CMDLINE} {quirks}" + (f" {args.cmdline_extra}" if args.cmdline_extra
                                                else "")
        log(f"(io) block and network throughput: host, Keel, QEMU ({args.io_qemu})")
        try:
            sections.append(iobench.measure(args, keel, qemu, assets, cmdline, run_once, log,
                                            log_dir, CACHE))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log(f"(io) ERROR: {e}")
            sections.append(f"### (io) block and network throughput\n\nFailed: {e}")
        except iobench.Terminated:
            shutil.rmtree(tmpdir, ignore_errors=True)
            die("terminated by SIGTERM (io namespaces, taps and files removed)")

    if "snap" in parts:
        assets, quirks = guest_assets(args.wait_assets)
        cmdline = f"{BASE_CMDLINE} {quirks}" + (f" {args.cmdline_extra}" if args.cmdline_extra
                                                else "")
        log(f"(snap) snapshot and restore: sizes {args.snap_sizes}")
        try:
            sections.append(snapbench.measure(args, keel, qemu, assets, cmdline, log, log_dir,
                                              CACHE, pick))
        except (ValueError, OSError, subprocess.SubprocessError) as e:
            log(f"(snap) ERROR: {e}")
            sections.append(f"### (snap) snapshot and restore of an idle guest\n\nFailed: {e}")

    if "mig" in parts:
        log("(mig) live migration between two network namespaces")
        try:
            sections.append(migbench.measure(args, keel, qemu, log, log_dir, REPO))
        except (migbench.Failed, OSError, subprocess.SubprocessError) as e:
            log(f"(mig) ERROR: {e}")
            sections.append(f"### (mig) live migration\n\nFailed: {e}")

    info.append("- Load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
                + " (other work on this machine adds noise; 2 CPUs)")
    skipped_line = ("- Not measured: " + "; ".join(sorted(skipped_all))) if skipped_all else ""
    date = datetime.date.today().isoformat()
    report = (f"## {date} — {kind}\n\n`{command}`\n\n" + "\n".join(info)
              + (f"\n{skipped_line}" if skipped_line else "") + "\n\n"
              + "\n\n".join(sections) + "\n")
    for s in sorted(skipped_all):
        log(f"skipped: {s}")
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + report)
        log(f"appended to {args.out}")
    shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
