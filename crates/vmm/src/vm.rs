//! Assembling a VM from a [`VmConfig`]: guest memory, firmware tables, kernel, devices, vCPUs.

use crate::config::{format_size, host_memory, VmConfig};
use crate::exit::ExitReason;
use crate::memory::GuestMemoryMmap;
use crate::runner::{Shared, StopState};
use crate::{quirks, VmmError};
use keel_arch::acpi::{self, AcpiConfig};
use keel_arch::boot::{self, BootConfig, LoadedKernel};
use keel_arch::layout::{self, MIN_MEMORY};
use keel_arch::{cpu, mptable, regs};
use keel_devices::acpi_pm::AcpiPm;
use keel_devices::cmos::Cmos;
use keel_devices::debug_port::DebugPort;
use keel_devices::i8042::I8042;
use keel_devices::serial::{Serial, SerialOut};
use keel_devices::{Bus, PlatformEvents};
use keel_hypervisor::{HostInfo, Hypervisor, MemorySlot, Vcpu, Vm};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
/// The Generic Event Device's interrupt: the ACPI power button.
const POWER_BUTTON_GSI: u32 = 5;
/// SCI: unused by a hardware-reduced guest, but the FADT must name a valid ISA IRQ.
const SCI_IRQ: u16 = 9;

/// Where the console goes and comes from.
pub struct VmIo {
    /// Everything the guest writes to COM1.
    pub serial_out: SerialOut,
    /// Console input (stdin for `keel run`); `None` for no input.
    pub console_in: Option<OwnedFd>,
    /// Treat Ctrl-A x on the console input as "stop the VM" (Ctrl-A Ctrl-A sends one Ctrl-A).
    pub console_escape: bool,
}

impl VmIo {
    /// Output to `out`, no input.
    pub fn output_only(out: SerialOut) -> Self {
        VmIo {
            serial_out: out,
            console_in: None,
            console_escape: false,
        }
    }
}

/// Stops a running VM from another thread.
#[derive(Clone)]
pub struct StopHandle(Arc<StopState>);

impl StopHandle {
    pub fn stop(&self, reason: ExitReason) {
        self.0.request(reason);
    }
}

/// What was built, for logs and tests.
#[derive(Clone, Debug)]
pub struct BootInfo {
    pub host: HostInfo,
    /// The kernel as loaded (`None` for a VM restored from a snapshot).
    pub kernel: Option<LoadedKernel>,
    /// The command line the guest got (with host quirks applied).
    pub cmdline: String,
    /// The quirks appended, if any.
    pub quirks: Option<&'static str>,
}

/// A VM ready to run.
pub struct Vmm {
    pub(crate) config: VmConfig,
    pub(crate) boot: BootInfo,
    // Field order is drop order: vCPUs, then the VM, then the guest memory they map (in
    // `shared`).
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) vm: Vm,
    pub(crate) shared: Arc<Shared>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) debug_port: Arc<Mutex<DebugPort>>,
    /// Raises the guest's ACPI power-button event.
    pub(crate) power_button: EventFd,
    pub(crate) pci: crate::devices::DeviceHandles,
    /// Device activations queued by vCPU threads, run by the event loop.
    pub(crate) activator: Arc<crate::activator::QueuedActivator>,
    pub(crate) api_listener: Option<std::os::unix::net::UnixListener>,
    pub(crate) statm: Option<std::fs::File>,
    /// Takes snapshots on the event loop (`None`: not available).
    pub(crate) snapshotter: Option<crate::snapshot::Snapshotter>,
    /// The disks' chains, as `info` reports them.
    pub(crate) disk_info: Arc<Mutex<Vec<keel_api::DiskInfo>>>,
    /// For a VM restored from a snapshot: the files it uses instead of a kernel, initrd and
    /// disks (path, writable).
    pub(crate) restored_files: Vec<(PathBuf, bool)>,
    /// For a VM that arrived by migration: the stream, to tell the sender once it runs.
    pub(crate) migration_ack: Option<keel_migration::Channel<std::net::TcpStream>>,
    /// For a VM that arrived by migration: each network interface's tap and the guest's
    /// MAC on it, announced once it runs so traffic follows the guest here.
    pub(crate) announce: Vec<(Arc<keel_net::Tap>, keel_net::MacAddr)>,
    /// For a VM that arrived by post-copy: its memory still partly at the source.
    pub(crate) postcopy: Option<Arc<crate::migration::postcopy::Remote>>,
    /// For a VM restored from a snapshot: its memory, served on first use by the pager.
    pub(crate) lazy_memory: Option<Arc<crate::snapshot::lazy::LazyMemory>>,
    /// Left (and removed) when the VMM is dropped.
    pub(crate) _cgroup: Option<keel_cgroup::VmCgroup>,
    pub(crate) console_in: Option<OwnedFd>,
    pub(crate) console_escape: bool,
}

/// One thing on the host a running VM uses (see [`Vmm::host_paths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPath {
    /// A file (kernel, initrd, disk image, socket).
    File { path: PathBuf, writable: bool },
    /// A device node.
    Device(PathBuf),
    /// A directory the VMM makes or reaches sockets in.
    Dir(PathBuf),
}

impl Vmm {
    /// Validates `config` and builds the VM. Nothing runs until [`Vmm::run`].
    pub fn new(config: VmConfig, io: VmIo) -> Result<Vmm, VmmError> {
        validate_memory(&config)?;
        let mut kernel = File::open(&config.kernel).map_err(|source| VmmError::KernelFile {
            path: config.kernel.clone(),
            source,
        })?;
        boot::detect_format(&mut kernel).map_err(|source| VmmError::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
        let mut initrd = match &config.initrd {
            Some(p) => Some(File::open(p).map_err(|source| VmmError::InitrdFile {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        let disks = crate::devices::open_disks(&config)?;
        let cgroup = join_cgroup(&config)?;
        let (hv, mut vm) = create_vm(&config)?;
        let host = hv.host_info().clone();

        let ram =
            crate::memory::allocate(config.memory).map_err(|reason| VmmError::GuestMemory {
                size: format_size(config.memory),
                reason,
            })?;
        map_guest_memory(&mut vm, &ram, config.memory)?;
        if config.prefault {
            prefault(&ram.all);
        }
        let mem = &ram.all;
        let rsdp_addr = acpi::write_acpi_tables(
            mem,
            &AcpiConfig {
                vcpus: config.vcpus,
                sci_irq: SCI_IRQ,
                power_button_gsi: POWER_BUTTON_GSI,
            },
        )?;
        mptable::write_mptable(mem, config.vcpus)?;
        regs::write_boot_tables(mem)?;

        let (cmdline, quirks) = if config.host_quirks {
            quirks::apply(&config.cmdline, host.kind)
        } else {
            (config.cmdline.clone(), None)
        };
        let loaded = boot::load_kernel(
            mem,
            &mut kernel,
            initrd.as_mut(),
            &BootConfig {
                mem_size: config.memory,
                cmdline: &cmdline,
                rsdp_addr,
            },
        )
        .map_err(|source| VmmError::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
        let parts = Assembly::build(&hv, &vm, config, ram, disks, io, None)?;
        let vcpus = create_vcpus(&vm, &parts.cpuid, &parts.config, &loaded)?;
        // Said once the request is known to be good, so bad input gets exactly one line.
        if let Some(q) = quirks {
            tracing::info!("PVM host: appending the guest kernel parameters PVM needs: {q}");
        }
        let boot = BootInfo {
            host,
            kernel: Some(loaded),
            cmdline,
            quirks,
        };
        Ok(parts.finish(boot, vm, vcpus, cgroup))
    }

    /// What was built.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// The host files, devices and directories this VM uses, for a jail to hold: everything
    /// is open already; the paths are what the VMM knows them by.
    pub fn host_paths(&self) -> Vec<HostPath> {
        let c = &self.config;
        let mut v = vec![HostPath::Device("/dev/kvm".into())];
        // A VM booted here; one restored or received uses `restored_files` instead.
        if self.boot.kernel.is_some() {
            v.push(HostPath::File {
                path: c.kernel.clone(),
                writable: false,
            });
            if let Some(i) = &c.initrd {
                v.push(HostPath::File {
                    path: i.clone(),
                    writable: false,
                });
            }
            for d in &c.disks {
                v.push(HostPath::File {
                    path: d.path.clone(),
                    writable: !d.read_only,
                });
            }
        }
        for (path, writable) in &self.restored_files {
            v.push(HostPath::File {
                path: path.clone(),
                writable: *writable,
            });
        }
        if !c.nets.is_empty() {
            v.push(HostPath::Device("/dev/net/tun".into()));
        }
        if let Some(p) = &c.api_socket {
            v.push(HostPath::File {
                path: p.clone(),
                writable: true,
            });
        }
        // Guest-initiated vsock connections reach `<socket>_<port>` beside the socket.
        if let Some(dir) = self.pci.vsock_socket.as_ref().and_then(|p| p.parent()) {
            v.push(HostPath::Dir(dir.to_path_buf()));
        }
        v
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// A handle that can stop the VM from another thread while [`Vmm::run`] is running.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.stop.clone())
    }
}

/// Joins the VM's own cgroup before anything big is allocated: guest memory, device threads
/// and vCPU threads are all charged to it.
pub(crate) fn join_cgroup(config: &VmConfig) -> Result<Option<keel_cgroup::VmCgroup>, VmmError> {
    let Some(limits) = &config.limits else {
        return Ok(None);
    };
    let layout = keel_cgroup::Layout::detect()?;
    let cg = keel_cgroup::VmCgroup::create(&layout, &format!("vm-{}", std::process::id()), limits)?;
    cg.add(std::process::id())?;
    for p in cg.paths() {
        tracing::info!("cgroup: {}", p.display());
    }
    Ok(Some(cg))
}

/// Opens KVM and creates the VM with its in-kernel irqchip.
pub(crate) fn create_vm(config: &VmConfig) -> Result<(Hypervisor, Vm), VmmError> {
    let hv = Hypervisor::open()?;
    validate_vcpus(config.vcpus, hv.max_vcpus())?;
    if let Some(cap) = hv.host_info().missing_required() {
        return Err(keel_hypervisor::Error::MissingCapability(cap).into());
    }
    let vm = hv.create_vm()?;
    vm.create_irqchip()?;
    Ok((hv, vm))
}

/// Everything of a VM but its vCPUs, built the same way for a new and a restored VM.
pub(crate) struct Assembly {
    pub config: VmConfig,
    pub cpuid: keel_hypervisor::kvm_bindings::CpuId,
    shared: Arc<Shared>,
    serial: Arc<Mutex<Serial>>,
    debug_port: Arc<Mutex<DebugPort>>,
    power_button: EventFd,
    pub pci: crate::devices::DeviceHandles,
    activator: Arc<crate::activator::QueuedActivator>,
    api_listener: Option<std::os::unix::net::UnixListener>,
    statm: Option<File>,
    pagemap: Option<File>,
    msr_indices: Vec<u32>,
    console_in: Option<OwnedFd>,
    console_escape: bool,
}

impl Assembly {
    /// Platform devices (the serial port from `serial` when restoring), PCI devices on
    /// `disks`, the API socket, and the CPUID the vCPUs get.
    pub(crate) fn build(
        hv: &Hypervisor,
        vm: &Vm,
        config: VmConfig,
        ram: crate::memory::GuestRam,
        disks: Vec<crate::devices::OpenedDisk>,
        io: VmIo,
        serial: Option<&keel_devices::serial::SerialSnapshot>,
    ) -> Result<Assembly, VmmError> {
        let host = hv.host_info();
        let api_listener = match &config.api_socket {
            Some(p) => Some(crate::api::bind(p)?),
            None => None,
        };
        let statm = api_listener.as_ref().and_then(|_| crate::api::open_statm());
        // Which pages the guest touched, for snapshots (read before the jail hides /proc).
        let pagemap = File::open("/proc/self/pagemap").ok();
        let stop = Arc::new(StopState::new()?);
        let VmIo {
            serial_out,
            console_in,
            console_escape,
        } = io;
        let mut devices =
            PlatformDevices::new(vm, config.memory, stop.clone(), serial_out, serial)?;
        let mut mmio = Bus::new();
        let activator = Arc::new(crate::activator::QueuedActivator::new()?);
        let runtime = keel_virtio::DeviceRuntime {
            activator: activator.clone(),
            hooks: crate::confine::device_hooks(config.seccomp),
        };
        // Devices get the writable ranges only: the ROM stays read-only from the host side too.
        let pci = crate::devices::build_pci(
            vm,
            &ram.devices,
            &config,
            disks,
            runtime,
            &mut devices.pio,
            &mut mmio,
        )?;
        let mut cpuid = hv.supported_cpuid()?;
        if config.host_quirks && quirks::hide_hypercall_features(host.kind) {
            let hidden = cpu::mask_kvm_hypercall_features(&mut cpuid);
            if hidden != 0 {
                tracing::debug!("PVM host: hid KVM hypercall-based PV features (CPUID 0x40000001 bits {hidden:#x})");
            }
        }
        let msr_indices = hv.msr_index_list()?;
        let shared = Arc::new(Shared::new(devices.pio, mmio, ram.all, stop, config.vcpus));
        Ok(Assembly {
            config,
            cpuid,
            shared,
            serial: devices.serial,
            debug_port: devices.debug_port,
            power_button: devices.power_button,
            pci,
            activator,
            api_listener,
            statm,
            pagemap,
            msr_indices,
            console_in,
            console_escape,
        })
    }

    pub(crate) fn finish(
        self,
        boot: BootInfo,
        vm: Vm,
        vcpus: Vec<Vcpu>,
        cgroup: Option<keel_cgroup::VmCgroup>,
    ) -> Vmm {
        let mut pci = self.pci;
        let disk_info = Arc::new(Mutex::new(std::mem::take(&mut pci.disk_info)));
        let snapshotter = crate::snapshot::Requests::new()
            .map_err(|e| tracing::warn!("snapshots unavailable: {e}"))
            .ok()
            .map(|requests| crate::snapshot::Snapshotter {
                requests: Arc::new(requests),
                config: self.config.clone(),
                host_kind: format!("{:?}", boot.host.kind),
                cmdline: boot.cmdline.clone(),
                msr_indices: self.msr_indices,
                pagemap: self.pagemap,
                serial: self.serial.clone(),
                devices: pci.virtio.clone(),
                disks: std::mem::take(&mut pci.disks),
                disk_info: disk_info.clone(),
                lazy: None,
            });
        Vmm {
            config: self.config,
            boot,
            vcpus,
            vm,
            shared: self.shared,
            serial: self.serial,
            debug_port: self.debug_port,
            power_button: self.power_button,
            pci,
            activator: self.activator,
            api_listener: self.api_listener,
            statm: self.statm,
            snapshotter,
            disk_info,
            restored_files: Vec::new(),
            announce: Vec::new(),
            postcopy: None,
            lazy_memory: None,
            migration_ack: None,
            _cgroup: cgroup,
            console_in: self.console_in,
            console_escape: self.console_escape,
        }
    }
}

/// The legacy platform devices every VM has, on the port-I/O bus.
struct PlatformDevices {
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
    debug_port: Arc<Mutex<DebugPort>>,
    power_button: EventFd,
}

impl PlatformDevices {
    fn new(
        vm: &Vm,
        memory: u64,
        stop: Arc<StopState>,
        serial_out: SerialOut,
        serial_state: Option<&keel_devices::serial::SerialSnapshot>,
    ) -> Result<Self, VmmError> {
        let events: Arc<dyn PlatformEvents> = stop;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
            what: "serial interrupt eventfd",
            source,
        })?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
        let serial = match serial_state {
            None => Serial::new(serial_irq, serial_out),
            Some(st) => Serial::from_snapshot(serial_irq, serial_out, st).map_err(|reason| {
                VmmError::Snapshot(format!("the serial port's state: {reason}"))
            })?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let debug_port = Arc::new(Mutex::new(DebugPort::default()));
        let low_mem = layout::low_ram_end(memory);
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT.into(), 8)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events.clone()))),
            I8042::BASE.into(),
            I8042::LEN.into(),
        )?;
        pio.insert(
            Arc::new(Mutex::new(Cmos::new(low_mem, memory - low_mem))),
            Cmos::BASE.into(),
            Cmos::LEN.into(),
        )?;
        let pm = AcpiPm::new(events, acpi::S5_SLEEP_TYPE, acpi::PM_RESET_VALUE);
        pio.insert(
            Arc::new(Mutex::new(pm)),
            acpi::PM_PORT_BASE.into(),
            acpi::PM_PORT_COUNT.into(),
        )?;
        pio.insert(debug_port.clone(), DebugPort::PORT.into(), 1)?;
        let power_button = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
            what: "power button eventfd",
            source,
        })?;
        vm.register_irqfd(&power_button, POWER_BUTTON_GSI)?;
        Ok(PlatformDevices {
            pio,
            serial,
            debug_port,
            power_button,
        })
    }
}

pub(crate) fn validate_memory(config: &VmConfig) -> Result<(), VmmError> {
    if config.memory < MIN_MEMORY {
        return Err(VmmError::TooLittleMemory {
            asked: format_size(config.memory),
            min: format_size(MIN_MEMORY),
        });
    }
    if let Some(host) = host_memory() {
        if config.memory > host {
            return Err(VmmError::TooMuchMemory {
                asked: format_size(config.memory),
                host: format_size(host),
            });
        }
    }
    Ok(())
}

fn validate_vcpus(vcpus: u32, max: usize) -> Result<(), VmmError> {
    if vcpus == 0 {
        return Err(VmmError::NoVcpus);
    }
    // ACPI MADT entries carry 8-bit APIC IDs; 0xff is broadcast.
    let max = max.min(254);
    if vcpus as usize > max {
        return Err(VmmError::TooManyVcpus { asked: vcpus, max });
    }
    Ok(())
}

/// Maps every range of `ram` into KVM memory slots (the ROM read-only).
pub(crate) fn map_guest_memory(
    vm: &mut Vm,
    ram: &crate::memory::GuestRam,
    size: u64,
) -> Result<(), VmmError> {
    let ranges = layout::ram_ranges(size);
    for (region, range) in ram.all.iter().zip(&ranges) {
        let host_addr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::GuestMemory {
                size: format_size(size),
                reason: e.to_string(),
            })? as u64;
        // The devices' view holds the same regions, which only keeps the mapping longer.
        // SAFETY: `host_addr..+len` is `region`'s mapping, owned by `ram`, which moves into
        // `Shared`: that outlives the VM (vCPUs joined and the VM dropped in `run` first).
        unsafe {
            vm.map_memory(MemorySlot {
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr,
                read_only: range.read_only,
            })?;
        }
    }
    Ok(())
}

/// Populates every page of guest RAM now (MADV_POPULATE_WRITE, Linux 5.14+; else one
/// write per page), so the guest never waits for the host to fault its memory in.
fn prefault(mem: &GuestMemoryMmap) {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let start = std::time::Instant::now();
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        // SAFETY: `host..host+len` is this region's own anonymous mapping, alive as long as
        // `mem`; populating it changes no contents.
        let r = unsafe { libc::madvise(host.cast(), len, MADV_POPULATE_WRITE) };
        if r != 0 {
            for off in (0..len).step_by(4096) {
                // SAFETY: `off < len`, inside the mapping; RAM is zero before the guest runs,
                // so writing zero back through a volatile access changes nothing.
                unsafe { std::ptr::write_volatile(host.add(off), 0) };
            }
        }
    }
    tracing::debug!("prefaulted guest memory in {:?}", start.elapsed());
}

fn create_vcpus(
    vm: &Vm,
    supported: &keel_hypervisor::kvm_bindings::CpuId,
    config: &VmConfig,
    loaded: &LoadedKernel,
) -> Result<Vec<Vcpu>, VmmError> {
    let msrs = cpu::boot_msrs()?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpu::vcpu_cpuid(supported, id, config.vcpus)?)?;
        vcpu.set_msrs(&msrs)?;
        vcpu.set_fpu(&regs::boot_fpu())?;
        let mut lapic = vcpu.get_lapic()?;
        cpu::set_lint(&mut lapic);
        vcpu.set_lapic(&lapic)?;
        if id == 0 {
            let sregs = regs::boot_sregs(&vcpu.get_sregs()?, loaded.entry);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs::boot_regs(loaded.entry))?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
