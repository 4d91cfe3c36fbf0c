"""(io) block and network throughput, Keel vs QEMU: the `io` part of bench/run.py.

Every number comes from one program, bench/guests/iobench.c, a static i386 binary with raw
`int $0x80` system calls (the only user space that runs on PVM):
  - inside the guest it is /init of its own tiny initramfs (cpio newc, gzip with stored
    blocks, ~9 KB), reads its jobs from the kernel command line (`iobench=...`), prints
    `IOBENCH <job> bytes=<n> ns=<n> ops=<n>` lines on the console and powers off;
  - on the host the same binary runs the block jobs on the image file (buffered, as the
    VMMs do it, and with O_DIRECT), the network jobs from one network namespace to another
    over a veth pair, and is the TCP peer of every network job (`iobench_serve=PORT`).

Block: a fresh raw image (--io-image-mib, default 256 MiB, pattern data, fsync'd, so it
sits clean in the host page cache) before every measurement; in the guest it is the second
virtio-blk disk, /dev/vdb, opened with O_DIRECT (the first, /dev/vda, is a 1 MiB
placeholder). Jobs: sequential 1 MiB and random 4 KiB (uniform, aligned) reads and writes,
--io-ms each (default 3000), one untimed op first.

Network: the VMM runs inside a network namespace that holds its tap (host end
10.213.0.1/24, guest 10.213.0.2 set by the kernel's `ip=`) and the peer; host <-> host is
the same client and peer in two namespaces joined by a veth pair. `tx`: client -> peer
(guest -> host), `rx`: peer -> client (host -> guest); each includes the time until every
byte has been received (see iobench.c).

Needs root (tap devices, network namespaces). Everything created is removed in `finally`
blocks (and on SIGTERM). Python standard library only.
"""

import gzip
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(BENCH, "guests", "iobench.c")

# The flags of guest/build.sh's tiny init: freestanding i386, no FPU/SSE (PVM).
CFLAGS = ["-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-no-pie", "-mno-sse",
          "-mno-mmx", "-msoft-float", "-Os", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-fno-builtin", "-Wall", "-Wextra", "-Werror",
          "-Wl,--build-id=none", "-Wl,-e,_start", "-Wl,-z,noseparate-code", "-Wl,-z,norelro",
          "-Wl,--gc-sections", "-s"]

BLOCK_JOBS = ("seqr", "seqw", "randr", "randw")
NET_JOBS = ("tx", "rx")
JOB_LABEL = {
    "seqr": "seq read 1 MiB", "seqw": "seq write 1 MiB",
    "randr": "rand read 4 KiB", "randw": "rand write 4 KiB",
    "tx": "guest → host (tx)", "rx": "host → guest (rx)",
}
PORT = 5201
TAP = "kbtap0"
MAC = "52:54:00:12:34:56"
HOST_IP, GUEST_IP = "10.213.0.1", "10.213.0.2"
VETH_A_IP, VETH_B_IP = "10.214.0.1", "10.214.0.2"

# QEMU machine types that give the guest PCI and boot the PVH vmlinux (tried on PVM,
# 2026-11-25; see docs/benchmarks.md).
QEMU_MACHINES = {
    "microvm-pcie": "microvm,pcie=on",
    "q35": "q35",
    "pc": "pc",
}
DEFAULT_QEMU = "microvm-pcie"

LINE_RE = re.compile(rb"IOBENCH (\w+) bytes=(\d+) ns=(\d+) ops=(\d+)(?: peer_bytes=(\d+))?")
ERR_RE = re.compile(rb"IOBENCH (\w+) error=(\S+) errno=(-?\d+)")
DEV_RE = re.compile(rb"IOBENCH-DEV (\S+) size=(\d+) direct=(\d)")


class Terminated(Exception):
    pass


def add_arguments(ap):
    g = ap.add_argument_group("io (block and network throughput; needs root)")
    g.add_argument("--io-ms", type=int, default=3000,
                   help="duration of each io job in ms (default 3000)")
    g.add_argument("--io-image-mib", type=int, default=256,
                   help="size of the raw test image in MiB (default 256)")
    g.add_argument("--io-jobs", default=",".join(BLOCK_JOBS + NET_JOBS),
                   help="io jobs, in order (default seqr,seqw,randr,randw,tx,rx)")
    g.add_argument("--io-qemu", default=DEFAULT_QEMU,
                   help="QEMU machine(s) for io, comma-separated: "
                   + ", ".join(f"{k} (-M {v})" for k, v in QEMU_MACHINES.items())
                   + f" (default {DEFAULT_QEMU}); 'none' for Keel only")
    g.add_argument("--io-qemu-aio", choices=["threads", "io_uring"], default="threads",
                   help="QEMU aio= for the test disk (default threads, QEMU's default; Keel "
                   "itself uses io_uring when the host has it)")
    g.add_argument("--io-timeout", type=float, default=900,
                   help="kill an io VMM run after this many s (default 900)")
    g.add_argument("--io-no-keel", action="store_true", help="io: QEMU only (diagnostics)")


def check_root():
    """None if io can run here, else why not."""
    if os.geteuid() != 0:
        return ("needs root (it creates tap devices, veth pairs and network namespaces); "
                "run bench/run.py as root, or --skip io")
    for tool in ("ip", "gcc"):
        if not shutil.which(tool):
            return f"`{tool}` is missing"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


# ------------------------------------------------------------------------ building --

def build(cache, log):
    """Compile iobench.c; pack it as /init of a tiny initramfs. Returns (binary, initramfs)."""
    os.makedirs(cache, exist_ok=True)
    binary = os.path.join(cache, "iobench")
    r = subprocess.run(["gcc", *CFLAGS, "-o", binary + ".tmp", SRC], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"gcc {SRC} failed:\n{r.stderr}")
    os.replace(binary + ".tmp", binary)
    with open(binary, "rb") as f:
        init = f.read()
    cpio = (cpio_entry("dev", 0o040755) + cpio_entry("dev/console", 0o020600, rdev=(5, 1))
            + cpio_entry("init", 0o100755, init) + cpio_entry("TRAILER!!!", 0))
    initrd = os.path.join(cache, "iobench.cpio.gz")
    with open(initrd + ".tmp", "wb") as f:
        # Stored (level 0) deflate blocks: inflating real deflate data is slow emulated
        # kernel work on PVM (see guest/build.sh).
        f.write(gzip.compress(cpio, compresslevel=0, mtime=0))
    os.replace(initrd + ".tmp", initrd)
    log(f"(io) built {binary} ({len(init)} bytes) and {initrd} "
        f"({os.path.getsize(initrd)} bytes)")
    return binary, initrd


def cpio_entry(name, mode, data=b"", rdev=(0, 0), _ino=[0]):
    """One cpio "newc" entry, owned by 0:0, mtime 0."""
    _ino[0] += 1
    nb = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (_ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
    out = b"070701" + b"".join(b"%08X" % x for x in fields) + nb
    out += b"\0" * (-len(out) % 4)
    return out + data + b"\0" * (-len(data) % 4)


def make_image(path, mib):
    """A fresh raw image of pattern data, written through and fsync'd."""
    block = (bytes(range(256)) * 4096)[: 1 << 20]
    block = bytes(b ^ 0x5A for b in block[:4096]) + block[4096:]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(mib):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------- networking --

def sh(*argv, check=True):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {r.stderr.strip()}")
    return r


class Network:
    """Network namespaces: G (tap + peer for the VMMs), A and B (veth pair, host <-> host)."""

    def __init__(self, log):
        self.log = log
        tag = f"keelbench{os.getpid()}"
        self.g, self.a, self.b = tag + "g", tag + "a", tag + "b"
        self.made = []

    def __enter__(self):
        try:
            return self._create()
        except BaseException:
            self.__exit__()
            raise

    def _create(self):
        for ns in (self.g, self.a, self.b):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.g, "tuntap", "add", "dev", TAP, "mode", "tap")
        sh("ip", "-n", self.g, "addr", "add", f"{HOST_IP}/24", "dev", TAP)
        sh("ip", "-n", self.g, "link", "set", TAP, "up")
        sh("ip", "-n", self.a, "link", "add", "kbveth0", "type", "veth", "peer", "name",
           "kbveth1", "netns", self.b)
        sh("ip", "-n", self.a, "addr", "add", f"{VETH_A_IP}/24", "dev", "kbveth0")
        sh("ip", "-n", self.b, "addr", "add", f"{VETH_B_IP}/24", "dev", "kbveth1")
        sh("ip", "-n", self.a, "link", "set", "kbveth0", "up")
        sh("ip", "-n", self.b, "link", "set", "kbveth1", "up")
        self.log(f"(io) network namespaces {self.g} (tap {TAP} {HOST_IP}/24), "
                 f"{self.a} <-veth-> {self.b}")
        return self

    def __exit__(self, *exc):
        if self.g in self.made:
            sh("ip", "-n", self.g, "link", "del", TAP, check=False)
        for ns in reversed(self.made):
            r = sh("ip", "netns", "del", ns, check=False)
            if r.returncode != 0:
                self.log(f"(io) WARNING: ip netns del {ns}: {r.stderr.strip()}")
        self.made = []
        return False


class Peer:
    """iobench_serve=PORT in a namespace: the TCP peer of the network jobs."""

    def __init__(self, binary, ns, log_path):
        self.binary, self.ns, self.log_path = binary, ns, log_path
        self.p = None

    def __enter__(self):
        self.out = open(self.log_path, "wb")
        self.p = subprocess.Popen(["ip", "netns", "exec", self.ns, self.binary],
                                  env={"iobench_serve": str(PORT)}, stdin=subprocess.DEVNULL,
                                  stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                text = f.read()
            if b"IOBENCH-SERVE" in text:
                return self
            if b"error=" in text or self.p.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the iobench peer did not start in {self.ns}: see {self.log_path}")

    def __exit__(self, *exc):
        if self.p and self.p.poll() is None:
            self.p.kill()
        if self.p:
            self.p.wait()
        self.out.close()
        return False


# -------------------------------------------------------------------------- running --

def parse(stdout):
    """IOBENCH lines -> {job: {bytes, ns, ops, peer_bytes}}, errors, dev info."""
    res, errors, dev = {}, [], None
    for m in LINE_RE.finditer(stdout):
        res[m.group(1).decode()] = {
            "bytes": int(m.group(2)), "ns": int(m.group(3)), "ops": int(m.group(4)),
            "peer_bytes": int(m.group(5)) if m.group(5) else None}
    for m in ERR_RE.finditer(stdout):
        errors.append(f"{m.group(1).decode()}: {m.group(2).decode()} {m.group(3).decode()}")
    m = DEV_RE.search(stdout)
    if m:
        dev = (m.group(1).decode(), int(m.group(2)), int(m.group(3)))
    return res, errors, dev


def host_run(binary, env, ns=None, timeout=None, log_path=None):
    argv = (["ip", "netns", "exec", ns] if ns else []) + [binary]
    if timeout is None:  # every job, twice over, and a minute
        timeout = 60 + 2 * len(env["iobench"].split(",")) * int(env["iobench_ms"]) / 1000
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout)
    if log_path:
        with open(log_path, "wb") as f:
            f.write(b"# argv: " + shlex.join(argv).encode() + b"\n# env: "
                    + " ".join(f"{k}={v}" for k, v in env.items()).encode() + b"\n"
                    + r.stdout + b"\n# ---- stderr ----\n" + r.stderr)
    return parse(r.stdout)


def metric(job, r):
    """MB/s (10^6 bytes/s) for sequential and network jobs, IOPS for random ones."""
    if not r or r["ns"] <= 0:
        return None
    if job in ("randr", "randw"):
        return r["ops"] * 1e9 / r["ns"]
    return r["bytes"] * 1e3 / r["ns"]


def unit(job):
    return "IOPS" if job in ("randr", "randw") else "MB/s"


class Row:
    def __init__(self, rid, label, kind):
        self.rid, self.label, self.kind = rid, label, kind  # kind: host-blk|host-net|vm
        self.samples = {}  # job -> [metric per run]
        self.runs = []  # vm: run_once results (+ parsed)
        self.notes = []

    def add(self, parsed):
        res, errors, _ = parsed
        for job, r in res.items():
            if r["peer_bytes"] is not None and r["peer_bytes"] != r["bytes"]:
                self.notes.append(f"{job}: sent {r['bytes']} bytes, the peer counted "
                                  f"{r['peer_bytes']}")
            v = metric(job, r)
            if v is not None:
                self.samples.setdefault(job, []).append(v)
        for e in errors:
            if e not in self.notes:
                self.notes.append(e)

    def med(self, job):
        xs = self.samples.get(job)
        return statistics.median(xs) if xs else None


def fmt_val(row, job, runs):
    xs = row.samples.get(job)
    if not xs:
        return "—"
    med = statistics.median(xs)
    s = fmt_num(med)
    if runs > 1 and len(xs) > 1:
        s += f" ({fmt_num(min(xs))}–{fmt_num(max(xs))})"
    return s


def fmt_num(x):
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_ratio(a, b):
    if a is None or not b:
        return "—"
    return f"{a / b:.2f}×"


def fmt_pct(a, b):
    if a is None or not b:
        return "—"
    p = 100.0 * a / b
    return f"{p:.1f} %" if p >= 1 else f"{p:.2g} %"


def measure(args, keel, qemu, assets, base_cmdline, run_once, log, log_dir, cache):
    """Runs the io measurement; returns (markdown section, list of 'not measured' notes)."""
    jobs = [j for j in args.io_jobs.split(",") if j]
    bad = [j for j in jobs if j not in BLOCK_JOBS + NET_JOBS]
    if bad:
        raise RuntimeError(f"unknown --io-jobs: {', '.join(bad)}")
    blk_jobs = [j for j in jobs if j in BLOCK_JOBS]
    net_jobs = [j for j in jobs if j in NET_JOBS]
    qemu_ids = [] if args.io_qemu == "none" else [q for q in args.io_qemu.split(",") if q]
    for q in qemu_ids:
        if q not in QEMU_MACHINES:
            raise RuntimeError(f"unknown --io-qemu machine {q!r} "
                               f"(known: {', '.join(QEMU_MACHINES)})")
    binary, initrd = build(cache, log)

    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Terminated("SIGTERM")
    signal.signal(signal.SIGTERM, on_term)
    tmp = tempfile.mkdtemp(prefix="io-", dir=cache)
    try:
        return _measure(args, keel, qemu, assets, base_cmdline, run_once, log, log_dir, tmp,
                        binary, initrd, jobs, blk_jobs, net_jobs, qemu_ids)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, keel, qemu, assets, base_cmdline, run_once, log, log_dir, tmp, binary,
             initrd, jobs, blk_jobs, net_jobs, qemu_ids):
    img = os.path.join(tmp, "bench.img")
    placeholder = os.path.join(tmp, "placeholder.img")
    with open(placeholder, "wb") as f:
        f.truncate(1 << 20)
    image_bytes = args.io_image_mib << 20
    ms = args.io_ms
    vml = assets["KEEL_VMLINUX"]
    mem = "256M"
    cmdline = (f"{base_cmdline} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off "
               f"iobench={','.join(jobs)} iobench_dev=/dev/vdb iobench_direct=1 "
               f"iobench_net={HOST_IP}:{PORT} iobench_ms={ms}")

    rows_host = []
    if blk_jobs:
        rows_host.append(Row("host-buffered", "host, buffered pread/pwrite (what the VMMs do)",
                             "host-blk"))
        rows_host.append(Row("host-direct", "host, O_DIRECT", "host-blk"))
    if net_jobs:
        rows_host.append(Row("host-veth", "host ↔ host (veth between two netns)", "host-net"))

    net = Network(log)
    vms = []
    with net:
        if not args.io_no_keel:
            vms.append(Row("keel", "Keel", "vm"))
            vms[-1].argv = ["ip", "netns", "exec", net.g, keel, "run", "--kernel", vml,
                            "--initrd", initrd, "--cmdline", cmdline, "--cpus", str(args.cpus),
                            "--memory", mem, "--no-host-quirks",
                            "--disk", f"path={placeholder},format=raw",
                            "--disk", f"path={img},format=raw",
                            "--net", f"tap={TAP},mac={MAC}"]
        for q in qemu_ids:
            vms.append(Row(f"qemu-{q}", f"QEMU -M {QEMU_MACHINES[q]}", "vm"))
            vms[-1].argv = [
                "ip", "netns", "exec", net.g, qemu, "-M", QEMU_MACHINES[q], "-enable-kvm",
                "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
                "-m", mem, "-smp", str(args.cpus),
                "-kernel", vml, "-initrd", initrd, "-append", cmdline,
                "-drive", f"file={placeholder},format=raw,if=none,id=d0,cache=writeback",
                "-device", "virtio-blk-pci,drive=d0",
                "-drive", f"file={img},format=raw,if=none,id=d1,cache=writeback,"
                f"aio={args.io_qemu_aio}",
                "-device", "virtio-blk-pci,drive=d1",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]

        with Peer(binary, net.g, os.path.join(log_dir, "io-peer-tap.log")), \
                Peer(binary, net.a, os.path.join(log_dir, "io-peer-veth.log")):
            for i in range(args.runs):
                for row in rows_host:
                    lp = os.path.join(log_dir, f"io-{row.rid}-{i + 1}.log")
                    if row.kind == "host-blk":
                        make_image(img, args.io_image_mib)
                        env = {"iobench": ",".join(blk_jobs), "iobench_dev": img,
                               "iobench_direct": "1" if row.rid == "host-direct" else "0",
                               "iobench_ms": str(ms)}
                        parsed = host_run(binary, env, log_path=lp)
                    else:
                        env = {"iobench": ",".join(net_jobs),
                               "iobench_net": f"{VETH_A_IP}:{PORT}", "iobench_ms": str(ms)}
                        parsed = host_run(binary, env, ns=net.b, log_path=lp)
                    row.add(parsed)
                    log(f"(io) run {i + 1}/{args.runs} {row.label}: " + summary(parsed))
                for row in vms:
                    make_image(img, args.io_image_mib)
                    lp = os.path.join(log_dir, f"io-{row.rid}-{i + 1}.log")
                    r = run_once(row.argv, args.io_timeout, b"IOBENCH-START", False, lp)
                    parsed = parse(r["stdout"])
                    r["done"] = b"IOBENCH-DONE" in r["stdout"]
                    r["dev"] = parsed[2]
                    row.runs.append(r)
                    row.add(parsed)
                    if blk_jobs and parsed[2] and parsed[2][1] != image_bytes:
                        row.notes.append(f"/dev/vdb is {parsed[2][1]} bytes, not the "
                                         f"{image_bytes}-byte test image")
                    st = ("ok" if r["done"] and r["rc"] == 0 else
                          "TIMEOUT" if r["timed_out"] else f"FAILED rc={r['rc']}")
                    log(f"(io) run {i + 1}/{args.runs} {row.label}: {summary(parsed)}; "
                        f"exit {fmt_s(r['t_exit'])} s, CPU {fmt_s(r['cpu_s'])} s, "
                        f"rc {r['rc']} — {st}")
    return report(args, rows_host, vms, blk_jobs, net_jobs, cmdline, keel, qemu, vml, initrd,
                  placeholder, img, log_dir, net.g)


def summary(parsed):
    res, errors, _ = parsed
    parts = [f"{j} {fmt_num(metric(j, r))} {unit(j)}" for j, r in res.items()
             if metric(j, r) is not None]
    return ", ".join(parts + [f"ERROR {e}" for e in errors]) or "no results"


def fmt_s(x):
    return "—" if x is None else f"{x:.1f}"


def report(args, rows_host, vms, blk_jobs, net_jobs, cmdline, keel, qemu, vml, initrd,
           placeholder, img, log_dir, ns):
    runs = args.runs
    out = ["### (io) block and network throughput (`bench/guests/iobench.c`)"]
    host_buf = next((r for r in rows_host if r.rid == "host-buffered"), None)
    host_net = next((r for r in rows_host if r.rid == "host-veth"), None)
    keel_row = next((r for r in vms if r.rid == "keel"), None)
    qemu_rows = [r for r in vms if r.rid != "keel"]

    def ratio_rows(jobs, ref, label_ref):
        lines = []
        for vm in vms:
            lines.append(f"| {vm.label} guest, % of {label_ref} | "
                         + " | ".join(fmt_pct(vm.med(j), ref.med(j) if ref else None)
                                      for j in jobs) + " |")
        if keel_row:
            for q in qemu_rows:
                lines.append(f"| **Keel / {q.label}** | "
                             + " | ".join(fmt_ratio(keel_row.med(j), q.med(j)) for j in jobs)
                             + " |")
        return lines

    if blk_jobs:
        head = ["where"] + [f"{JOB_LABEL[j]} {unit(j)}" for j in blk_jobs]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in [r for r in rows_host if r.kind == "host-blk"] + vms:
            label = row.label + (" guest, /dev/vdb O_DIRECT" if row.kind == "vm" else "")
            lines.append(f"| {label} | "
                         + " | ".join(fmt_val(row, j, runs) for j in blk_jobs) + " |")
        lines += ratio_rows(blk_jobs, host_buf, "host buffered")
        out.append("**Block** (MB/s = 10^6 bytes/s; IOPS = ops/s; medians of "
                   f"{runs} run(s), (min–max) when several)\n\n" + "\n".join(lines))
    if net_jobs:
        head = ["path"] + [f"{JOB_LABEL[j]} MB/s" for j in net_jobs]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in [r for r in rows_host if r.kind == "host-net"] + vms:
            label = row.label + (" guest ↔ host (tap)" if row.kind == "vm" else "")
            lines.append(f"| {label} | "
                         + " | ".join(fmt_val(row, j, runs) for j in net_jobs) + " |")
        lines += ratio_rows(net_jobs, host_net, "host↔host")
        out.append("**Network** (TCP, one connection, 64 KiB writes; for host ↔ host "
                   "`guest → host` means client namespace → peer namespace)\n\n"
                   + "\n".join(lines))
    if vms:
        head = ["VMM", "→ `Run /init` s", "→ `IOBENCH-START` s", "→ exit s",
                "VMM CPU s (user+sys)", "CPU / wall", "peak RSS MiB", "ok runs"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for vm in vms:
            done = [r for r in vm.runs if not r["timed_out"]]
            ok = [r for r in vm.runs if r["done"] and r["rc"] == 0 and not r["timed_out"]]

            def med(key):
                xs = [r[key] for r in done if r[key] is not None]
                return statistics.median(xs) if xs else None
            busy = [r["cpu_s"] / r["t_exit"] for r in done if r.get("t_exit")]
            lines.append(f"| {vm.label} | {fmt_s(med('t_run_init'))} | "
                         f"{fmt_s(med('t_marker'))} | {fmt_s(med('t_exit'))} | "
                         f"{fmt_s(med('cpu_s'))} | "
                         f"{f'{statistics.median(busy):.2f}' if busy else '—'} | "
                         f"{fmt_s(med('maxrss_mib'))} | {len(ok)}/{len(vm.runs)} |")
        out.append("**Boots of the io guest** (one boot per VMM per run runs every job; "
                   "medians; VMM CPU: user+system time of the VMM process and its threads, "
                   "from `wait4` — on PVM the emulated guest kernel counts as system time, so "
                   "CPU / wall well under 1 means the vCPU waited for a host CPU)\n\n"
                   + "\n".join(lines))
    notes = []
    for row in rows_host + vms:
        for n in row.notes:
            notes.append(f"- **{row.label}**: {n}")
        for i, r in enumerate(getattr(row, "runs", [])):
            if r["timed_out"] or not r["done"] or r["rc"] != 0:
                notes.append(f"- **{row.label}** run {i + 1}: "
                             + ("timed out" if r["timed_out"] else
                                f"exit status {r['rc']}" if r["done"] else
                                f"no `IOBENCH-DONE` (exit status {r['rc']})")
                             + f"; log {os.path.join(log_dir, f'io-{row.rid}-{i + 1}.log')}")
    if notes:
        out.append("Problems:\n" + "\n".join(notes))

    subst = [(vml, "vmlinux"), (initrd, "iobench.cpio.gz"), (placeholder, "placeholder.img"),
             (img, "bench.img"), (keel, "keel"), (qemu or "qemu-system-x86_64",
                                                   "qemu-system-x86_64"),
             (shlex.quote(cmdline), '"$CMDLINE"'), (cmdline, '"$CMDLINE"'), (ns, "$NS")]

    def doc(argv):
        s = shlex.join(argv)
        for a, b in subst:
            s = s.replace(a, b)
        return s

    cmds = [f"CMDLINE=`{cmdline}`"]
    for vm in vms:
        cmds.append(f"- {vm.label}: `{doc(vm.argv)}`")
    out.append(
        f"Each job runs {args.io_ms} ms (after one untimed op); one boot per VMM and run "
        "runs all of them, on a fresh "
        f"{args.io_image_mib} MiB raw image (pattern data, fsync'd, so clean in the host page "
        "cache). Guest: `/dev/vdb` opened with O_DIRECT (no guest page cache); `/dev/vda` is "
        "a 1 MiB placeholder disk. Host block rows: the same program on the image file, "
        "buffered (the VMMs' own path: Keel opens images without O_DIRECT and, here, serves "
        "them with io_uring; QEMU gets `cache=writeback` (host page cache, no O_DIRECT) and "
        f"`aio={args.io_qemu_aio}`) and with O_DIRECT (for scale). QEMU: virtio-pci devices, "
        "no vhost-net (`vhost=off`; this host has no /dev/vhost-net, and Keel has none). "
        "Network: the VMM, its tap "
        f"({HOST_IP}/24, guest {GUEST_IP} via `ip=`) and the peer (`iobench_serve`) share one "
        "network namespace; host ↔ host runs the same client and peer in two namespaces "
        "joined by a veth pair. Ratios are ratios of medians.\n"
        + "\n".join(cmds))
    return "\n\n".join(out)
