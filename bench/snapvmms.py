"""The VMMs of bench/snapbench.py: boot an idle guest, snapshot it, restore it, and say when
the restored VM runs, for Keel (CLI + API socket), QEMU (QMP) and Firecracker (HTTP API).

Each class has boot(mem, tag) -> vm, snapshot(vm, dir, res), restore(dir, tag, res) -> vm and
stop(vm); timings go into the dict res (seconds), failures raise Failed with the reason.
Python standard library only.
"""

import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time

MARKER = b"KEEL-INIT-OK"
HALTED = b"reboot: System halted"
POLL_S = 0.001


class Failed(Exception):
    pass

# ---------------------------------------------------------------------- processes --

def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def rss_mib(pid):
    """VmRSS of the largest process in pid's tree (the VMM: for Keel the jailed child)."""
    best = None
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kib = int(line.split()[1])
                        best = kib if best is None else max(best, kib)
        except (OSError, ValueError, IndexError):
            pass
    return None if best is None else best / 1024.0


class Proc:
    """A VMM process with stdout/stderr drained by threads (arrival times kept)."""

    def __init__(self, argv, log_path, pass_fds=()):
        self.argv, self.log_path = argv, log_path
        self.chunks = []  # (t since spawn, b"out"|b"err", data)
        self.out, self.err = bytearray(), bytearray()
        self.cv = threading.Condition()
        self.notes = []
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, pass_fds=pass_fds)
        self.threads = [threading.Thread(target=self._drain, args=(s, buf, tag), daemon=True)
                        for s, buf, tag in ((self.p.stdout, self.out, b"out"),
                                            (self.p.stderr, self.err, b"err"))]
        for t in self.threads:
            t.start()

    def _drain(self, stream, buf, tag):
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self.cv:
                if data:
                    buf += data
                    self.chunks.append((time.monotonic() - self.t0, tag, data))
                else:
                    self.chunks.append((time.monotonic() - self.t0, tag, b""))
                self.cv.notify_all()
            if not data:
                return

    def since(self):
        return time.monotonic() - self.t0

    def alive(self):
        return self.p.poll() is None

    def wait_for(self, needle, timeout):
        """Seconds since spawn at which needle was on stdout; None on timeout or exit."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while needle not in self.out:
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and
                                 all(not t.is_alive() for t in self.threads)):
                    return None
                self.cv.wait(min(left, 0.2))
            return self.since()

    def note(self, msg):
        self.notes.append(f"[+{self.since():9.4f}] {msg}")

    def kill(self):
        """SIGKILL the process and whatever it started; wait until all are gone."""
        kids = descendants(self.p.pid)
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for k in kids:  # Keel's jailed VMM dies with its supervisor (PDEATHSIG); make sure
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{k}") for k in kids):
            time.sleep(0.005)
        for t in self.threads:
            t.join(2)
        self.write_log()

    def tail_err(self, n=400):
        text = bytes(self.err).decode(errors="replace").strip()
        return text[-n:] if text else f"exit status {self.p.poll()}"

    def write_log(self):
        if not self.log_path:
            return
        with open(self.log_path, "wb") as f:
            f.write(b"# argv: " + shlex.join(self.argv).encode() + b"\n")
            f.write(f"# exit status: {self.p.poll()}\n".encode())
            for n in self.notes:
                f.write(b"# " + n.encode() + b"\n")
            f.write(b"# ---- stdout (serial console) ----\n" + bytes(self.out))
            f.write(b"\n# ---- stderr ----\n" + bytes(self.err))
            f.write(b"\n# ---- output chunks with arrival time (s since spawn) ----\n")
            for t, tag, data in self.chunks:
                f.write(b"[+%9.4f %s] %r\n" % (t, tag, data[:200]))


def boot_guest(proc, timeout):
    """Wait for the marker and the halt; raises Failed with the reason."""
    t = proc.wait_for(MARKER, timeout)
    if t is None:
        raise Failed(f"no {MARKER.decode()} within {timeout:.0f} s ({proc.tail_err(200)})")
    proc.note(f"marker at {t:.3f} s")
    th = proc.wait_for(HALTED, 30)
    proc.note(f"halted at {th:.3f} s" if th is not None else "no 'System halted' within 30 s")
    if not proc.alive():
        raise Failed(f"the VMM exited after the guest booted ({proc.tail_err(200)})")
    return t


def wait_socket(path, proc, timeout):
    """Connect to a Unix socket as soon as it accepts; None if proc died or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(timeout)
            return s
        except OSError:
            s.close()
        if not proc.alive():
            return None
        time.sleep(POLL_S)
    return None


def disk_usage(path):
    alloc = apparent = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc / 2**20, apparent / 2**20


def fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- Keel --

def keel_verbs(keel):
    """(snapshot argv builder, None) when this keel has the verbs, else (None, reason)."""
    def ok(argv):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
        return r.returncode == 0, (r.stderr or r.stdout).strip()
    try:
        has_snap, why_snap = ok([keel, "snapshot", "--help"])
        has_ctl_snap = False
        if not has_snap:
            has_ctl_snap, _ = ok([keel, "ctl", "--api-socket", "x", "snapshot", "--help"])
        has_restore, why_restore = ok([keel, "restore", "--help"])
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot run {keel}: {e}"
    missing = []
    if not (has_snap or has_ctl_snap):
        missing.append("`keel snapshot`: " + (why_snap.splitlines() or ["?"])[0])
    if not has_restore:
        missing.append("`keel restore`: " + (why_restore.splitlines() or ["?"])[0])
    if missing:
        return None, "; ".join(missing)
    if has_snap:
        return (lambda sock, d: [keel, "snapshot", "--vm", sock, d]), None
    return (lambda sock, d: [keel, "ctl", "--api-socket", sock, "snapshot", d]), None


class KeelApi:
    def __init__(self, sock):
        self.s = sock
        self.f = sock.makefile("rb")

    def call(self, op):
        self.s.sendall(json.dumps({"op": op}).encode() + b"\n")
        line = self.f.readline()
        if not line:
            raise Failed("the Keel API closed the connection")
        return json.loads(line)

    def close(self):
        self.f.close()
        self.s.close()


class Keel:
    vid, label = "keel", "Keel"

    def __init__(self, keel, snap_argv, assets, cmdline, tmp, log_dir, timeout, snap_timeout):
        self.keel, self.snap_argv = keel, snap_argv
        self.assets, self.cmdline, self.tmp = assets, cmdline, tmp
        self.log_dir, self.timeout, self.snap_timeout = log_dir, timeout, snap_timeout

    def boot_argv(self, mem, sock):
        return [self.keel, "run", "--kernel", self.assets["KEEL_VMLINUX"],
                "--initrd", self.assets["KEEL_INITRD_TINY"], "--cmdline", self.cmdline,
                "--cpus", "1", "--memory", f"{mem >> 20}M", "--no-host-quirks",
                "--api-socket", sock]

    def boot(self, mem, tag):
        sock = os.path.join(self.tmp, f"{tag}.sock")
        proc = Proc(self.boot_argv(mem, sock), os.path.join(self.log_dir, f"{tag}-boot.log"))
        vm = {"proc": proc, "sock": sock}
        try:
            vm["t_boot"] = boot_guest(proc, self.timeout)
        except Failed:
            proc.kill()
            raise
        return vm

    def snapshot(self, vm, snapdir, res):
        argv = self.snap_argv(vm["sock"], snapdir)
        t0 = time.monotonic()
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=self.snap_timeout)
        t1 = time.monotonic()
        vm["proc"].note(f"{shlex.join(argv)}: exit {r.returncode} after {t1 - t0:.4f} s; "
                        f"stdout {r.stdout.strip()!r}; stderr {r.stderr.strip()!r}")
        if r.returncode != 0:
            raise Failed(f"keel snapshot exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
        fsync_tree(snapdir)
        t2 = time.monotonic()
        res["t_snap_complete"], res["t_snap"] = t1 - t0, t2 - t0
        m = re.search(r"(?:paused|downtime)[^\n]*?(\d+(?:\.\d+)?)\s*ms", r.stdout + r.stderr,
                      re.IGNORECASE)
        if m:
            res["downtime"], res["downtime_kind"] = float(m.group(1)) / 1000, "reported"
        else:
            res["downtime"], res["downtime_kind"] = t1 - t0, "upper bound"

    def restore(self, snapdir, tag, res):
        sock = os.path.join(self.tmp, f"{tag}.sock")
        proc = Proc([self.keel, "restore", snapdir, "--api-socket", sock],
                    os.path.join(self.log_dir, f"{tag}-restore.log"))
        vm = {"proc": proc, "sock": sock}
        s = wait_socket(sock, proc, self.snap_timeout)
        if s is None:
            proc.kill()
            raise Failed(f"keel restore: no API socket ({proc.tail_err()})")
        api = KeelApi(s)
        deadline = time.monotonic() + self.snap_timeout
        try:
            while True:
                reply = api.call("info")
                info = (reply.get("result") or {}).get("info") or {}
                if reply.get("ok") and info.get("state") == "running":
                    res["t_restore"] = proc.since()
                    break
                if time.monotonic() > deadline or not proc.alive():
                    raise Failed(f"keel restore: not running (last reply {reply}; "
                                 f"{proc.tail_err()})")
                time.sleep(POLL_S)
            res["rss_restore"] = rss_mib(proc.p.pid)
            if info.get("vmm_rss_bytes"):
                res["rss_restore_api"] = info["vmm_rss_bytes"] / 2**20
            # Keel's memory arrives on first use; its checker checks the rest beside the
            # guest. Wait for that (a few seconds at most) and note what had come in by then.
            while True:
                pager = (api.call("info").get("result") or {}).get("info", {}).get("memory_pager")
                if not pager:
                    break
                if pager.get("checked_in_us") is not None:
                    res["t_check"] = pager["checked_in_us"] / 1e6
                    res["pager_chunks"] = pager["chunks_loaded"]
                    res["pager_mib"] = pager["bytes_copied"] / 2**20
                    res["pager_busy"] = pager["busy_us"] / 1e6
                    break
                if time.monotonic() > deadline or not proc.alive():
                    break
                time.sleep(0.01)
        except (OSError, ValueError, Failed) as e:
            proc.kill()
            raise Failed(str(e))
        finally:
            api.close()
        time.sleep(0.05)  # let a "restored ... in N ms" line arrive
        m = re.search(rb"restored[^\n]*?(\d+(?:\.\d+)?)\s*ms", bytes(proc.err) + bytes(proc.out))
        if m:
            res["t_restore_reported"] = float(m.group(1)) / 1000
        return vm

    def stop(self, vm):
        vm["proc"].kill()


# --------------------------------------------------------------------------- QEMU --

class Qmp:
    def __init__(self, sock):
        self.s = sock
        self.f = sock.makefile("rb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise Failed("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, fds=None, **args):
        data = json.dumps({"execute": name, "arguments": args} if args
                          else {"execute": name}).encode()
        if fds:
            socket.send_fds(self.s, [data], fds)
        else:
            self.s.sendall(data)
        r = self._read()
        if "error" in r:
            raise Failed(f"QMP {name}: {r['error'].get('desc', r['error'])}")
        return r.get("return")

    def close(self):
        self.f.close()
        self.s.close()


class Qemu:
    vid, label = "qemu-microvm", "QEMU -M microvm"

    def __init__(self, qemu, assets, cmdline, tmp, log_dir, timeout, snap_timeout):
        self.qemu, self.assets, self.cmdline, self.tmp = qemu, assets, cmdline, tmp
        self.log_dir, self.timeout, self.snap_timeout = log_dir, timeout, snap_timeout

    def argv(self, mem, sock):
        return [self.qemu, "-M", "microvm", "-enable-kvm", "-nographic", "-nodefaults",
                "-serial", "stdio", "-no-reboot", "-m", f"{mem >> 20}M", "-smp", "1",
                "-kernel", self.assets["KEEL_VMLINUX"], "-initrd",
                self.assets["KEEL_INITRD_TINY"], "-append", self.cmdline,
                "-qmp", f"unix:{sock},server=on,wait=off"]

    def _connect(self, proc, sock):
        s = wait_socket(sock, proc, self.snap_timeout)
        if s is None:
            raise Failed(f"no QMP socket ({proc.tail_err()})")
        return Qmp(s)

    def boot(self, mem, tag):
        sock = os.path.join(self.tmp, f"{tag}.qmp")
        proc = Proc(self.argv(mem, sock), os.path.join(self.log_dir, f"{tag}-boot.log"))
        vm = {"proc": proc, "mem": mem}
        try:
            vm["t_boot"] = boot_guest(proc, self.timeout)
            vm["qmp"] = self._connect(proc, sock)
        except Failed:
            proc.kill()
            raise
        return vm

    def snapshot(self, vm, snapdir, res):
        qmp, proc = vm["qmp"], vm["proc"]
        os.mkdir(snapdir)
        path = os.path.join(snapdir, "vmstate")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            t0 = time.monotonic()
            qmp.cmd("stop")
            qmp.cmd("getfd", fds=[fd], fdname="snap")
            qmp.cmd("migrate", uri="fd:snap")
            deadline = t0 + self.snap_timeout
            while True:
                st = qmp.cmd("query-migrate")
                if st.get("status") == "completed":
                    break
                if st.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise Failed(f"migrate: {st.get('status')} {st.get('error-desc', '')}")
                time.sleep(POLL_S)
            t1 = time.monotonic()
            fsync_tree(snapdir)
            t2 = time.monotonic()
            qmp.cmd("cont")
            while qmp.cmd("query-status").get("status") != "running":
                time.sleep(POLL_S)
            t3 = time.monotonic()
        finally:
            os.close(fd)
        proc.note(f"snapshot: complete {t1 - t0:.4f} s, durable {t2 - t0:.4f} s, "
                  f"running again {t3 - t0:.4f} s; query-migrate {json.dumps(st)}")
        res["t_snap_complete"], res["t_snap"] = t1 - t0, t2 - t0
        res["downtime"], res["downtime_kind"] = t3 - t0, "measured"

    def restore(self, snapdir, tag, res):
        sock = os.path.join(self.tmp, f"{tag}.qmp")
        fd = os.open(os.path.join(snapdir, "vmstate"), os.O_RDONLY)
        try:
            proc = Proc(self.argv(res["mem"], sock) + ["-incoming", f"fd:{fd}"],
                        os.path.join(self.log_dir, f"{tag}-restore.log"), pass_fds=(fd,))
        finally:
            os.close(fd)
        vm = {"proc": proc, "mem": res["mem"]}
        try:
            qmp = vm["qmp"] = self._connect(proc, sock)
            deadline = time.monotonic() + self.snap_timeout
            sent_cont = False
            while True:
                status = qmp.cmd("query-status").get("status")
                if status == "running":
                    res["t_restore"] = proc.since()
                    break
                if status not in ("inmigrate", "prelaunch") and not sent_cont:
                    proc.note(f"incoming migration done ({status}): cont")
                    qmp.cmd("cont")
                    sent_cont = True
                    continue
                if status in ("internal-error", "shutdown", "guest-panicked"):
                    raise Failed(f"restored VM is {status}")
                if time.monotonic() > deadline or not proc.alive():
                    mig = qmp.cmd("query-migrate") if proc.alive() else {}
                    raise Failed(f"not running after restore (status {status}, migration "
                                 f"{mig.get('status')}; {proc.tail_err()})")
                time.sleep(POLL_S)
            res["rss_restore"] = rss_mib(proc.p.pid)
        except (OSError, ValueError, Failed) as e:
            proc.kill()
            raise Failed(f"{e} ({proc.tail_err(200)})" if not isinstance(e, Failed) else str(e))
        return vm

    def stop(self, vm):
        if vm.get("qmp"):
            vm["qmp"].close()
        vm["proc"].kill()


# -------------------------------------------------------------------- Firecracker --

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Firecracker:
    """Firecracker's snapshot API (v1.x; run with v1.17.0-dev on this host, 2026-11-25)."""
    vid, label = "firecracker", "Firecracker"

    def __init__(self, fc, assets, cmdline, tmp, log_dir, timeout, snap_timeout):
        self.fc, self.assets, self.cmdline, self.tmp = fc, assets, cmdline, tmp
        self.log_dir, self.timeout, self.snap_timeout = log_dir, timeout, snap_timeout

    def api(self, sock, method, url, body=None):
        c = UnixHTTP(sock, self.snap_timeout)
        try:
            c.request(method, url, body=json.dumps(body) if body is not None else None,
                      headers={"Content-Type": "application/json", "Accept": "application/json"})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        if r.status >= 300:
            raise Failed(f"{method} {url}: HTTP {r.status} {data.decode(errors='replace')}")
        return json.loads(data) if data.strip() else None

    def boot(self, mem, tag):
        sock = os.path.join(self.tmp, f"{tag}.sock")
        cfg = os.path.join(self.tmp, f"{tag}.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": self.assets["KEEL_VMLINUX"],
                                       "initrd_path": self.assets["KEEL_INITRD_TINY"],
                                       "boot_args": self.cmdline},
                       "drives": [],
                       "machine-config": {"vcpu_count": 1, "mem_size_mib": mem >> 20}}, f)
        proc = Proc([self.fc, "--api-sock", sock, "--config-file", cfg],
                    os.path.join(self.log_dir, f"{tag}-boot.log"))
        vm = {"proc": proc, "sock": sock}
        try:
            vm["t_boot"] = boot_guest(proc, self.timeout)
        except Failed:
            proc.kill()
            raise
        return vm

    def snapshot(self, vm, snapdir, res):
        os.mkdir(snapdir)
        t0 = time.monotonic()
        self.api(vm["sock"], "PATCH", "/vm", {"state": "Paused"})
        self.api(vm["sock"], "PUT", "/snapshot/create",
                 {"snapshot_type": "Full", "snapshot_path": os.path.join(snapdir, "vmstate"),
                  "mem_file_path": os.path.join(snapdir, "memory")})
        t1 = time.monotonic()
        fsync_tree(snapdir)
        t2 = time.monotonic()
        self.api(vm["sock"], "PATCH", "/vm", {"state": "Resumed"})
        t3 = time.monotonic()
        res["t_snap_complete"], res["t_snap"] = t1 - t0, t2 - t0
        res["downtime"], res["downtime_kind"] = t3 - t0, "measured"

    def restore(self, snapdir, tag, res):
        sock = os.path.join(self.tmp, f"{tag}.sock")
        proc = Proc([self.fc, "--api-sock", sock],
                    os.path.join(self.log_dir, f"{tag}-restore.log"))
        vm = {"proc": proc, "sock": sock}
        try:
            s = wait_socket(sock, proc, self.snap_timeout)
            if s is None:
                raise Failed(f"no API socket ({proc.tail_err()})")
            s.close()
            self.api(sock, "PUT", "/snapshot/load",
                     {"snapshot_path": os.path.join(snapdir, "vmstate"),
                      "mem_backend": {"backend_type": "File",
                                      "backend_path": os.path.join(snapdir, "memory")},
                      "resume_vm": True})
            deadline = time.monotonic() + self.snap_timeout
            while (self.api(sock, "GET", "/") or {}).get("state") != "Running":
                if time.monotonic() > deadline:
                    raise Failed("not Running after /snapshot/load")
                time.sleep(POLL_S)
            res["t_restore"] = proc.since()
            res["rss_restore"] = rss_mib(proc.p.pid)
        except (OSError, ValueError, Failed) as e:
            proc.kill()
            raise Failed(str(e))
        return vm

    def stop(self, vm):
        vm["proc"].kill()
