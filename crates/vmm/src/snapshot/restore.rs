//! Building a VM from a snapshot: the saved machine on the snapshot's memory, mapped
//! privately (nothing is read until the guest touches it), and each disk as a chain of the
//! frozen layers with a new writable overlay on top.

use super::format::SavedVm;
use crate::devices::OpenedDisk;
use crate::vm::{create_vm, join_cgroup, map_guest_memory, validate_memory, Assembly};
use crate::{BootInfo, VmIo, Vmm, VmmError};
use keel_api::Layer;
use std::fs::File;
use std::path::PathBuf;

/// One disk of a VM being restored.
#[derive(Clone, Debug)]
pub struct DiskChain {
    /// The image the VM was first started on (opened read-only when `top` is given).
    pub base: Layer,
    /// The snapshot's frozen overlays, bottom first (paths of its parts).
    pub layers: Vec<PathBuf>,
    /// The new overlay the restored VM writes (created by the caller over the top layer);
    /// `None` for a read-only disk.
    pub top: Option<PathBuf>,
}

/// What a restore needs: the verified snapshot's contents and the disks to use.
pub struct RestoreSpec {
    pub saved: SavedVm,
    /// The snapshot's memory part.
    pub memory: PathBuf,
    /// In `--disk` order.
    pub disks: Vec<DiskChain>,
}

impl RestoreSpec {
    /// Every file the restored VM uses (for a jail): memory, layers, tops.
    pub(crate) fn files(&self) -> Vec<(PathBuf, bool)> {
        let mut v = vec![(self.memory.clone(), false)];
        for d in &self.disks {
            v.push((d.base.path.clone(), false));
            v.extend(d.layers.iter().map(|l| (l.clone(), false)));
            v.extend(d.top.iter().map(|t| (t.clone(), true)));
        }
        v
    }
}

fn bad(what: impl std::fmt::Display) -> VmmError {
    VmmError::Snapshot(what.to_string())
}

fn open_chain(index: usize, chain: &DiskChain) -> Result<OpenedDisk, VmmError> {
    let format = keel_block::ImageFormat::from_name(&chain.base.format).ok_or_else(|| {
        bad(format!(
            "disk {index}: unknown format {:?}",
            chain.base.format
        ))
    })?;
    let disk_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| VmmError::Disk { path, source }
    };
    let base = keel_block::open_image(
        &chain.base.path,
        &keel_block::OpenOptions {
            format: Some(format),
            read_only: true,
            direct: false,
        },
    )
    .map_err(disk_err(&chain.base.path))?;
    let mut images = vec![base];
    let mut layers = vec![chain.base.clone()];
    let stack = chain
        .layers
        .iter()
        .map(|p| (p, true))
        .chain(chain.top.iter().map(|p| (p, false)));
    for (path, read_only) in stack {
        let below = images.last().cloned().ok_or_else(|| bad("empty chain"))?;
        let file = File::options()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| bad(format!("disk {index}: {}: {e}", path.display())))?;
        let image =
            keel_block::open_overlay(file, path, read_only, below).map_err(disk_err(path))?;
        images.push(image);
        layers.push(Layer {
            path: path.clone(),
            format: "qcow2".into(),
        });
    }
    Ok(OpenedDisk { images, layers })
}

impl Vmm {
    /// Builds a VM from a snapshot. `config` is the saved configuration with whatever the
    /// caller changed for this run (API socket, limits, seccomp); the machine itself (vCPUs,
    /// memory, devices) must match the snapshot. Nothing runs until [`Vmm::run`].
    pub fn restore(spec: RestoreSpec, config: crate::VmConfig, io: VmIo) -> Result<Vmm, VmmError> {
        let saved = &spec.saved;
        let s = &saved.config;
        if (
            config.vcpus,
            config.memory,
            config.disks.len(),
            config.nets.len(),
        ) != (s.vcpus, s.memory, s.disks.len(), s.nets.len())
            || (config.rng, config.balloon, config.vsock.is_some())
                != (s.rng, s.balloon, s.vsock.is_some())
        {
            return Err(bad(
                "the VM's configuration does not match the snapshot's machine",
            ));
        }
        if saved.vcpus.len() != config.vcpus as usize {
            return Err(bad(format!(
                "the state holds {} vCPUs; the VM has {}",
                saved.vcpus.len(),
                config.vcpus
            )));
        }
        if spec.disks.len() != config.disks.len() {
            return Err(bad("the disk list does not match the snapshot's"));
        }
        validate_memory(&config)?;
        let memory =
            File::open(&spec.memory).map_err(|e| bad(format!("{}: {e}", spec.memory.display())))?;
        let disks = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, c)| open_chain(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let cgroup = join_cgroup(&config)?;
        let (hv, vm) = create_vm(&config)?;
        let host = hv.host_info().clone();
        let kind = format!("{:?}", host.kind);
        if kind != saved.host_kind {
            return Err(bad(format!(
                "the snapshot was taken on a {} host; this one is {kind}",
                saved.host_kind
            )));
        }
        let chunks = super::format::memory_chunks(saved).map_err(bad)?;
        let (ram, lazy) = super::memory::restore(config.memory, &memory, chunks).map_err(bad)?;
        // Until the VM runs (and its own pager thread starts), a thread of this set-up
        // serves whatever touches guest memory.
        let quit = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            VmmError::Io {
                what: "pager eventfd",
                source,
            }
        })?;
        let vmm = std::thread::scope(|s| {
            let pager = std::thread::Builder::new()
                .name("pager-setup".into())
                .spawn_scoped(s, || lazy.serve(&quit))
                .map_err(|source| VmmError::Io {
                    what: "spawning the memory pager",
                    source,
                })?;
            let built = Self::restore_machine(&spec.saved, hv, vm, config, ram, disks, cgroup, io);
            let _ = quit.write(1);
            let _ = pager.join();
            built
        })?;
        if let Some(f) = lazy.failure() {
            return Err(bad(f));
        }
        let mut vmm = vmm;
        if let Some(s) = vmm.snapshotter.as_mut() {
            s.lazy = Some(lazy.clone());
        }
        vmm.lazy_memory = Some(lazy);
        vmm.restored_files = spec.files();
        Ok(vmm)
    }

    /// The rest of [`Vmm::restore`] (and of a migration's receiver), with guest memory in
    /// place (or served on first use): the saved machine on `vm`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore_machine(
        saved: &SavedVm,
        hv: keel_hypervisor::Hypervisor,
        mut vm: keel_hypervisor::Vm,
        config: crate::VmConfig,
        ram: crate::memory::GuestRam,
        disks: Vec<OpenedDisk>,
        cgroup: Option<keel_cgroup::VmCgroup>,
        io: VmIo,
    ) -> Result<Vmm, VmmError> {
        let host = hv.host_info().clone();
        map_guest_memory(&mut vm, &ram, config.memory)?;
        let parts = Assembly::build(&hv, &vm, config, ram, disks, io, Some(&saved.serial))?;
        if parts.pci.virtio.len() != saved.devices.len() {
            return Err(bad(format!(
                "the state holds {} PCI devices; the VM has {}",
                saved.devices.len(),
                parts.pci.virtio.len()
            )));
        }
        // The in-kernel irqchip, PIT and clock first, then the vCPUs (their LAPICs), then the
        // devices, whose interrupt routes need the irqchip.
        vm.restore_state(&saved.vm)
            .map_err(|e| bad(format!("VM state: {e}")))?;
        let mut vcpus = Vec::with_capacity(saved.vcpus.len());
        for (id, state) in (0u32..).zip(&saved.vcpus) {
            let vcpu = vm.create_vcpu(id)?;
            vcpu.set_cpuid(&keel_arch::cpu::vcpu_cpuid(
                &parts.cpuid,
                id,
                parts.config.vcpus,
            )?)?;
            vcpu.restore_state(state)
                .map_err(|e| bad(format!("vCPU {id}: {e}")))?;
            vcpus.push(vcpu);
        }
        for (i, (dev, state)) in parts.pci.virtio.iter().zip(&saved.devices).enumerate() {
            let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
            d.restore_state(state)
                .map_err(|e| bad(format!("PCI device {i} ({}): {e}", d.name())))?;
        }
        // The BAR windows follow the addresses the restored config spaces hold.
        if let Some(root) = &parts.pci.root {
            root.refresh_all_bars();
        }
        for (i, dev) in parts.pci.virtio.iter().enumerate() {
            let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
            d.resume()
                .map_err(|e| bad(format!("PCI device {i} ({}): {e}", d.name())))?;
        }
        let boot = BootInfo {
            host,
            kernel: None,
            cmdline: saved.cmdline.clone(),
            quirks: None,
        };
        Ok(parts.finish(boot, vm, vcpus, cgroup))
    }
}
