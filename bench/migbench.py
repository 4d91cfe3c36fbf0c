"""(mig) live migration between two "hosts": the `mig` part of bench/run.py.

Two network namespaces joined by a veth stand for two hosts; the guest moves from A to B over
TCP on that link. The guest is the test kit's `test=migrate` (crates/guest-kit, built here
with `cargo build -p keel-guest-kit --release`): a PVH ELF both Keel and QEMU boot, which
timestamps every millisecond and prints, once a second, the largest gap it saw. Two guests,
1 GiB each, all of it written once (`fill=1000`): idle, and dirtying 64 MiB/s of a 256 MiB
span. Measured per migration: total time, the downtime the VMM reports, and the gap the guest
itself saw across the move (its first second on the destination). Keel: `keel receive` on B,
`keel run` + `keel migrate` on A (pre-shared key, AES-256-GCM stream, default 30 ms budget).
QEMU: `-incoming tcp:` on B, QMP `migrate` on A with `downtime-limit` 30 ms (QEMU's default is
300 ms) and unlimited bandwidth; its stream is not encrypted. Python standard library only.
"""

import glob
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from snapvmms import Failed, Proc, Qmp, wait_socket

NS = ("keelbenchA", "keelbenchB")
IP = ("10.251.0.1", "10.251.0.2")
GUESTS = [
    ("idle", "test=migrate fill=1000"),
    ("dirtying 64 MiB/s", "test=migrate fill=1000 dirty=64 span=256"),
]
MEMORY = "1G"
KEY = b"the bench's migration key, 32 B!"
GAP = re.compile(rb"KIT: gap second=(\d+) max_us=(\d+)")


def add_arguments(ap):
    g = ap.add_argument_group("mig (live migration between two network namespaces)")
    g.add_argument("--runs-mig", type=int,
                   help="migrations per VMM and guest (default: --runs if given, else 3)")
    g.add_argument("--mig-timeout", type=float, default=120,
                   help="give up on one migration after this many s (default 120)")


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def hosts_up():
    hosts_down()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "kbA", "netns", NS[0], "type", "veth", "peer", "name", "kbB",
       "netns", NS[1])
    for ns, dev, ip in zip(NS, ("kbA", "kbB"), IP):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def hosts_down():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def in_ns(i, argv):
    return ["ip", "netns", "exec", NS[i]] + argv


def kit_image(repo):
    """Builds the test kit (release) and returns its PVH ELF."""
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "keel-guest-kit"], cwd=repo,
                   check=True)
    found = glob.glob(os.path.join(repo, "target/release/build/keel-guest-kit-*/out/kit-pvh.elf"))
    if not found:
        raise Failed("the test kit was built but kit-pvh.elf is not there")
    return max(found, key=os.path.getmtime)


def last_second(proc):
    seconds = [int(m.group(1)) for m in GAP.finditer(bytes(proc.out))]
    return seconds[-1] if seconds else None


def gap_at(proc, second, timeout):
    """The max_us the destination printed for `second`, in ms (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in GAP.finditer(bytes(proc.out)):
            if int(m.group(1)) == second:
                return int(m.group(2)) / 1000.0
        if not proc.alive():
            break
        time.sleep(0.05)
    return None


def wait_second(proc, n, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = last_second(proc)
        if s is not None and s >= n:
            return s
        if not proc.alive():
            raise Failed(f"the guest stopped ({proc.tail_err(200)})")
        time.sleep(0.05)
    raise Failed(f"the guest did not reach second {n} within {timeout:.0f} s")


def keel_once(keel, kit, cmdline, port, tmp, log_dir, tag, timeout):
    key = os.path.join(tmp, "key")
    with open(key, "wb") as f:
        f.write(KEY)
    s1, s2 = os.path.join(tmp, f"{tag}-a.sock"), os.path.join(tmp, f"{tag}-b.sock")
    listen = f"{IP[1]}:{port}"
    dst = Proc(in_ns(1, [keel, "receive", "--listen", listen, "--migration-key", key,
                         "--api-socket", s2]), os.path.join(log_dir, f"{tag}-dst.log"))
    src = Proc(in_ns(0, [keel, "run", "--kernel", kit, "--cmdline", cmdline, "--memory", MEMORY,
                         "--shutdown-timeout", "0", "--api-socket", s1]),
               os.path.join(log_dir, f"{tag}-src.log"))
    try:
        wait_second(src, 3, timeout)
        o = subprocess.run(in_ns(0, [keel, "migrate", "--vm", s1, "--to", listen,
                                     "--migration-key", key]),
                           capture_output=True, timeout=timeout)
        said = o.stderr.decode(errors="replace").strip()
        if o.returncode != 0:
            raise Failed(f"keel migrate: {said[-300:]}")
        m = re.search(r"([\d.]+) ms in all, guest paused ([\d.]+) ms.*?(\d+) round", said)
        if not m:
            raise Failed(f"no summary in: {said[-300:]}")
        src.p.wait(timeout)
        last = last_second(src)
        gap = gap_at(dst, last + 1, 10) if last is not None else None
        return {"total_ms": float(m.group(1)), "downtime_ms": float(m.group(2)),
                "rounds": int(m.group(3)), "gap_ms": gap,
                "converged": "did not converge" not in said}
    finally:
        src.kill()
        dst.kill()


def qemu_argv(qemu, kit, cmdline, qmp, incoming=None):
    argv = [qemu, "-M", "q35", "-enable-kvm", "-cpu", "host", "-nographic", "-nodefaults",
            "-serial", "stdio", "-no-reboot", "-m", MEMORY, "-smp", "1", "-kernel", kit,
            "-append", cmdline, "-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + (["-incoming", incoming] if incoming else [])


def qemu_once(qemu, kit, cmdline, port, tmp, log_dir, tag, timeout):
    q1, q2 = os.path.join(tmp, f"{tag}-a.qmp"), os.path.join(tmp, f"{tag}-b.qmp")
    dst = Proc(in_ns(1, qemu_argv(qemu, kit, cmdline, q2, f"tcp:{IP[1]}:{port}")),
               os.path.join(log_dir, f"{tag}-dst.log"))
    src = Proc(in_ns(0, qemu_argv(qemu, kit, cmdline, q1)), os.path.join(log_dir, f"{tag}-src.log"))
    qmps = []
    try:
        for proc, path in ((dst, q2), (src, q1)):
            s = wait_socket(path, proc, timeout)
            if s is None:
                raise Failed(f"no QMP socket ({proc.tail_err(200)})")
            qmps.append(Qmp(s))
        qs = qmps[1]
        wait_second(src, 3, timeout)
        qs.cmd("migrate-set-parameters", **{"downtime-limit": 30, "max-bandwidth": 1 << 40})
        qs.cmd("migrate", uri=f"tcp:{IP[1]}:{port}")
        deadline = time.monotonic() + timeout
        while True:
            st = qs.cmd("query-migrate")
            if st.get("status") == "completed":
                break
            if st.get("status") in ("failed", "cancelled"):
                raise Failed(f"QEMU migration {st.get('status')}: {st.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise Failed("QEMU migration did not complete in time")
            time.sleep(0.01)
        last = last_second(src)
        gap = gap_at(dst, last + 1, 10) if last is not None else None
        rounds = st.get("ram", {}).get("dirty-sync-count")
        return {"total_ms": float(st.get("total-time", 0)),
                "downtime_ms": float(st.get("downtime", 0)), "rounds": rounds, "gap_ms": gap,
                "converged": True}
    finally:
        for q in qmps:
            try:
                q.close()
            except OSError:
                pass
        src.kill()
        dst.kill()


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def measure(args, keel, qemu, log, log_dir, repo):
    """Runs the mig part; returns its markdown section."""
    runs = args.runs_mig or (args.runs if getattr(args, "runs_given", False) else 3)
    kit = kit_image(repo)
    tmp = tempfile.mkdtemp(prefix="keel-mig-")
    hosts_up()
    vmms = [("keel", "Keel", keel_once, keel), ("qemu", "QEMU -M q35", qemu_once, qemu)]
    results = {(g, v): [] for g, _ in GUESTS for v, *_ in vmms}
    errors = []
    port = 47300
    try:
        for run in range(1, runs + 1):
            for gname, cmdline in GUESTS:
                for vid, label, once, binary in vmms:  # alternate VMMs
                    port += 1
                    tag = f"mig-{vid}-{gname.split()[0]}-{run}"
                    log(f"(mig) {label}, {gname} guest, run {run}")
                    try:
                        r = once(binary, kit, cmdline, port, tmp, log_dir, tag,
                                 args.mig_timeout)
                        results[(gname, vid)].append(r)
                        log(f"(mig)   total {r['total_ms']:.0f} ms, downtime "
                            f"{r['downtime_ms']:.1f} ms, guest gap {fmt(r['gap_ms'])} ms")
                    except (Failed, OSError, subprocess.SubprocessError) as e:
                        errors.append(f"{label}, {gname}, run {run}: {e}")
                        log(f"(mig)   FAILED: {e}")
    finally:
        hosts_down()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = ["| guest | VMM | runs | total ms | downtime ms (VMM) | gap ms (guest) | "
            "rounds | total / QEMU | gap / QEMU |", "|---|---|---|---|---|---|---|---|---|"]
    for gname, _ in GUESTS:
        q = results[(gname, "qemu")]
        q_total, q_gap = med([r["total_ms"] for r in q]), med([r["gap_ms"] for r in q])
        for vid, label, *_ in vmms:
            rs = results[(gname, vid)]
            total, gap = med([r["total_ms"] for r in rs]), med([r["gap_ms"] for r in rs])
            ratio = (lambda a, b: "—" if a is None or not b else f"{a / b:.2f}")
            conv = "" if all(r["converged"] for r in rs) else " (not converged)"
            rows.append(
                f"| {gname} | {label} | {len(rs)} | {fmt(total, 0)} | "
                f"{fmt(med([r['downtime_ms'] for r in rs]))} | {fmt(gap)} | "
                f"{fmt(med([r['rounds'] for r in rs]), 0)}{conv} | {ratio(total, q_total)} | "
                f"{ratio(gap, q_gap)} |")
    notes = "".join(f"\n- failed: {e}" for e in errors)
    return ("### (mig) live migration between two network namespaces over a veth\n\n"
            + "\n".join(rows) + "\n" + notes + "\n\n"
            f"Medians of {runs} migrations per VMM and guest, VMMs alternating. The guest: "
            f"`{os.path.basename(kit)}` (test kit, PVH) with 1 vCPU and {MEMORY}, all of it "
            "written once; `gap`: the largest gap between the guest's own 1 ms timestamps in "
            "its first second on the destination (it includes the 1 ms tick). Keel encrypts "
            "(AES-256-GCM), QEMU sends in the clear; QEMU's `downtime-limit` is set to Keel's "
            "default budget, 30 ms (its own default is 300 ms). `rounds`: Keel's pre-copy "
            "rounds plus the paused one; QEMU's `dirty-sync-count`.\n")
