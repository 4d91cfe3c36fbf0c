//! Snapshots of a running VM and VMs restored from them (`docs/snapshot-format.md`).
//!
//! Taking one (`snapshot` on the API socket): the API thread queues the request for the
//! event loop, which pauses the vCPUs, has each save its state on its own thread, saves the
//! in-kernel irqchip/PIT/clock, quiesces the devices (requests in flight complete first),
//! saves their state and guest memory into the files the client passed, then freezes every
//! writable disk and stacks the overlay the client created on it, and lets everything run
//! again. The client (`keel snapshot`) writes the manifest.

pub mod format;
pub(crate) mod lazy;
pub(crate) mod memory;
mod restore;

pub use restore::{DiskChain, RestoreSpec};

use crate::runner::Shared;
use format::{SavedVm, MEMORY_PART, STATE_PART};
use keel_api::{DiskInfo, FileIdentity, FrozenDisk, Layer, SnapshotReply, SnapshotRequest};
use keel_block::DiskImage;
use keel_hypervisor::Vm;
use keel_snapshot::{Part, PartKind};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Writes a qcow2 overlay header of `size` bytes over `backing` (format "raw" or "qcow2")
/// into the empty `file` at `path`: the file a snapshot or a restore gives a VM to write.
pub fn create_overlay_in(
    file: &File,
    path: &std::path::Path,
    size: u64,
    backing: &std::path::Path,
    backing_format: &str,
) -> Result<(), String> {
    let format = keel_block::ImageFormat::from_name(backing_format)
        .ok_or_else(|| format!("unknown image format {backing_format:?}"))?;
    keel_block::create_qcow2_overlay_in(file, path, size, backing, format)
        .map_err(|e| e.to_string())
}

/// The virtual size of the disk image at `path` (its qcow2 backing chain followed).
pub fn disk_size(path: &std::path::Path, format: &str) -> Result<u64, String> {
    let format = keel_block::ImageFormat::from_name(format)
        .ok_or_else(|| format!("unknown image format {format:?}"))?;
    let opts = keel_block::OpenOptions {
        format: Some(format),
        read_only: true,
        direct: false,
    };
    keel_block::open_image(path, &opts)
        .map(|i| i.size())
        .map_err(|e| e.to_string())
}

/// Bytes the file at `path` occupies on disk (a sparse memory part: what was written).
pub fn allocated_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// How long the vCPUs get to save their state.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the event loop is asked to do with the paused VM.
pub(crate) enum Work {
    Snapshot(SnapshotRequest),
    Migrate(keel_api::MigrateRequest),
}

/// What it did.
pub(crate) enum Done {
    Snapshot(SnapshotReply),
    Migrated(keel_api::MigrateReply),
}

type Answer = Result<Done, String>;

struct Job {
    work: Work,
    fds: Vec<OwnedFd>,
    reply: mpsc::SyncSender<Answer>,
}

/// Snapshot requests from the API thread to the event loop.
pub(crate) struct Requests {
    jobs: Mutex<Vec<Job>>,
    evt: EventFd,
}

impl Requests {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Requests {
            jobs: Mutex::new(Vec::new()),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// On the API thread: has the event loop do `work` (a snapshot, a migration), and waits
    /// for it.
    pub(crate) fn take(&self, work: Work, fds: Vec<OwnedFd>) -> Answer {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Job {
                work,
                fds,
                reply: tx,
            });
        self.evt.write(1).map_err(|e| e.to_string())?;
        rx.recv()
            .map_err(|_| "the VM stopped before the request was served".to_string())?
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn pending(&self) -> Vec<Job> {
        let _ = self.evt.read();
        std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A disk as the snapshot code drives it.
pub(crate) struct DiskSlot {
    /// Every image of the chain, bottom first; the VM writes the last unless read-only.
    pub images: Vec<Arc<dyn DiskImage>>,
    pub control: keel_virtio::block::BlockControl,
}

/// What the event loop needs to take snapshots.
pub(crate) struct Snapshotter {
    pub requests: Arc<Requests>,
    pub config: crate::VmConfig,
    pub host_kind: String,
    pub cmdline: String,
    pub msr_indices: Vec<u32>,
    /// /proc/self/pagemap, opened before the jail: which pages the guest touched.
    pub pagemap: Option<File>,
    pub serial: Arc<Mutex<keel_devices::serial::Serial>>,
    pub devices: Vec<Arc<Mutex<keel_virtio::VirtioPciDevice>>>,
    pub disks: Vec<DiskSlot>,
    /// What `info` reports about the disks.
    pub disk_info: Arc<Mutex<Vec<DiskInfo>>>,
    /// A restored VM's memory pager: chunks the guest never used are still in the part.
    pub lazy: Option<Arc<lazy::LazyMemory>>,
}

fn fd_identity(fd: RawFd) -> std::io::Result<FileIdentity> {
    // SAFETY: `fd` is open (held by its image) for this call; ManuallyDrop never closes it.
    let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    format::identity(&f)
}

impl Snapshotter {
    /// On the event loop: takes every queued snapshot.
    pub(crate) fn run_pending(&mut self, vm: &Vm, sh: &Shared) {
        for job in self.requests.pending() {
            let answer = match job.work {
                Work::Snapshot(req) => {
                    let answer = self.take(vm, sh, req, job.fds);
                    match &answer {
                        Ok(r) => tracing::info!(
                            "snapshot taken: {} MiB of guest memory written, guest paused {:.1} ms",
                            r.memory_data_bytes >> 20,
                            r.downtime_us as f64 / 1000.0
                        ),
                        Err(e) => tracing::warn!("snapshot failed: {e}"),
                    }
                    answer.map(Done::Snapshot)
                }
                Work::Migrate(req) => self.migrate(vm, sh, req, job.fds).map(Done::Migrated),
            };
            let _ = job.reply.send(answer);
        }
    }

    fn take(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        req: SnapshotRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<SnapshotReply, String> {
        let was_paused = sh.pause.is_paused();
        if !was_paused {
            sh.pause
                .pause(|| sh.running_vcpus(), crate::pause::PAUSE_TIMEOUT)?;
        }
        let paused_at = Instant::now();
        let mut paused_devices = Vec::new();
        let result = self.save(vm, sh, req, fds, &mut paused_devices);
        for d in paused_devices {
            if let Err(e) = d.lock().unwrap_or_else(|p| p.into_inner()).resume() {
                tracing::error!("after the snapshot, a device did not resume: {e}");
            }
        }
        let downtime = paused_at.elapsed();
        if !was_paused {
            sh.pause.resume();
        }
        result.map(|mut r| {
            r.downtime_us = u64::try_from(downtime.as_micros()).unwrap_or(u64::MAX);
            r
        })
    }

    fn save(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        req: SnapshotRequest,
        fds: Vec<OwnedFd>,
        paused_devices: &mut Vec<Arc<Mutex<keel_virtio::VirtioPciDevice>>>,
    ) -> Result<SnapshotReply, String> {
        // The files first, so a bad request changes nothing.
        let writable: Vec<usize> = self
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.control.image().read_only())
            .map(|(i, _)| i)
            .collect();
        let mut asked: Vec<usize> = req.overlays.iter().map(|o| o.disk).collect();
        asked.sort_unstable();
        if asked != writable {
            return Err(format!(
                "the request brings overlays for disks {asked:?}; the writable disks are {writable:?}"
            ));
        }
        if fds.len() != 2 + req.overlays.len() {
            return Err(format!(
                "the request brings {} files; it needs {} (memory, state, one overlay per writable disk)",
                fds.len(),
                2 + req.overlays.len()
            ));
        }
        let mut fds = fds.into_iter().map(File::from);
        let (Some(memory_file), Some(mut state_file)) = (fds.next(), fds.next()) else {
            return Err("missing memory or state file".into());
        };
        let overlay_files: Vec<File> = fds.collect();

        let mut saved = self.capture_machine(vm, sh, paused_devices)?;
        let mem = memory::save(
            &sh.mem,
            &memory_file,
            self.pagemap.as_ref(),
            self.lazy.as_deref(),
        )
        .map_err(|e| format!("writing guest memory: {e}"))?;
        saved.memory_chunks = mem.chunks.iter().map(keel_snapshot::digest_hex).collect();
        let state = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        state_file
            .set_len(0)
            .and_then(|()| state_file.write_all(&state))
            .and_then(|()| state_file.sync_all())
            .map_err(|e| format!("writing the state part: {e}"))?;
        let parts = vec![
            Part {
                name: MEMORY_PART.into(),
                size: mem.size,
                digest: mem.digest,
                kind: PartKind::Pages,
            },
            Part {
                name: STATE_PART.into(),
                size: state.len() as u64,
                digest: keel_snapshot::sha256_hex(&state),
                kind: PartKind::Whole,
            },
        ];
        let disks = self.freeze_disks(&req, overlay_files)?;
        Ok(SnapshotReply {
            parts,
            disks,
            downtime_us: 0,
            memory_data_bytes: mem.data_bytes,
        })
    }

    /// With the vCPUs paused: every vCPU's state, the in-kernel irqchip/PIT/clock, every
    /// device paused (pushed to `paused_devices`, for the caller to resume) and saved, the
    /// UART. Memory is the caller's (`memory_chunks` is left empty).
    pub(crate) fn capture_machine(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        paused_devices: &mut Vec<Arc<Mutex<keel_virtio::VirtioPciDevice>>>,
    ) -> Result<SavedVm, String> {
        let vcpus = sh.pause.capture(
            self.msr_indices.clone(),
            self.config.vcpus as usize,
            CAPTURE_TIMEOUT,
        )?;
        let vm_state = vm.save_state().map_err(|e| e.to_string())?;
        for d in &self.devices {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .pause()
                .map_err(|e| e.to_string())?;
            paused_devices.push(d.clone());
        }
        let devices = self
            .devices
            .iter()
            .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).save_state())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        Ok(SavedVm {
            config: self.config.clone(),
            host_kind: self.host_kind.clone(),
            cmdline: self.cmdline.clone(),
            vcpus,
            vm: vm_state,
            devices,
            serial,
            memory_chunks: Vec::new(),
        })
    }

    /// Freezes every disk's chain as it is and moves each writable disk onto its new
    /// overlay. Returns the chains as frozen.
    fn freeze_disks(
        &mut self,
        req: &SnapshotRequest,
        overlay_files: Vec<File>,
    ) -> Result<Vec<FrozenDisk>, String> {
        let mut info = self.disk_info.lock().unwrap_or_else(|p| p.into_inner());
        // Identities as the snapshot leaves them: the devices are paused and drained, so no
        // write (nor its mtime) comes after this; the flush in `freeze` changes neither.
        let mut frozen = Vec::new();
        for (index, slot) in self.disks.iter().enumerate() {
            let layers = info
                .get(index)
                .map(|d| d.layers.clone())
                .ok_or_else(|| format!("disk {index}: no chain recorded"))?;
            let identities = slot
                .images
                .iter()
                .map(|img| match img.lock_fd() {
                    Some(fd) => fd_identity(fd).map_err(|e| e.to_string()),
                    None => Ok(FileIdentity::default()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            frozen.push(FrozenDisk {
                index,
                layers,
                identities,
            });
        }
        for (o, file) in req.overlays.iter().zip(overlay_files) {
            let slot = self
                .disks
                .get_mut(o.disk)
                .ok_or_else(|| format!("no disk {}", o.disk))?;
            let top = slot
                .images
                .last()
                .cloned()
                .ok_or_else(|| format!("disk {}: no image", o.disk))?;
            let overlay = keel_block::open_overlay(file, &o.path, false, top.clone())
                .map_err(|e| format!("disk {}: new overlay: {e}", o.disk))?;
            keel_block::freeze(&top).map_err(|e| format!("disk {}: {e}", o.disk))?;
            slot.control
                .replace_image(overlay.clone())
                .map_err(|e| format!("disk {}: {e}", o.disk))?;
            slot.images.push(overlay);
            if let Some(d) = info.get_mut(o.disk) {
                d.layers.push(Layer {
                    path: o.path.clone(),
                    format: "qcow2".into(),
                });
            }
        }
        Ok(frozen)
    }
}
