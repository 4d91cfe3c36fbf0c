//! The virtio 1.x PCI transport (virtio 1.2 §4.1): one memory BAR holding the common
//! configuration, ISR, device configuration, notification area and the MSI-X table.

use crate::device::{
    ActivateContext, Activator, InlineActivator, ThreadHooks, VirtioDevice, VirtioInterrupt,
};
use crate::{features, status, GuestMemory};
use keel_hypervisor::IrqRouter;
use keel_pci::{
    BarAllocator, BarKind, BarRegion, MsiRouter, MsixConfig, PciConfiguration, PciDevice, PciError,
    PciHeader,
};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Registers queue-notification addresses with the hypervisor (KVM ioeventfd).
pub trait IoEvents: Send + Sync {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
}

impl IoEvents for IrqRouter {
    fn register(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.register_mmio_ioevent(evt, addr)
            .map_err(|e| e.to_string())
    }
    fn unregister(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.unregister_mmio_ioevent(evt, addr)
            .map_err(|e| e.to_string())
    }
}

const VIRTIO_VENDOR: u16 = 0x1af4;
const DEVICE_ID_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const REGION_LEN: u64 = 0x1000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Most queues a device may have: the MSI-X table holds queues + 1 vectors in 0x2000 bytes,
/// and the notification area one 4-byte slot per queue.
pub const MAX_QUEUES: usize = 511;
const NO_VECTOR: u16 = 0xffff;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// State the device threads touch when they interrupt the driver.
struct Signals {
    msix: Mutex<MsixConfig>,
    isr: AtomicU8,
    status: AtomicU8,
    generation: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl Signals {
    fn raise(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .trigger(usize::from(vector));
        }
    }
}

struct PciInterrupt(Arc<Signals>);

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.0.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        if let Some(v) = self.0.queue_vectors.get(usize::from(queue)) {
            self.0.raise(v.load(Ordering::SeqCst));
        }
    }

    fn signal_config(&self) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.0.raise(self.0.config_vector.load(Ordering::SeqCst));
    }

    fn device_broken(&self, why: &str) {
        keel_pci::guest_warn!("virtio device needs a reset: {why}");
        self.0
            .status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::SeqCst);
        self.signal_config();
    }
}

/// Where the transport starts its device, and what runs first on the device's threads.
#[derive(Clone)]
pub struct DeviceRuntime {
    pub activator: Arc<dyn Activator>,
    pub hooks: ThreadHooks,
}

impl DeviceRuntime {
    /// Activations run at once on the thread that sets `DRIVER_OK`; no thread hooks.
    pub fn inline() -> Self {
        DeviceRuntime {
            activator: Arc::new(InlineActivator),
            hooks: ThreadHooks::default(),
        }
    }
}

/// A virtio device on the PCI bus.
///
/// Locking: the bus holds this transport's lock during every register access; the device
/// model has a lock of its own, taken inside it (config space, reset) and by a queued
/// activation, which never takes the transport's lock: no cycle.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    name: String,
    runtime: DeviceRuntime,
    /// The start of the data path handed to the activator and not yet run: taken by the
    /// job, or back by a reset (cancelled) or a pause (its queues kept).
    pending: Arc<Mutex<Option<ActivateContext>>>,
    /// Paused for a snapshot ([`Self::pause`]): the data path is stopped, `queues` hold
    /// the positions.
    paused: bool,
    /// Where BAR 0 may be placed (the allocator's window).
    bar_window: (u64, u64),
    signals: Arc<Signals>,
    mem: GuestMemory,
    ioevents: Arc<dyn IoEvents>,
    max_sizes: Vec<u16>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    /// Ring addresses (descriptor, driver, device) as the driver wrote them, per queue.
    ring_addrs: Vec<[u64; 3]>,
    bar_addr: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    activated: bool,
    cfg_cap: usize,
}

fn pci_class(device_type: u32) -> (u8, u8) {
    match device_type {
        crate::types::BLOCK => (0x01, 0x00),
        crate::types::NET => (0x02, 0x00),
        _ => (0xff, 0x00),
    }
}

fn vendor_cap(kind: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![CAP_VENDOR, 0, (16 + extra.len()) as u8, kind, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPciDevice {
    /// Wraps `device`, placing its BAR with `bars` and its MSI-X vectors with `msi`; its
    /// activations go through `runtime`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        msi: Arc<dyn MsiRouter>,
        ioevents: Arc<dyn IoEvents>,
        bars: &mut BarAllocator,
        runtime: DeviceRuntime,
    ) -> Result<Self, PciError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(PciError::Msi(format!(
                "{} queues (1..={MAX_QUEUES})",
                max_sizes.len()
            )));
        }
        let queues = max_sizes
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PciError::Msi(format!("queue setup: {e}")))?;
        let queue_events = max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PciError::Msi(format!("queue eventfd: {e}")))?;
        let dtype = device.device_type();
        let (class, subclass) = pci_class(dtype);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_VENDOR,
            device_id: DEVICE_ID_BASE + dtype as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_VENDOR,
            subsystem_id: 0x40,
        });
        let addr = bars.allocate(BAR_SIZE)?;
        let bar_window = bars.window();
        config.add_bar(
            BarRegion {
                index: 0,
                kind: BarKind::Mem32,
                size: BAR_SIZE,
                prefetchable: false,
            },
            addr,
        )?;
        let mut msix = MsixConfig::new(max_sizes.len() + 1, msi)?;
        msix.add_capability(&mut config, 0, MSIX_TABLE as u32, MSIX_PBA as u32)?;
        let ro = |c: &Vec<u8>| vec![0u8; c.len()];
        for cap in [
            vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]),
            vendor_cap(CAP_ISR, ISR, 1, &[]),
            vendor_cap(CAP_DEVICE, DEVICE_CFG, REGION_LEN, &[]),
            vendor_cap(
                CAP_NOTIFY,
                NOTIFY,
                max_sizes.len() as u64 * NOTIFY_MULTIPLIER,
                &(NOTIFY_MULTIPLIER as u32).to_le_bytes(),
            ),
        ] {
            config.add_capability(&cap, &ro(&cap))?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through configuration space.
        let cfg = vendor_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut w = vec![0u8; cfg.len()];
        w[4] = 0xff;
        w[8..20].fill(0xff);
        let cfg_cap = config.add_capability(&cfg, &w)?;
        // Firmware would have assigned and enabled the BAR; Keel is the firmware.
        config.enable_decoding();
        let signals = Arc::new(Signals {
            msix: Mutex::new(msix),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: max_sizes
                .iter()
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
        });
        let mut dev = VirtioPciDevice {
            config,
            name: device.name(),
            device: Arc::new(Mutex::new(device)),
            runtime,
            pending: Arc::new(Mutex::new(None)),
            paused: false,
            bar_window,
            signals,
            mem,
            ioevents,
            max_sizes,
            ring_addrs: vec![[0; 3]; queues.len()],
            queues,
            queue_events,
            bar_addr: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            activated: false,
            cfg_cap,
        };
        dev.bar_moved(0, None, Some(addr));
        Ok(dev)
    }

    /// The device's name for logs.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    fn dev(&self) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where BAR 0 decodes now.
    pub fn bar_address(&self) -> Option<u64> {
        self.bar_addr
    }

    fn device_features(&self) -> u64 {
        self.dev().features() | features::VERSION_1
    }

    fn status(&self) -> u8 {
        self.signals.status.load(Ordering::SeqCst)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = usize::from(self.queue_select);
        let qv = |s: &Self| -> Option<(u16, u16, bool, u64, u64, u64)> {
            let queue = s.queues.get(q)?;
            Some((
                queue.size(),
                s.signals.queue_vectors.get(q)?.load(Ordering::SeqCst),
                queue.ready(),
                queue.desc_table(),
                queue.avail_ring(),
                queue.used_ring(),
            ))
        };
        let (size, vector, ready, desc, avail, used) = qv(self).unwrap_or_default();
        let page = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select.into(),
            (0x04, 4) => page(self.device_features(), self.device_feature_select).into(),
            (0x08, 4) => self.driver_feature_select.into(),
            (0x0c, 4) => page(self.driver_features, self.driver_feature_select).into(),
            (0x10, 2) => self.signals.config_vector.load(Ordering::SeqCst).into(),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => self.status().into(),
            (0x15, 1) => self.signals.generation.load(Ordering::SeqCst).into(),
            (0x16, 2) => self.queue_select.into(),
            (0x18, 2) => size.into(),
            (0x1a, 2) => vector.into(),
            (0x1c, 2) => u64::from(ready),
            (0x1e, 2) if q < self.queues.len() => q as u64,
            (0x20, 8) => desc,
            (0x20, 4) => desc & 0xffff_ffff,
            (0x24, 4) => desc >> 32,
            (0x28, 8) => avail,
            (0x28, 4) => avail & 0xffff_ffff,
            (0x2c, 4) => avail >> 32,
            (0x30, 8) => used,
            (0x30, 4) => used & 0xffff_ffff,
            (0x34, 4) => used >> 32,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let live = self.status() & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status() & status::FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (v << shift);
            }
            (0x10, 2) => {
                let vector = self.valid_vector(v as u16);
                self.signals.config_vector.store(vector, Ordering::SeqCst);
            }
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x1a, 2) => {
                let vector = self.valid_vector(v as u16);
                if let Some(slot) = self
                    .signals
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            // The rest of the queue configuration is frozen while the device runs.
            _ if live => {}
            (0x18, 2) => {
                if let Some(q) = self.selected() {
                    if !q.ready() {
                        // Queue::set_size ignores sizes that are not a power of two up to max.
                        q.set_size(v as u16);
                    }
                }
            }
            (0x1c, 2) if v == 1 => {
                if let Some(q) = self.selected() {
                    q.set_ready(true);
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                self.write_queue_address(offset, v, data.len())
            }
            _ => {}
        }
    }

    fn write_queue_address(&mut self, offset: u64, v: u64, len: usize) {
        let Some(q) = self.selected() else {
            return;
        };
        if q.ready() {
            return;
        }
        let (lo, hi) = match (offset % 8, len) {
            (0, 8) => (Some(v as u32), Some((v >> 32) as u32)),
            (0, 4) => (Some(v as u32), None),
            (4, 4) => (None, Some(v as u32)),
            _ => return,
        };
        // Remember what the driver asked for: virtio-queue keeps the old value when an address
        // is misaligned, and activation must not run a queue on rings the driver never meant.
        let field = ((offset & !7) - 0x20) as usize / 8;
        let q_index = usize::from(self.queue_select);
        if let Some(slot) = self
            .ring_addrs
            .get_mut(q_index)
            .and_then(|r| r.get_mut(field))
        {
            if let Some(lo) = lo {
                *slot = (*slot & !0xffff_ffff) | u64::from(lo);
            }
            if let Some(hi) = hi {
                *slot = (*slot & 0xffff_ffff) | u64::from(hi) << 32;
            }
        }
        let Some(q) = self.selected() else {
            return;
        };
        match offset & !7 {
            0x20 => q.set_desc_table_address(lo, hi),
            0x28 => q.set_avail_ring_address(lo, hi),
            0x30 => q.set_used_ring_address(lo, hi),
            _ => {}
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        let n = self
            .signals
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count();
        if usize::from(v) < n {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        let mut new = v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                tracing::debug!(
                    "{}: driver features {:#x} not a subset of {offered:#x} with VERSION_1",
                    self.name,
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        // Keep DEVICE_NEEDS_RESET once set: only a reset clears it.
        new |= old & status::DEVICE_NEEDS_RESET;
        self.signals.status.store(new, Ordering::SeqCst);
        let ready = status::FEATURES_OK | status::DRIVER_OK;
        if new & ready == ready && new & status::FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PciInterrupt(self.signals.clone()));
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            let asked = self.ring_addrs.get(i).copied().unwrap_or_default();
            if q.ready() && asked != [q.desc_table(), q.avail_ring(), q.used_ring()] {
                interrupt.device_broken(&format!(
                    "{}: queue {i} ring addresses {asked:x?} are misaligned",
                    self.name
                ));
                return;
            }
            if q.ready() && !q.is_valid(&self.mem) {
                interrupt.device_broken(&format!(
                    "{}: queue {i} has rings outside guest memory or misaligned",
                    self.name
                ));
                return;
            }
            q.set_event_idx(event_idx);
        }
        self.activated = true;
        self.launch(false);
    }

    /// Stops the device's data path (synchronously: the driver may read the status back
    /// as 0 at once, and then its rings must be free) and cancels a queued activation.
    fn stop_device(&mut self) {
        let mut dev = self.device.lock().unwrap_or_else(|p| p.into_inner());
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.activated {
            dev.reset();
            self.activated = false;
        }
        self.paused = false;
    }

    fn reset(&mut self) {
        self.stop_device();
        for (q, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            *q = Queue::new(max).unwrap_or_default();
        }
        for v in &self.signals.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.ring_addrs.fill([0; 3]);
        for e in &self.queue_events {
            let _ = e.read();
        }
        self.signals
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        self.signals.isr.store(0, Ordering::SeqCst);
        self.signals.status.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
    }

    fn notify(&self, offset: u64) {
        let i = offset / NOTIFY_MULTIPLIER;
        if let Some(e) = self.queue_events.get(i as usize) {
            let _ = e.write(1);
        }
    }

    fn cfg_window(&self) -> Option<(u64, usize)> {
        let c = self.cfg_cap;
        let bar = self.config.read_u32(c + 4) & 0xff;
        let offset = self.config.read_u32(c + 8);
        let len = self.config.read_u32(c + 12) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4)).then_some((u64::from(offset), len))
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.cfg_cap + 16;
        if (window..window + 4).contains(&offset) {
            data.fill(0);
            if let Some((at, len)) = self.cfg_window() {
                let mut buf = [0u8; 4];
                self.read_bar(0, at, &mut buf[..len]);
                for (i, out) in data.iter_mut().enumerate() {
                    *out = buf.get(offset - window + i).copied().unwrap_or(0);
                }
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let window = self.cfg_cap + 16;
        if offset == window {
            if let Some((at, len)) = self.cfg_window() {
                if data.len() >= len {
                    self.write_bar(0, at, &data[..len]);
                }
            }
            return;
        }
        self.config.write(offset, data);
        self.signals
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config_written(&self.config, offset, data.len());
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN && matches!(data.len(), 1 | 2 | 4 | 8) => {
                self.common_read(o, data)
            }
            o if (ISR..ISR + REGION_LEN).contains(&o) => {
                // Reading the ISR acknowledges it.
                data.fill(0);
                if o == ISR {
                    data[0] = self.signals.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION_LEN).contains(&o) => {
                self.dev().read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .signals
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self
                .signals
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_pba(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN && matches!(data.len(), 1 | 2 | 4 | 8) => {
                self.common_write(o, data)
            }
            o if (DEVICE_CFG..DEVICE_CFG + REGION_LEN).contains(&o) => {
                self.dev().write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..NOTIFY + REGION_LEN).contains(&o) => self.notify(o - NOTIFY),
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .signals
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != 0 {
            return;
        }
        for (i, evt) in self.queue_events.iter().enumerate() {
            let slot = NOTIFY + i as u64 * NOTIFY_MULTIPLIER;
            if let Some(base) = old {
                if let Err(e) = self.ioevents.unregister(evt, base + slot) {
                    keel_pci::guest_warn!("{}: queue {i} ioeventfd: {e}", self.name);
                }
            }
            if let Some(base) = new {
                if let Err(e) = self.ioevents.register(evt, base + slot) {
                    // Notifications still work, through an exit to the vCPU thread.
                    keel_pci::guest_warn!("{}: queue {i} ioeventfd: {e}", self.name);
                }
            }
        }
        self.bar_addr = new;
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.stop_device();
    }
}

#[path = "pci_state.rs"]
mod state_impl;

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
