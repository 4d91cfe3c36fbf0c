"""(snap) snapshot and restore of an idle guest: the `snap` part of bench/run.py.

The guest is (b)'s (Keel test kernel + initramfs-tiny.cpio.gz, 1 vCPU) with `keel_exit=halt`,
booted until `KEEL-INIT-OK` and `reboot: System halted`: an idle guest that stays up. One boot
serves several cycles of: snapshot (the VM keeps running, or is resumed) -> SIGKILL the VMM ->
restore in a fresh VMM process -> measure; the restored VM is the next cycle's source.
Measured: snapshot time (request -> complete -> the bench's fsync of the files), size on disk,
downtime, restore -> running (spawn -> the VMM says running, polled every 1 ms) and the VMM's
RSS then. Keel (`keel snapshot --vm S DIR`, `keel restore DIR --api-socket S2`), QEMU (QMP:
`stop` + `migrate` to an fd, `-incoming fd:N` + `cont`) and Firecracker (FIRECRACKER_BIN;
/snapshot/create, /snapshot/load). See bench/README.md. Python standard library only.
"""

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile

from snapvmms import Failed, Firecracker, Keel, Qemu, disk_usage, keel_verbs

DEFAULT_SIZES = "256M,2G"


def add_arguments(ap):
    g = ap.add_argument_group("snap (snapshot and restore of an idle guest)")
    g.add_argument("--runs-snap", type=int,
                   help="boots per VMM and guest size for snap (default: --runs if given, else 2)")
    g.add_argument("--snap-cycles", type=int, default=3,
                   help="snapshot/restore cycles per boot (default 3)")
    g.add_argument("--snap-sizes", default=DEFAULT_SIZES,
                   help=f"guest memory sizes, comma-separated (default {DEFAULT_SIZES})")
    g.add_argument("--snap-timeout", type=float, default=120,
                   help="give up on one snapshot or restore after this many s (default 120)")


def parse_size(s):
    m = re.fullmatch(r"(\d+)([MG])", s.strip().upper())
    if not m:
        raise ValueError(f"bad size {s!r} (use e.g. 256M or 2G)")
    return int(m.group(1)) << (20 if m.group(2) == "M" else 30)


def size_label(nbytes):
    return f"{nbytes >> 30} GiB" if nbytes % (1 << 30) == 0 else f"{nbytes >> 20} MiB"


# ------------------------------------------------------------------------ running --

def session(vmm, mem, run, cycles, tmp, log):
    """One boot of vmm with mem bytes, then `cycles` snapshot/restore cycles."""
    tag = f"snap-{vmm.vid}-{mem >> 20}M-{run}"
    base = {"vmm": vmm.vid, "mem": mem, "run": run, "ok": False}
    log(f"(snap) {vmm.label} {size_label(mem)} run {run}: booting")
    try:
        vm = vmm.boot(mem, tag)
    except (Failed, OSError, ValueError) as e:
        log(f"(snap) {vmm.label} {size_label(mem)} run {run}: boot FAILED: {e}")
        return [dict(base, cycle=0, error=f"boot: {e}")]
    results, dirs = [], []
    try:
        for c in range(1, cycles + 1):
            res = dict(base, cycle=c, t_boot=vm.get("t_boot"))
            results.append(res)
            snapdir = os.path.join(tmp, f"{tag}-c{c}")
            try:
                if not vm["proc"].alive():
                    raise Failed(f"the VMM exited before the snapshot "
                                 f"({vm['proc'].tail_err(200)})")
                vmm.snapshot(vm, snapdir, res)
                res["disk_alloc"], res["disk_apparent"] = disk_usage(snapdir)
            except (Failed, OSError, ValueError, subprocess.SubprocessError) as e:
                res["error"] = f"snapshot: {e}"
                if os.path.isdir(snapdir):
                    dirs.append(snapdir)
                break
            finally:
                vmm.stop(vm)
                vm = None
            # The previous snapshot may back the VM just stopped (lazily mapped memory).
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            dirs = [snapdir]
            try:
                vm = vmm.restore(snapdir, f"{tag}-c{c}", res)
                res["ok"] = True
            except (Failed, OSError, ValueError, subprocess.SubprocessError) as e:
                res["error"] = f"restore: {e}"
                break
            finally:
                log(f"(snap) {vmm.label} {size_label(mem)} run {run} cycle {c}: "
                    f"snapshot {ms(res.get('t_snap'))} ms (downtime {ms(res.get('downtime'))} "
                    f"ms, {res.get('downtime_kind', '?')}), "
                    f"{fmt(res.get('disk_alloc'), 1)}/{fmt(res.get('disk_apparent'), 1)} MiB; "
                    f"restore→running {ms(res.get('t_restore'))} ms, RSS "
                    f"{fmt(res.get('rss_restore'), 1)} MiB"
                    + (f" — FAILED: {res['error']}" if res.get("error") else ""))
        if vm is not None and not vm["proc"].alive() and results:
            results[-1]["ok"] = False
            results[-1]["error"] = f"the restored VMM exited ({vm['proc'].tail_err(200)})"
    finally:
        if vm is not None:
            vmm.stop(vm)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return results


def ms(x):
    return "—" if x is None else f"{x * 1000:.1f}"


def fmt(x, nd):
    return "—" if x is None else f"{x:.{nd}f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    """median (min–max) in ms."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{ms(statistics.median(xs))} ({ms(min(xs))}–{ms(max(xs))})"


def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}×"


def measure(args, keel, qemu, assets, cmdline, log, log_dir, cache, pick=None):
    """Runs the snap part; returns its markdown section."""
    sizes = [parse_size(s) for s in args.snap_sizes.split(",") if s.strip()]
    if not sizes:
        raise ValueError("--snap-sizes is empty")
    if args.snap_cycles < 1:
        raise ValueError("--snap-cycles must be at least 1")
    runs = args.runs_snap or (args.runs if getattr(args, "runs_given", False) else 2)
    # The tiny init halts instead of powering off: the guest stays up, idle.
    cmdline = " ".join([t for t in cmdline.split() if not t.startswith("keel_exit=")]
                       + ["keel_exit=halt"])
    tmp = tempfile.mkdtemp(prefix="snap-", dir=cache)  # on disk, not a tmpfs
    try:
        return _measure(args, keel, qemu, assets, cmdline, log, log_dir, tmp, sizes, runs, pick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args, keel, qemu, assets, cmdline, log, log_dir, tmp, sizes, runs, pick):
    common = (assets, cmdline, tmp, log_dir, args.timeout, args.snap_timeout)
    vmms, unavailable = [], {}
    snap_argv, why = keel_verbs(keel)
    kvmm = Keel(keel, snap_argv, *common)
    vmms.append(kvmm)
    if why:
        unavailable[kvmm.vid] = f"not available: {why}"
        log(f"(snap) Keel not available: {why}")
    vmms.append(Qemu(qemu, *common))
    fc = os.environ.get("FIRECRACKER_BIN")
    skipped = []
    if fc and os.access(fc, os.X_OK):
        vmms.append(Firecracker(fc, *common))
    else:
        skipped.append("Firecracker (FIRECRACKER_BIN " + ("is not executable" if fc else "not set")
                       + ")")
    if pick:
        vmms = [v for v in vmms if v.vid in pick]
    results = {(v.vid, m): [] for v in vmms for m in sizes}
    for run in range(1, runs + 1):
        for mem in sizes:
            for v in vmms:  # alternate: every VMM once per size and round
                if v.vid in unavailable:
                    continue
                results[(v.vid, mem)] += session(v, mem, run, args.snap_cycles, tmp, log)
    with open(os.path.join(log_dir, "snap-results.json"), "w") as f:
        json.dump([r for rs in results.values() for r in rs], f, indent=1)
    return report(args, vmms, sizes, runs, results, unavailable, skipped, cmdline, keel, qemu,
                  assets, tmp)


def report(args, vmms, sizes, runs, results, unavailable, skipped, cmdline, keel, qemu, assets,
           tmp):
    out = ["### (snap) snapshot and restore of an idle guest\n"]

    def ok(vid, mem):
        return [r for r in results.get((vid, mem), []) if r["ok"]]

    keel_med = {m: (med([r.get("t_snap") for r in ok("keel", m)]),
                    med([r.get("t_restore") for r in ok("keel", m)])) for m in sizes}
    for mem in sizes:
        out.append(f"**{size_label(mem)} guest**\n")
        head = ["VMM", "snapshot ms", "snapshot ratio to Keel", "downtime ms",
                "restore → running ms", "restore ratio to Keel", "on disk MiB (allocated)",
                "apparent MiB", "RSS after restore MiB", "ok cycles"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in vmms:
            rs, good = results[(v.vid, mem)], ok(v.vid, mem)
            if v.vid in unavailable:
                out.append(f"| {v.label} | {unavailable[v.vid]} |" + " |" * (len(head) - 2))
                continue
            if not good:
                err = next((r.get("error") for r in rs if r.get("error")), "no result")
                out.append(f"| {v.label} | failed: {err.replace('|', '/')} |"
                           + " |" * (len(head) - 2))
                continue
            snaps = [r.get("t_snap") for r in rs if r.get("t_snap") is not None]
            downs = [r.get("downtime") for r in rs if r.get("downtime") is not None]
            kinds = {r.get("downtime_kind") for r in rs if r.get("downtime") is not None}
            down = spread(downs) + (" (≤: upper bound)" if kinds == {"upper bound"} else "")
            row = [v.label, spread(snaps), ratio(med(snaps), keel_med[mem][0]), down,
                   spread([r.get("t_restore") for r in good]),
                   ratio(med([r.get("t_restore") for r in good]), keel_med[mem][1]),
                   fmt(med([r.get("disk_alloc") for r in rs]), 1),
                   fmt(med([r.get("disk_apparent") for r in rs]), 1),
                   fmt(med([r.get("rss_restore") for r in good]), 1),
                   f"{len(good)}/{len(rs)}"]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    lo, hi = min(sizes), max(sizes)
    if lo != hi:
        for v in vmms:
            a, b = (med([r.get("t_restore") for r in ok(v.vid, m)]) for m in (hi, lo))
            line = (f"{v.label} restore {size_label(hi)} / {size_label(lo)} = "
                    + (f"{a / b:.2f}" if a is not None and b else "— (not measured)"))
            out.append(f"- **{line} (target ≤ 1.5)**" if v.vid == "keel" else f"- {line}")
        out.append("")
    errors = [f"- {v.label} {size_label(r['mem'])} run {r['run']} cycle {r['cycle']}: "
              f"{r['error']}" for v in vmms for m in sizes for r in results[(v.vid, m)]
              if r.get("error")]
    if errors:
        out += ["Failures:", *errors, ""]
    checked = {m: [r for r in ok("keel", m) if r.get("t_check") is not None] for m in sizes}
    if any(checked.values()):
        out.append("Keel's memory after a restore (medians): the checker beside the guest "
                   "checked and filled every chunk in "
                   + ", ".join(f"{size_label(m)} {ms(med([r['t_check'] for r in checked[m]]))} ms"
                               for m in sizes if checked[m])
                   + "; by then the guest's faults had brought in "
                   + ", ".join(f"{size_label(m)} {fmt(med([r['pager_chunks'] for r in checked[m]]), 0)} "
                               f"chunks ({fmt(med([r['pager_mib'] for r in checked[m]]), 1)} MiB copied in all, "
                               f"{ms(med([r['pager_busy'] for r in checked[m]]))} ms serving faults)"
                               for m in sizes if checked[m]) + ".\n")
    reported = [r for m in sizes for r in results.get(("keel", m), [])
                if r.get("t_restore_reported") is not None]
    if reported:
        out.append("Keel's own `restored ... in N ms` (median): "
                   + ", ".join(f"{size_label(m)} {ms(med([r['t_restore_reported'] for r in reported if r['mem'] == m]))} ms"
                               for m in sizes) + "\n")
    boots = ["{} {}".format(v.label, " / ".join(
        f"{fmt(med([r.get('t_boot') for r in results[(v.vid, m)]]), 1)} s" for m in sizes))
        for v in vmms if v.vid not in unavailable]
    out.append(
        f"{runs} boot(s) per VMM and size, {args.snap_cycles} snapshot/restore cycles per boot "
        "(each cycle: snapshot, SIGKILL the VMM, restore in a new process; the restored VM is "
        "the next cycle's source); medians (min–max) over the cycles. 1 vCPU; the guest is "
        "idle: (b)'s kernel and tiny init with `keel_exit=halt`, booted until "
        "`reboot: System halted` (boot to `KEEL-INIT-OK`, median, "
        + " / ".join(size_label(m) for m in sizes) + ": " + ", ".join(boots) + "). "
        "Definitions: `bench/README.md` (snap).\n")
    out.append(f"CMDLINE=`{cmdline}`")
    subst = [(assets["KEEL_VMLINUX"], "vmlinux"), (assets["KEEL_INITRD_TINY"],
              "initramfs-tiny.cpio.gz"), (keel, "keel"), (qemu, "qemu-system-x86_64"),
             (tmp, "$TMP")]

    def doc(argv):
        s = shlex.join(argv)
        for path, name in subst:
            s = s.replace(path, name)
        return s.replace(shlex.quote(cmdline), "\"$CMDLINE\"")
    for v in vmms:
        if isinstance(v, Keel):
            out.append(f"- Keel: `{doc(v.boot_argv(sizes[0], 'S'))}`; "
                       "`keel snapshot --vm S DIR`; `keel restore DIR --api-socket S2`")
        elif isinstance(v, Qemu):
            out.append(f"- QEMU: `{doc(v.argv(sizes[0], 'Q'))}`; restore: the same + "
                       "`-incoming fd:N`")
        elif isinstance(v, Firecracker):
            out.append("- Firecracker: `firecracker --api-sock S --config-file CFG`; restore: "
                       "`firecracker --api-sock S2` + `PUT /snapshot/load`")
    if skipped:
        out.append("- Not measured: " + "; ".join(skipped))
    return "\n".join(out)
