//! Snapshots, restores and rollbacks end to end (issue 5), on the guest kit's `snapcount`
//! guest: a counter in guest memory, ticking at 10 Hz, each count written to a disk sector
//! and the previous one read back and checked, the TSC printed and checked to move forward.
//! Reported ignored, loudly, without a usable /dev/kvm.

#[allow(dead_code)]
mod support;

use keel_guest_kit::{check_snapcount_disk, parse_snapcount_line, KitImage};
use libtest_mimic::{Arguments, Failed, Trial};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SLOTS: u64 = 32;
const KEY: &[u8] = b"the operator's snapshot key";

/// What a running guest printed.
enum Line {
    Count(u64, u64),
    Fail(String),
}

/// A `keel run` or `keel restore` with its console read on a thread.
struct Vm {
    child: Child,
    rx: mpsc::Receiver<Line>,
    api: PathBuf,
    /// (count, tsc) seen so far.
    seen: Vec<(u64, u64)>,
}

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

impl Vm {
    fn spawn(mut cmd: Command, api: PathBuf) -> Result<Vm, Failed> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let msg = if let Some((c, t)) = parse_snapcount_line(&line) {
                    Line::Count(c, t)
                } else if line.contains("KIT-FAIL") || line.contains("lost write") {
                    Line::Fail(line)
                } else {
                    continue;
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok(Vm {
            child,
            rx,
            api,
            seen: Vec::new(),
        })
    }

    /// A new VM running snapcount on `disk`.
    fn run(dir: &support::Scratch, name: &str, disk: &Path) -> Result<Vm, Failed> {
        let api = dir.path(&format!("{name}.sock"));
        let mut cmd = keel();
        cmd.args(["run", "--kernel"])
            .arg(KitImage::PvhElf.path())
            .args(["--cmdline", &format!("test=snapcount secs=0 slots={SLOTS}")])
            .args(["--memory", "64M", "--cpus", "2", "--shutdown-timeout", "0"])
            .arg("--disk")
            .arg(format!("path={},format=raw", disk.display()))
            .arg("--api-socket")
            .arg(&api);
        Vm::spawn(cmd, api)
    }

    /// A VM restored from `snap`.
    fn restore(
        dir: &support::Scratch,
        name: &str,
        snap: &Path,
        key: Option<&Path>,
    ) -> Result<Vm, Failed> {
        let api = dir.path(&format!("{name}.sock"));
        let mut cmd = keel();
        cmd.arg("restore").arg(snap).arg("--api-socket").arg(&api);
        if let Some(k) = key {
            cmd.arg("--snapshot-key").arg(k);
        }
        Vm::spawn(cmd, api)
    }

    /// Waits for count `want` (or later); fails on a guest failure line.
    fn wait_count(&mut self, want: u64, within: Duration) -> Result<u64, Failed> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Line::Count(c, t)) => {
                    self.seen.push((c, t));
                    if c >= want {
                        return Ok(c);
                    }
                }
                Ok(Line::Fail(l)) => return Err(format!("the guest failed: {l}").into()),
                Err(_) => {
                    return Err(format!(
                        "no count {want} within {within:?} (last {:?})",
                        self.seen.last()
                    )
                    .into())
                }
            }
        }
    }

    /// Counts printed so far without waiting.
    fn drain(&mut self) -> Result<(), Failed> {
        while let Ok(l) = self.rx.try_recv() {
            match l {
                Line::Count(c, t) => self.seen.push((c, t)),
                Line::Fail(l) => return Err(format!("the guest failed: {l}").into()),
            }
        }
        Ok(())
    }

    fn first(&self) -> Option<(u64, u64)> {
        self.seen.first().copied()
    }

    /// SIGKILLs `keel` (its jailed VMM dies with it) and returns its stderr.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        self.child
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }
}

/// `keel snapshot --vm API DIR`; its stderr.
fn snapshot(vm: &Vm, dir: &Path, key: Option<&Path>) -> Result<String, Failed> {
    let mut cmd = keel();
    cmd.arg("snapshot").arg("--vm").arg(&vm.api).arg(dir);
    if let Some(k) = key {
        cmd.arg("--snapshot-key").arg(k);
    }
    let o = cmd.output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() {
        return Err(format!("keel snapshot failed ({:?}): {err}", o.status).into());
    }
    Ok(err)
}

fn zeroed_disk(dir: &support::Scratch) -> Result<PathBuf, Failed> {
    let p = dir.path("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    Ok(p)
}

fn sha256(bytes: &[u8]) -> String {
    keel_snapshot::sha256_hex(bytes)
}

/// The disk as a snapshot's chain holds it (base image and frozen layers), read whole.
fn chain_contents(snap: &Path, base: &Path) -> Result<Vec<u8>, Failed> {
    let disks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("disks.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let layers = disks["disks"][0]["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (path, format) = match layers.last().and_then(|l| l.as_str()) {
        Some(top) => (snap.join(top), keel_block::ImageFormat::Qcow2),
        None => (base.to_path_buf(), keel_block::ImageFormat::Raw),
    };
    let img = keel_block::open_image(
        &path,
        &keel_block::OpenOptions {
            format: Some(format),
            read_only: true,
            direct: false,
        },
    )
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Line 1 of the Done-when: snapshot, kill, restore in a fresh process; the counter goes on,
/// the sectors written before the snapshot are on the disk, the clock moves forward.
fn kill_and_restore() -> Result<(), Failed> {
    let dir = support::Scratch::new("snap-restore")?;
    let disk = zeroed_disk(&dir)?;
    let mut src = Vm::run(&dir, "src", &disk)?;
    let before = src.wait_count(15, Duration::from_secs(30))?;
    let snap = dir.path("snap");
    let said = snapshot(&src, &snap, None)?;
    src.wait_count(before + 5, Duration::from_secs(10))?;
    let src_err = src.kill();

    let mut restored = Vm::restore(&dir, "restored", &snap, None)?;
    let resumed_at = restored.wait_count(1, Duration::from_secs(30))?;
    let (first, first_tsc) = restored.first().ok_or("no count after restore")?;
    if first <= before {
        return Err(format!(
            "after the restore the counter went back to {first} (it was past {before} before the snapshot)"
        )
        .into());
    }
    let at_snapshot = first - 1;
    let target = first + 10;
    restored.wait_count(target, Duration::from_secs(20))?;
    restored.drain()?;
    let counts: Vec<u64> = restored.seen.iter().map(|&(c, _)| c).collect();
    if counts.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!("restored counts are not consecutive: {counts:?}").into());
    }
    let tscs: Vec<u64> = restored.seen.iter().map(|&(_, t)| t).collect();
    if tscs.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!("the restored guest's clock went back: {tscs:?}").into());
    }
    let err = restored.kill();
    if err.contains("panicked") || src_err.contains("panicked") {
        return Err(format!("a VMM panicked:\n{src_err}\n{err}").into());
    }
    // The image the VM started on is the snapshot's frozen disk: every count up to the
    // snapshot, nothing after it.
    let image = std::fs::read(&disk).map_err(|e| e.to_string())?;
    check_snapcount_disk(&image, at_snapshot, SLOTS)
        .map_err(|e| format!("the snapshot's disk (count {at_snapshot}): {e}"))?;
    eprintln!(
        "snapshot after count {before} ({}); restored guest went on at count {first} \
         (tsc {first_tsc}), reached {target}; disk holds counts 1..={at_snapshot}; first \
         count seen {resumed_at}",
        said.trim()
    );
    Ok(())
}

/// Line 2: A, then more writes, then B, then more writes; restoring A gives A's disk exactly
/// (and the guest, checking its previous sector each tick, agrees), twice; then B restores.
fn rollback_in_any_order() -> Result<(), Failed> {
    let dir = support::Scratch::new("snap-rollback")?;
    let disk = zeroed_disk(&dir)?;
    let mut src = Vm::run(&dir, "src", &disk)?;
    src.wait_count(8, Duration::from_secs(30))?;
    let (a, b) = (dir.path("A"), dir.path("B"));
    snapshot(&src, &a, None)?;
    let after_a = src.wait_count(0, Duration::from_secs(5))?;
    src.wait_count(after_a + 12, Duration::from_secs(10))?;
    snapshot(&src, &b, None)?;
    let after_b = src.wait_count(0, Duration::from_secs(5))?;
    src.wait_count(after_b + 12, Duration::from_secs(10))?;
    src.kill();
    let a_sum = sha256(&chain_contents(&a, &disk)?);
    let b_sum = sha256(&chain_contents(&b, &disk)?);
    if a_sum == b_sum {
        return Err("snapshots A and B hold the same disk".into());
    }
    let mut firsts = Vec::new();
    for (name, snap, sum) in [("a1", &a, &a_sum), ("a2", &a, &a_sum), ("b1", &b, &b_sum)] {
        let mut vm = Vm::restore(&dir, name, snap, None)?;
        let first = vm.wait_count(1, Duration::from_secs(30))?;
        // Ten ticks: each reads back the sector written before it.
        vm.wait_count(first + 10, Duration::from_secs(20))?;
        vm.drain()?;
        let err = vm.kill();
        if err.contains("panicked") {
            return Err(format!("{name}: a VMM panicked:\n{err}").into());
        }
        // The snapshot's disk is unchanged by the VM restored from it.
        let now = sha256(&chain_contents(snap, &disk)?);
        if &now != sum {
            return Err(
                format!("{name}: the snapshot's disk changed while a VM ran from it").into(),
            );
        }
        let image = chain_contents(snap, &disk)?;
        check_snapcount_disk(&image, first - 1, SLOTS)
            .map_err(|e| format!("{name}: the disk at count {}: {e}", first - 1))?;
        firsts.push((name, first));
    }
    if firsts[0].1 != firsts[1].1 || firsts[2].1 <= firsts[0].1 {
        return Err(format!("restores went on from {firsts:?}").into());
    }
    eprintln!("A = count {}, B = count {}; A restored twice and B once, each from its own disk ({:.12}…, {:.12}…)", firsts[0].1 - 1, firsts[2].1 - 1, a_sum, b_sum);
    // A snapshot of a VM restored from A: its chain holds A's layers as links of its own.
    let c = dir.path("C");
    let mut from_a = Vm::restore(&dir, "from-a", &a, None)?;
    let first = from_a.wait_count(1, Duration::from_secs(30))?;
    from_a.wait_count(first + 5, Duration::from_secs(20))?;
    snapshot(&from_a, &c, None)?;
    from_a.kill();
    // Deleting A leaves B and C whole.
    let o = keel()
        .args(["snapshot", "--delete"])
        .arg(&a)
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() || a.exists() {
        return Err(format!("delete A: {}", String::from_utf8_lossy(&o.stderr)).into());
    }
    for (name, snap) in [("b2", &b), ("c1", &c)] {
        let mut vm = Vm::restore(&dir, name, snap, None)?;
        let first = vm.wait_count(1, Duration::from_secs(30))?;
        vm.wait_count(first + 5, Duration::from_secs(20))?;
        let err = vm.kill();
        if err.contains("panicked") {
            return Err(format!("{name}: a VMM panicked:\n{err}").into());
        }
        let image = chain_contents(snap, &disk)?;
        check_snapcount_disk(&image, first - 1, SLOTS).map_err(|e| {
            format!(
                "{name} after A was deleted: the disk at count {}: {e}",
                first - 1
            )
        })?;
    }
    Ok(())
}

/// Line 3: one snapshot restored ten times side by side: ten running VMs, each writing its own
/// overlay.
fn ten_clones() -> Result<(), Failed> {
    let dir = support::Scratch::new("snap-clones")?;
    let disk = zeroed_disk(&dir)?;
    let mut src = Vm::run(&dir, "src", &disk)?;
    src.wait_count(5, Duration::from_secs(30))?;
    let snap = dir.path("S");
    snapshot(&src, &snap, None)?;
    src.kill();
    let before: Vec<PathBuf> = overlays(&disk);
    let mut clones = Vec::new();
    for i in 0..10 {
        clones.push(Vm::restore(&dir, &format!("clone{i}"), &snap, None)?);
    }
    let mut firsts = Vec::new();
    for c in clones.iter_mut() {
        let first = c.wait_count(1, Duration::from_secs(60))?;
        c.wait_count(first + 5, Duration::from_secs(60))?;
        firsts.push(first);
    }
    let pids: std::collections::BTreeSet<u32> = clones.iter().map(|c| c.child.id()).collect();
    let made: Vec<PathBuf> = overlays(&disk)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    for c in clones {
        let err = c.kill();
        if err.contains("panicked") {
            return Err(format!("a clone's VMM panicked:\n{err}").into());
        }
    }
    if pids.len() != 10 || made.len() != 10 || firsts.iter().any(|&f| f != firsts[0]) {
        return Err(format!(
            "{} processes, {} overlays, first counts {firsts:?}",
            pids.len(),
            made.len()
        )
        .into());
    }
    eprintln!(
        "10 clones ran side by side from count {}, each on its own overlay",
        firsts[0]
    );
    Ok(())
}

fn overlays(disk: &Path) -> Vec<PathBuf> {
    let name = disk.file_name().unwrap().to_string_lossy().into_owned();
    let mut v: Vec<PathBuf> = std::fs::read_dir(disk.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("{name}.")) && n.ends_with(".qcow2")
        })
        .collect();
    v.sort();
    v
}

/// Line 4: each bad snapshot is refused with its own message and exit status 2.
fn bad_snapshots_are_refused() -> Result<(), Failed> {
    let dir = support::Scratch::new("snap-bad")?;
    let disk = zeroed_disk(&dir)?;
    let key = dir.path("key");
    std::fs::write(&key, KEY).map_err(|e| e.to_string())?;
    let wrong_key = dir.path("wrong-key");
    std::fs::write(&wrong_key, b"not the key").map_err(|e| e.to_string())?;
    let mut src = Vm::run(&dir, "src", &disk)?;
    src.wait_count(3, Duration::from_secs(30))?;
    let plain = dir.path("plain");
    let keyed = dir.path("keyed");
    snapshot(&src, &plain, None)?;
    snapshot(&src, &keyed, Some(&key))?;
    src.kill();

    let copy = |from: &Path, to: &str| -> Result<PathBuf, Failed> {
        let d = dir.path(to);
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        for e in std::fs::read_dir(from)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            std::fs::copy(e.path(), d.join(e.file_name())).map_err(|e| e.to_string())?;
        }
        Ok(d)
    };
    let edit_manifest = |d: &Path, f: &dyn Fn(&mut serde_json::Value)| -> Result<(), Failed> {
        let p = d.join("snapshot.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    let flip = |p: &Path, at: Option<usize>| -> Result<(), Failed> {
        let mut b = std::fs::read(p).map_err(|e| e.to_string())?;
        // A byte inside data: the first non-zero one, or `at`.
        let i = at.unwrap_or_else(|| b.iter().position(|&x| x != 0).unwrap_or(0));
        b[i] ^= 0x20;
        std::fs::write(p, &b).map_err(|e| e.to_string())?;
        Ok(())
    };

    let corrupted = copy(&plain, "corrupted")?;
    flip(&corrupted.join("memory"), None)?;
    let truncated = copy(&plain, "truncated")?;
    let st = truncated.join("state.json");
    let len = std::fs::metadata(&st).map_err(|e| e.to_string())?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .and_then(|f| f.set_len(len / 2))
        .map_err(|e| e.to_string())?;
    let version = copy(&plain, "version")?;
    edit_manifest(&version, &|v| v["version"] = 99.into())?;
    let tampered = copy(&keyed, "tampered")?;
    // Rewrite a state byte and fix its checksum: only the key can tell.
    let st = tampered.join("state.json");
    let mut text = std::fs::read_to_string(&st).map_err(|e| e.to_string())?;
    text = text.replacen("\"vcpus\":2", "\"vcpus\":1", 1);
    std::fs::write(&st, &text).map_err(|e| e.to_string())?;
    let sum = sha256(text.as_bytes());
    let size = text.len();
    edit_manifest(&tampered, &|v| {
        for p in v["parts"].as_array_mut().unwrap() {
            if p["name"] == "state.json" {
                p["digest"] = sum.clone().into();
                p["size"] = size.into();
            }
        }
    })?;
    // Chunk digests that do not make the memory part's digest (state re-checksummed, no
    // key): refused before any VMM starts.
    let chunks = copy(&plain, "chunks")?;
    let st = chunks.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&st).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    state["memory_chunks"][0] = "00".repeat(32).into();
    let text = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    std::fs::write(&st, &text).map_err(|e| e.to_string())?;
    let (sum, size) = (sha256(&text), text.len());
    edit_manifest(&chunks, &|v| {
        for p in v["parts"].as_array_mut().unwrap() {
            if p["name"] == "state.json" {
                p["digest"] = sum.clone().into();
                p["size"] = size.into();
            }
        }
    })?;
    let not_a_snapshot = dir.path("empty");
    std::fs::create_dir_all(&not_a_snapshot).map_err(|e| e.to_string())?;

    let cases: Vec<(&str, PathBuf, Option<&Path>, &str)> = vec![
        ("corrupted", corrupted, None, "is corrupted"),
        ("truncated", truncated, None, "is truncated"),
        (
            "chunk digests edited",
            chunks,
            None,
            "do not make its digest",
        ),
        (
            "wrong version",
            version,
            None,
            "version 99 is not supported",
        ),
        ("tampered", tampered, Some(&key), "tampered"),
        ("wrong key", keyed.clone(), Some(&wrong_key), "tampered"),
        ("key missing", keyed.clone(), None, "give the key"),
        (
            "key not expected",
            plain.clone(),
            Some(&key),
            "not authenticated",
        ),
        (
            "not a snapshot",
            not_a_snapshot,
            None,
            "not a Keel snapshot",
        ),
    ];
    let mut report = Vec::new();
    for (what, d, k, want) in &cases {
        let mut cmd = keel();
        cmd.arg("restore").arg(d);
        if let Some(k) = k {
            cmd.arg("--snapshot-key").arg(k);
        }
        let o = cmd.output().map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(2) || !err.contains(want) {
            return Err(format!("{what}: status {:?}, stderr: {err}", o.status).into());
        }
        report.push(format!("{what}: {}", err.trim()));
    }
    // The good keyed snapshot restores with its key; a changed base image is refused.
    let mut vm = Vm::restore(&dir, "keyed", &keyed, Some(&key))?;
    let first = vm.wait_count(1, Duration::from_secs(30))?;
    vm.wait_count(first + 3, Duration::from_secs(10))?;
    vm.kill();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .map_err(|e| e.to_string())?;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[1], 1000).map_err(|e| e.to_string())?;
    let o = keel()
        .arg("restore")
        .arg(&plain)
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(2) || !err.contains("changed since the snapshot") {
        return Err(format!("changed base image: status {:?}, stderr: {err}", o.status).into());
    }
    report.push(format!("base image changed: {}", err.trim()));
    eprintln!("{}", report.join("\n"));
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test(
            "snapshot_kill_restore_goes_on_where_it_was",
            kill_and_restore,
        ),
        Trial::test(
            "restore_rolls_the_disk_back_in_any_order",
            rollback_in_any_order,
        ),
        Trial::test("ten_clones_of_one_snapshot_run_side_by_side", ten_clones),
        Trial::test(
            "bad_snapshots_are_refused_with_their_own_message",
            bad_snapshots_are_refused,
        ),
    ];
    let host = support::Host::probe();
    let trials = support::skip_all(trials, "snapshot tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
