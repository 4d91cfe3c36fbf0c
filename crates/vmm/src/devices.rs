//! The PCI side of a VM: the root bus, its configuration and BAR windows on the buses, and
//! the virtio devices the configuration asks for.

use crate::device_config::{DiskConfig, DiskFormat, NetConfig};
use crate::memory::GuestMemoryMmap;
use crate::{VmConfig, VmmError};
use keel_arch::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use keel_devices::Bus;
use keel_hypervisor::Vm;
use keel_pci::{
    BarAllocator, KvmMsiRouter, MsiRouter, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot,
};
use keel_rate_limiter::{Budget, RateLimitConfig};
use keel_virtio::{DeviceRuntime, IoEvents, VirtioDevice, VirtioPciDevice};
use std::sync::{Arc, Mutex};

/// Host-side handles on devices that the VMM's control plane drives while the VM runs.
#[derive(Default)]
pub(crate) struct DeviceHandles {
    /// Names of the PCI devices, in slot order, for logs.
    pub names: Vec<String>,
    pub balloon: Option<Arc<dyn crate::api::BalloonControl>>,
    /// Where the vsock device listens for host connections (and finds guest-port sockets).
    pub vsock_socket: Option<std::path::PathBuf>,
    /// The virtio functions, in slot order (to pause, save and restore them).
    pub virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The disks, in `--disk` order.
    pub disks: Vec<crate::snapshot::DiskSlot>,
    pub disk_info: Vec<keel_api::DiskInfo>,
    /// The root bus (a restore re-reads every BAR the devices' restored state programs).
    pub root: Option<Arc<PciRoot>>,
    /// The network interfaces' taps, in `--net` order.
    pub taps: Vec<Arc<keel_net::Tap>>,
}

/// A disk's chain of images, opened.
pub(crate) struct OpenedDisk {
    /// Bottom first; the last is what the guest sees (and writes, unless read-only).
    pub images: Vec<Arc<dyn keel_block::DiskImage>>,
    pub layers: Vec<keel_api::Layer>,
}

/// Opens the disks of a new VM: each its one image.
pub(crate) fn open_disks(config: &VmConfig) -> Result<Vec<OpenedDisk>, VmmError> {
    config
        .disks
        .iter()
        .map(|disk| {
            let image = open_disk_image(disk)?;
            Ok(OpenedDisk {
                layers: vec![keel_api::Layer {
                    path: disk.path.clone(),
                    format: image.format().name().to_string(),
                }],
                images: vec![image],
            })
        })
        .collect()
}

fn open_disk_image(disk: &DiskConfig) -> Result<Arc<dyn keel_block::DiskImage>, VmmError> {
    let format = disk.format.map(|f| match f {
        DiskFormat::Raw => keel_block::ImageFormat::Raw,
        DiskFormat::Qcow2 => keel_block::ImageFormat::Qcow2,
    });
    keel_block::open_image(
        &disk.path,
        &keel_block::OpenOptions {
            format,
            read_only: disk.read_only,
            direct: false,
        },
    )
    .map_err(|source| VmmError::Disk {
        path: disk.path.clone(),
        source,
    })
}

struct Builder<'a> {
    mem: &'a GuestMemoryMmap,
    msi: Arc<dyn MsiRouter>,
    ioevents: Arc<dyn IoEvents>,
    runtime: DeviceRuntime,
    bars: BarAllocator,
    root: PciRoot,
    handles: DeviceHandles,
}

impl Builder<'_> {
    fn add(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        let name = device.name();
        let dev = VirtioPciDevice::new(
            device,
            self.mem.clone(),
            self.msi.clone(),
            self.ioevents.clone(),
            &mut self.bars,
            self.runtime.clone(),
        )
        .map_err(|e| VmmError::Device {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        let bar = dev.bar_address().unwrap_or_default();
        let dev = Arc::new(Mutex::new(dev));
        self.handles.virtio.push(dev.clone());
        let slot = self.root.add_device(dev)?;
        tracing::debug!("PCI 00:{slot:02x}.0: virtio {name}, BAR0 at {bar:#x}");
        self.handles.names.push(name);
        Ok(())
    }
}

/// Builds bus 0 with the configured devices and maps it: config ports on `pio`, ECAM and the
/// BAR window on `mmio`.
pub(crate) fn build_pci(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    disks: Vec<OpenedDisk>,
    runtime: DeviceRuntime,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<DeviceHandles, VmmError> {
    let router = vm.irq_router();
    let mut b = Builder {
        mem,
        msi: Arc::new(KvmMsiRouter(router.clone())),
        ioevents: Arc::new(router),
        runtime,
        bars: BarAllocator::new(PCI_MMIO_START, PCI_MMIO_SIZE)?,
        root: PciRoot::new(),
        handles: DeviceHandles::default(),
    };
    // One budget all disks draw on, made once; each disk's own budget comes first.
    let vm_io = budget("--io-bps/--io-iops", &config.io_limit)?;
    if disks.len() != config.disks.len() {
        return Err(VmmError::Device {
            name: "--disk".into(),
            reason: format!(
                "{} disks configured, {} opened",
                config.disks.len(),
                disks.len()
            ),
        });
    }
    for (i, (disk, opened)) in config.disks.iter().zip(disks).enumerate() {
        let mut budgets = Vec::new();
        budgets.extend(budget("--disk", &disk.rate_limit)?);
        budgets.extend(vm_io.clone());
        if !disk.rate_limit.is_unlimited() || vm_io.is_some() {
            tracing::info!(
                "disk {}: rate limited (own: {:?}; VM-wide: {:?})",
                disk_name(i),
                disk.rate_limit,
                config.io_limit
            );
        }
        let top = opened
            .images
            .last()
            .cloned()
            .ok_or_else(|| VmmError::Device {
                name: disk_name(i),
                reason: "no image".into(),
            })?;
        let block = block_device(i, disk, top.clone()).with_rate_limit(budgets);
        let control = block.control();
        b.handles.disk_info.push(keel_api::DiskInfo {
            index: i,
            read_only: top.read_only(),
            size: top.size(),
            layers: opened.layers,
        });
        b.handles.disks.push(crate::snapshot::DiskSlot {
            images: opened.images,
            control,
        });
        b.add(Box::new(block))?;
    }
    for net in &config.nets {
        let dev = net_device(net)?;
        b.handles.taps.push(dev.tap_handle());
        b.add(Box::new(dev))?;
    }
    if config.rng {
        b.add(Box::new(keel_virtio::rng::Rng::new()))?;
    }
    if let Some(v) = &config.vsock {
        let path = match &v.socket {
            Some(p) => p.clone(),
            None => default_vsock_socket(v.cid)?,
        };
        let dev = keel_virtio::vsock::Vsock::new(v.cid.into(), path.clone()).map_err(|e| {
            VmmError::Device {
                name: "--vsock".into(),
                reason: e.to_string(),
            }
        })?;
        tracing::info!(
            "vsock cid={}: host connections through {}",
            v.cid,
            path.display()
        );
        b.add(Box::new(dev))?;
        b.handles.vsock_socket = Some(path);
    }
    if config.balloon {
        let (mut balloon, handle) = keel_virtio::balloon::Balloon::new(true);
        balloon.set_guest_ram(config.memory);
        // Fresh guest memory statistics every few seconds for `keel ctl balloon-stats`.
        handle.set_stats_interval(std::time::Duration::from_secs(5));
        b.add(Box::new(balloon))?;
        b.handles.balloon = Some(Arc::new(handle));
    }
    let root = Arc::new(b.root);
    b.handles.root = Some(root.clone());
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        PciConfigIo::BASE.into(),
        PciConfigIo::LEN.into(),
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        PCI_ECAM_START,
        PCI_ECAM_SIZE,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(PciBarWindow::new(root, PCI_MMIO_START))),
        PCI_MMIO_START,
        PCI_MMIO_SIZE,
    )?;
    Ok(b.handles)
}

/// A budget for `limit`, or `None` when it limits nothing.
fn budget(what: &str, limit: &RateLimitConfig) -> Result<Option<Budget>, VmmError> {
    if limit.is_unlimited() {
        return Ok(None);
    }
    Budget::new(limit).map(Some).map_err(|e| VmmError::Device {
        name: what.into(),
        reason: e.to_string(),
    })
}

/// The guest's name for disk `index` (vda, vdb, ... vdz, vdaa ...), as Linux assigns them in
/// PCI order.
fn disk_name(index: usize) -> String {
    let mut n = index;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    format!("vd{}", String::from_utf8_lossy(&s))
}

fn block_device(
    index: usize,
    disk: &DiskConfig,
    image: Arc<dyn keel_block::DiskImage>,
) -> keel_virtio::block::Block {
    let name = format!("{} ({})", disk_name(index), disk.path.display());
    tracing::info!(
        "disk {name}: {} {}, {} bytes",
        image.format(),
        if image.read_only() {
            "read-only"
        } else {
            "read-write"
        },
        image.size(),
    );
    keel_virtio::block::Block::new(image, name, keel_block::EngineConfig::default())
}

fn net_device(net: &NetConfig) -> Result<keel_virtio::net::Net, VmmError> {
    let bad = |reason: String| VmmError::Net { reason };
    let mac = match &net.mac {
        Some(m) => m
            .parse::<keel_net::MacAddr>()
            .map_err(|e| bad(format!("mac={m}: {e}")))?,
        None => keel_net::MacAddr::random_local().map_err(|e| bad(e.to_string()))?,
    };
    let tap = keel_net::Tap::open(net.tap.as_deref()).map_err(|e| bad(e.to_string()))?;
    let name = tap.name().to_string();
    let created = tap.created_by_keel();
    let dev = keel_virtio::net::Net::new(tap, mac)
        .map_err(|e| bad(format!("tap {name}: {e}")))?
        .with_rate_limits(
            budget("--net", &net.rx_limit)?,
            budget("--net", &net.tx_limit)?,
        );
    tracing::info!(
        "net: tap {name}{} mac {mac}",
        if created { " (created by Keel)" } else { "" }
    );
    Ok(dev)
}

/// `/run/keel/cid<N>/vsock.sock` when `--vsock` names no socket: a directory per VM, so a
/// jailed VMM that must reach its own guest-port sockets sees no other VM's.
fn default_vsock_socket(cid: u32) -> Result<std::path::PathBuf, VmmError> {
    let path = default_vsock_socket_path(cid);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| VmmError::Io {
            what: "creating /run/keel/cid<N> for the vsock socket",
            source,
        })?;
    }
    Ok(path)
}

/// The default vsock socket of the VM with guest CID `cid`.
pub fn default_vsock_socket_path(cid: u32) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/keel/cid{cid}/vsock.sock"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_names_follow_linux() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 701, 702].map(super::disk_name).into();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
        );
    }
}
