//! `keel snapshot`: take a snapshot of a running VM through its API socket, list snapshots,
//! delete one.
//!
//! Taking one: this process (on the host) makes the snapshot directory and the empty files
//! the VMM fills (memory, state) and, for every writable disk, a new qcow2 overlay next to
//! the disk's image, and passes them to the VMM with the request. The VMM saves the machine,
//! freezes each disk's chain and moves the disk onto its overlay. Then this process
//! hard-links the frozen layers into the directory (so deleting any one snapshot never takes
//! a layer from another) and writes the manifest, last.

use keel_api::{
    Client, DiskInfo, FileIdentity, NewOverlay, Request, SnapshotReply, SnapshotRequest,
};
use keel_snapshot::{Manifest, PartKind, Writer};
use keel_vmm::snapshot::format::{
    identity, layer_part, SavedDisk, SavedDisks, SavedVm, DISKS_PART, MEMORY_PART, STATE_PART,
};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The running VM's API socket (`keel run --api-socket PATH`): snapshot it into DIR.
    #[arg(long, value_name = "SOCKET", required_unless_present_any = ["list", "delete"])]
    vm: Option<PathBuf>,
    /// Authenticate the snapshot with the key in FILE (HMAC-SHA256 over its manifest); a
    /// restore then needs the same key and refuses a snapshot changed by anyone without it.
    #[arg(long, value_name = "FILE")]
    snapshot_key: Option<PathBuf>,
    /// List the snapshots in DIR (DIR itself, or the snapshots directly below it).
    #[arg(long, conflicts_with_all = ["vm", "delete"])]
    list: bool,
    /// Delete the snapshot DIR (other snapshots and VMs running from any snapshot keep
    /// their disk layers: each holds its own links).
    #[arg(long, conflicts_with = "vm")]
    delete: bool,
    /// The snapshot directory (must not exist when taking one).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Reads a `--snapshot-key` file.
pub fn read_key(path: &Option<PathBuf>) -> Result<Option<Vec<u8>>, String> {
    let Some(p) = path else { return Ok(None) };
    let key = std::fs::read(p).map_err(|e| format!("--snapshot-key {}: {e}", p.display()))?;
    if key.is_empty() {
        return Err(format!(
            "--snapshot-key {}: the key file is empty",
            p.display()
        ));
    }
    Ok(Some(key))
}

pub fn run(args: SnapshotArgs) -> ExitCode {
    if args.list {
        return list(&args.dir);
    }
    if args.delete {
        return delete(&args.dir);
    }
    let key = match read_key(&args.snapshot_key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(socket) = &args.vm else {
        eprintln!("keel: --vm SOCKET is required");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    match take(socket, &args.dir, key.as_deref()) {
        Ok(r) => {
            eprintln!(
                "keel: snapshot {}: {} MiB of guest memory, guest paused {:.1} ms, took {} ms",
                args.dir.display(),
                r.memory_data_bytes >> 20,
                r.downtime_us as f64 / 1000.0,
                start.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err((code, e)) => {
            eprintln!("keel: snapshot {}: {e}", args.dir.display());
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn usage(e: impl std::fmt::Display) -> Failure {
    (2, e.to_string())
}

fn fail(e: impl std::fmt::Display) -> Failure {
    (1, e.to_string())
}

/// The new overlay for a disk, next to the image it was started on:
/// `<image>.<tag>.<unix ms>-<pid>.qcow2` (clones restored in the same millisecond differ by
/// their process).
pub fn overlay_path(base: &Path, tag: &str) -> PathBuf {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}.{ms}-{}.qcow2", std::process::id()));
    base.with_file_name(name)
}

/// The backing name the header of a new overlay over `disk`'s chain records: the image
/// itself for the first overlay, else the snapshot-directory name of the layer below.
pub fn backing_name(index: usize, base: &Path, keel_layers: usize) -> PathBuf {
    if keel_layers == 0 {
        std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf())
    } else {
        PathBuf::from(layer_part(index, keel_layers))
    }
}

/// Creates an empty overlay file at `path` with a qcow2 header over `backing`.
pub fn create_overlay(
    path: &Path,
    size: u64,
    backing: &Path,
    backing_format: &str,
) -> Result<File, String> {
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Err(e) =
        keel_vmm::snapshot::create_overlay_in(&file, path, size, backing, backing_format)
    {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

fn take(socket: &Path, dir: &Path, key: Option<&[u8]>) -> Result<SnapshotReply, Failure> {
    let mut client = Client::connect(socket).map_err(usage)?;
    let info = match client.call(&Request::Info).map_err(fail)? {
        keel_api::Reply::Info(i) => i,
        other => return Err(fail(format!("unexpected reply to info: {other:?}"))),
    };
    if dir.exists() {
        return Err(usage("the snapshot directory already exists"));
    }
    let writer = Writer::create(dir).map_err(usage)?;
    let mut created: Vec<PathBuf> = Vec::new();
    let result = take_into(&mut client, &info.disks, writer, &mut created, key);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir);
        // Overlays the VM did not move onto are of no use.
        let in_use: Vec<PathBuf> = match client.call(&Request::Info) {
            Ok(keel_api::Reply::Info(i)) => i
                .disks
                .iter()
                .flat_map(|d| d.layers.iter().map(|l| l.path.clone()))
                .collect(),
            _ => created.clone(),
        };
        for c in &created {
            if !in_use.contains(c) {
                let _ = std::fs::remove_file(c);
            }
        }
    }
    result
}

fn take_into(
    client: &mut Client,
    disks: &[DiskInfo],
    mut writer: Writer,
    created: &mut Vec<PathBuf>,
    key: Option<&[u8]>,
) -> Result<SnapshotReply, Failure> {
    let new_file = |name: &str| -> Result<File, Failure> {
        let p = writer.part_path(name).map_err(fail)?;
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| fail(format!("{}: {e}", p.display())))
    };
    let memory = new_file(MEMORY_PART)?;
    let state = new_file(STATE_PART)?;
    let tag = format!(
        "after-{}",
        writer
            .dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into())
    );
    let mut overlays = Vec::new();
    let mut files = Vec::new();
    for d in disks.iter().filter(|d| !d.read_only) {
        let (Some(base), Some(top)) = (d.layers.first(), d.layers.last()) else {
            return Err(fail(format!("disk {}: the VMM reports no image", d.index)));
        };
        if d.layers.len() > keel_vmm::snapshot::format::MAX_LAYERS {
            return Err(usage(format!(
                "disk {} already has {} layers (a restore takes at most {}): merge them with \
                 `qemu-img commit` on a stopped VM first",
                d.index,
                d.layers.len() - 1,
                keel_vmm::snapshot::format::MAX_LAYERS
            )));
        }
        let path = overlay_path(&base.path, &tag);
        let backing = backing_name(d.index, &base.path, d.layers.len() - 1);
        let file = create_overlay(&path, d.size, &backing, &top.format).map_err(fail)?;
        created.push(path.clone());
        files.push(file);
        overlays.push(NewOverlay {
            disk: d.index,
            path,
            backing_name: backing,
        });
    }
    let mut fds = vec![memory.as_raw_fd(), state.as_raw_fd()];
    fds.extend(files.iter().map(|f| f.as_raw_fd()));
    client.set_timeout(None).map_err(fail)?;
    let reply = match client
        .call_with_fds(&Request::Snapshot(SnapshotRequest { overlays }), &fds)
        .map_err(fail)?
    {
        keel_api::Reply::Snapshot(r) => r,
        other => return Err(fail(format!("unexpected reply to snapshot: {other:?}"))),
    };
    for p in &reply.parts {
        writer.add_hashed(p.clone()).map_err(fail)?;
    }
    let mut saved = SavedDisks::default();
    for d in &reply.disks {
        let (Some(base), Some(base_identity)) = (d.layers.first(), d.identities.first()) else {
            return Err(fail(format!("disk {}: the VMM reports no image", d.index)));
        };
        let mut names = Vec::new();
        for (depth, (layer, id)) in d.layers.iter().zip(&d.identities).enumerate().skip(1) {
            let name = layer_part(d.index, depth);
            let dest = writer.part_path(&name).map_err(fail)?;
            link_layer(&layer.path, id, &dest).map_err(fail)?;
            writer.add_disk_layer(&name).map_err(fail)?;
            names.push(name);
        }
        saved.disks.push(SavedDisk {
            index: d.index,
            read_only: disks.get(d.index).is_some_and(|i| i.read_only),
            base: base.clone(),
            base_identity: *base_identity,
            layers: names,
        });
    }
    let json = serde_json::to_vec_pretty(&saved).map_err(fail)?;
    writer.write_part(DISKS_PART, &json).map_err(fail)?;
    writer.finish(key).map_err(fail)?;
    Ok(reply)
}

/// Puts frozen layer `src` (identity `id`) at `dest`: a hard link, or a copy across file
/// systems. A layer whose path is gone (its snapshot was deleted while a VM restored from
/// it still runs) is found again through the VMM's open descriptor.
fn link_layer(src: &Path, id: &FileIdentity, dest: &Path) -> Result<(), String> {
    let same = |p: &Path| {
        File::open(p)
            .and_then(|f| identity(&f))
            .is_ok_and(|i| i.dev == id.dev && i.ino == id.ino)
    };
    let source = if same(src) {
        src.to_path_buf()
    } else {
        find_open_file(id).ok_or_else(|| {
            format!(
                "layer {} is gone and no process holds it open any more",
                src.display()
            )
        })?
    };
    match std::fs::hard_link(&source, dest) {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(&source, dest)
            .map(|_| ())
            .map_err(|e| format!("copying layer {} into the snapshot: {e}", src.display())),
    }
}

/// A `/proc/PID/fd/N` path naming an open file with identity `id`.
fn find_open_file(id: &FileIdentity) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(m) = std::fs::metadata(fd.path()) {
                if m.dev() == id.dev && m.ino() == id.ino {
                    return Some(fd.path());
                }
            }
        }
    }
    None
}

fn list(dir: &Path) -> ExitCode {
    let dirs: Vec<PathBuf> = if dir.join(keel_snapshot::MANIFEST).exists() {
        vec![dir.to_path_buf()]
    } else {
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                let mut v: Vec<PathBuf> = rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join(keel_snapshot::MANIFEST).exists())
                    .collect();
                v.sort();
                v
            }
            Err(e) => {
                eprintln!("keel: {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        }
    };
    println!(
        "{:<32} {:<20} {:>5} {:>10} {:>10} {:>6} {:>5}",
        "SNAPSHOT", "TAKEN (UTC)", "CPUS", "MEMORY", "WRITTEN", "DISKS", "KEY"
    );
    for d in dirs {
        match describe(&d) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("{:<32} unreadable: {e}", d.display()),
        }
    }
    ExitCode::SUCCESS
}

fn describe(d: &Path) -> Result<String, String> {
    let text = std::fs::read(d.join(keel_snapshot::MANIFEST)).map_err(|e| e.to_string())?;
    let m = Manifest::parse(&text).map_err(|e| e.to_string())?;
    let taken = std::fs::metadata(d.join(keel_snapshot::MANIFEST))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or("?".into(), |t| utc(t.as_secs()));
    let state: Option<SavedVm> = std::fs::read(d.join(STATE_PART))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (cpus, mem) = state.as_ref().map_or(("?".into(), "?".into()), |s| {
        (
            s.config.vcpus.to_string(),
            keel_vmm::config::format_size(s.config.memory),
        )
    });
    let written = keel_vmm::snapshot::allocated_bytes(&d.join(MEMORY_PART))
        .map_or("?".into(), keel_vmm::config::format_size);
    let disks = m
        .parts
        .iter()
        .filter(|p| p.kind == PartKind::DiskLayer)
        .count();
    Ok(format!(
        "{:<32} {:<20} {:>5} {:>10} {:>10} {:>6} {:>5}",
        d.display(),
        taken,
        cpus,
        mem,
        written,
        format!("{disks}L"),
        if m.hmac.is_some() { "yes" } else { "no" }
    ))
}

/// `YYYY-MM-DD HH:MM:SS` for seconds since the epoch.
fn utc(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn delete(dir: &Path) -> ExitCode {
    let text = match std::fs::read(dir.join(keel_snapshot::MANIFEST)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keel: {}: not a Keel snapshot ({e})", dir.display());
            return ExitCode::from(2);
        }
    };
    let m = match Manifest::parse(&text) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("keel: {}: {e}; not deleting it", dir.display());
            return ExitCode::from(2);
        }
    };
    // Only what the snapshot is made of: the manifest last, then the (now empty) directory.
    for p in &m.parts {
        let _ = std::fs::remove_file(dir.join(&p.name));
    }
    let _ = std::fs::remove_file(dir.join(keel_snapshot::MANIFEST));
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            eprintln!("keel: deleted snapshot {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "keel: deleted snapshot {}, but the directory holds other files: {e}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
    }
}
