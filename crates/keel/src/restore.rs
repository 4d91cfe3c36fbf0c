//! `keel restore DIR`: start a VM from a snapshot.
//!
//! Everything in the snapshot is checked here, on the host, before a VMM exists: the
//! manifest, every part's size and checksum (and the HMAC with `--snapshot-key`), the
//! machine state's shape, and each disk image below the snapshot's layers, which must be
//! exactly as it was when the snapshot froze it. Guest memory, the one part that grows with
//! the guest, is checked chunk by chunk as the restored VM first uses it (against chunk
//! digests the state lists, checked here to make the memory part's digest), and by a
//! checker beside the guest. A bad snapshot is refused with exit status 2, or stops the VM
//! with it when a memory chunk fails.
//! Each writable disk gets a new qcow2 overlay next to its image; the VMM stacks it on the
//! snapshot's frozen layers, so the snapshot itself is never written.

use crate::jailed;
use crate::snapshot::{backing_name, create_overlay, overlay_path, read_key};
use keel_snapshot::Snapshot;
use keel_vmm::snapshot::format::{
    identity, memory_chunks, parse_disks, parse_state, SavedDisks, SavedVm, DISKS_PART,
    MEMORY_PART, STATE_PART,
};
use keel_vmm::snapshot::{DiskChain, RestoreSpec};
use keel_vmm::Vmm;
use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory (`keel snapshot --vm SOCKET DIR`).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// The key the snapshot was taken with (`keel snapshot --snapshot-key FILE`).
    #[arg(long, value_name = "FILE")]
    snapshot_key: Option<PathBuf>,
    /// Listen for control requests on this Unix socket (the snapshot's own socket is not
    /// reused: the VM it came from may still run).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    #[command(flatten)]
    confinement: crate::Confinement,
}

fn refuse(dir: &std::path::Path, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("keel: snapshot {}: {e}", dir.display());
    ExitCode::from(2)
}

/// The snapshot, checked: its machine, its disks, where its memory is.
fn load(
    dir: &std::path::Path,
    key: Option<&[u8]>,
) -> Result<(SavedVm, SavedDisks, PathBuf, Snapshot), String> {
    // Guest memory is checked as the VM uses it (see the module's comment).
    let snap = Snapshot::open_deferring(dir, key, &[MEMORY_PART]).map_err(|e| e.to_string())?;
    let part =
        |name: &str| -> Result<Vec<u8>, String> { snap.read_part(name).map_err(|e| e.to_string()) };
    let saved = parse_state(&part(STATE_PART)?)?;
    let chunks = memory_chunks(&saved)?;
    let listed = snap
        .manifest()
        .parts
        .iter()
        .find(|p| p.name == MEMORY_PART && p.kind == keel_snapshot::PartKind::Pages)
        .ok_or_else(|| format!("the snapshot has no {MEMORY_PART} part of kind pages"))?;
    if keel_snapshot::pages_digest(&chunks) != listed.digest {
        return Err(format!(
            "snapshot part {MEMORY_PART} is corrupted: the chunk digests in {STATE_PART} do \
             not make its digest"
        ));
    }
    let disks = parse_disks(
        &part(DISKS_PART)?,
        saved.config.disks.len(),
        snap.manifest(),
    )?;
    let memory = snap
        .part(MEMORY_PART)
        .ok_or_else(|| format!("the snapshot has no {MEMORY_PART} part"))?;
    for (i, d) in disks.disks.iter().enumerate() {
        let now = File::open(&d.base.path)
            .and_then(|f| identity(&f))
            .map_err(|e| format!("disk {i}: its image {}: {e}", d.base.path.display()))?;
        if now != d.base_identity {
            return Err(format!(
                "disk {i}: its image {} changed since the snapshot was taken (size {} → {}, \
                 modified {} → {} ns); restoring would corrupt the disk",
                d.base.path.display(),
                d.base_identity.size,
                now.size,
                d.base_identity.mtime_ns,
                now.mtime_ns
            ));
        }
    }
    Ok((saved, disks, memory, snap))
}

pub fn run(args: RestoreArgs) -> ExitCode {
    let dir = &args.dir;
    let key = match read_key(&args.snapshot_key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(2);
        }
    };
    let start = std::time::Instant::now();
    let (saved, disks, memory, snap) = match load(dir, key.as_deref()) {
        Ok(v) => v,
        Err(e) => return refuse(dir, e),
    };
    let tag = format!(
        "restore-{}",
        dir.file_name()
            .map_or("snapshot".into(), |n| n.to_string_lossy().into_owned())
    );
    let mut chains = Vec::new();
    let mut created = Vec::new();
    for d in &disks.disks {
        let layers: Vec<PathBuf> = d.layers.iter().filter_map(|n| snap.part(n)).collect();
        let top = if d.read_only {
            None
        } else {
            let (below, format) = match layers.last() {
                Some(l) => (l.clone(), "qcow2".to_string()),
                None => (d.base.path.clone(), d.base.format.clone()),
            };
            let made = keel_vmm::snapshot::disk_size(&below, &format).and_then(|size| {
                let path = overlay_path(&d.base.path, &tag);
                let backing = backing_name(d.index, &d.base.path, layers.len());
                create_overlay(&path, size, &backing, &format).map(|_| path)
            });
            match made {
                Ok(p) => {
                    created.push(p.clone());
                    Some(p)
                }
                Err(e) => {
                    for c in &created {
                        let _ = std::fs::remove_file(c);
                    }
                    eprintln!("keel: disk {}: cannot create its overlay: {e}", d.index);
                    return ExitCode::from(1);
                }
            }
        };
        chains.push(DiskChain {
            base: d.base.clone(),
            layers,
            top,
        });
    }
    let mut config = saved.config.clone();
    config.api_socket = args.api_socket.clone();
    config.seccomp = args.confinement.seccomp();
    let spec = RestoreSpec {
        saved,
        memory,
        disks: chains,
    };
    tracing::info!(
        "restoring {} (checked in {} ms)",
        dir.display(),
        start.elapsed().as_millis()
    );
    let build: jailed::Build = Box::new(move |config, io| Vmm::restore(spec, config, io));
    crate::launch(config, build, args.confinement)
}
