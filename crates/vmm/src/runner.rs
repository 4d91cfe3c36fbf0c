//! Running a built VM: one thread per vCPU, and the calling thread as the event loop that
//! feeds console input and waits for a stop.

use crate::exit::{ExitReason, ExitStats, Outcome};
use crate::memory::GuestMemoryMmap;
use crate::report::describe_vcpu;
use crate::{Vmm, VmmError};
use keel_arch::layout::{ROM_SIZE, ROM_START};
use keel_devices::{Bus, PlatformEvents, StopRequest};
use keel_hypervisor::{Vcpu, VcpuExit};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// The first stop request wins; later ones are ignored.
pub(crate) struct StopState {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl StopState {
    pub(crate) fn new() -> Result<Self, VmmError> {
        Ok(StopState {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
                what: "stop eventfd",
                source,
            })?,
        })
    }

    pub(crate) fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl PlatformEvents for StopState {
    fn request_stop(&self, request: StopRequest, source: &'static str) {
        self.request(match request {
            StopRequest::PowerOff => ExitReason::PowerOff { source },
            StopRequest::Reset => ExitReason::Reset { source },
        });
    }
}

#[derive(Default)]
struct Counters {
    io_exits: AtomicU64,
    mmio_exits: AtomicU64,
    unhandled_io: AtomicU64,
    unhandled_mmio: AtomicU64,
    rom_writes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ExitStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitStats {
            io_exits: g(&self.io_exits),
            mmio_exits: g(&self.mmio_exits),
            unhandled_io: g(&self.unhandled_io),
            unhandled_mmio: g(&self.unhandled_mmio),
            rom_writes: g(&self.rom_writes),
        }
    }
}

/// What every vCPU thread shares.
pub(crate) struct Shared {
    pio: Bus,
    mmio: Bus,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) stop: Arc<StopState>,
    counters: Counters,
    running_vcpus: AtomicU32,
    pub(crate) pause: crate::pause::PauseGate,
}

impl Shared {
    pub(crate) fn new(
        pio: Bus,
        mmio: Bus,
        mem: GuestMemoryMmap,
        stop: Arc<StopState>,
        vcpus: u32,
    ) -> Self {
        Shared {
            pio,
            mmio,
            mem,
            stop,
            counters: Counters::default(),
            running_vcpus: AtomicU32::new(vcpus),
            pause: crate::pause::PauseGate::default(),
        }
    }
}

/// Log the first few unhandled accesses; a guest probing for hardware makes many.
const UNHANDLED_LOG_LIMIT: u64 = 16;

/// What the exit loop does after handling one exit.
enum Next {
    Continue,
    /// This vCPU is done (halted for good); the others carry on.
    Leave,
    Stop(ExitReason),
    Fatal(String),
}

fn handle_exit(vcpu: &mut Vcpu, sh: &Shared) -> Next {
    let c = &sh.counters;
    match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            c.io_exits.fetch_add(1, Ordering::Relaxed);
            if !sh.pio.read(port.into(), data) {
                data.fill(0xff);
                unhandled(&c.unhandled_io, || format!("in from unhandled port {port:#x}"));
            }
            Next::Continue
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            c.io_exits.fetch_add(1, Ordering::Relaxed);
            if !sh.pio.write(port.into(), data) {
                unhandled(&c.unhandled_io, || format!("out {data:02x?} to unhandled port {port:#x}"));
            }
            Next::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            c.mmio_exits.fetch_add(1, Ordering::Relaxed);
            if !sh.mmio.read(addr, data) {
                data.fill(0xff);
                unhandled(&c.unhandled_mmio, || format!("read of unbacked guest-physical {addr:#x}"));
            }
            Next::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            c.mmio_exits.fetch_add(1, Ordering::Relaxed);
            if (ROM_START..ROM_START + ROM_SIZE).contains(&addr) {
                let n = c.rom_writes.fetch_add(1, Ordering::Relaxed);
                if n < UNHANDLED_LOG_LIMIT {
                    tracing::debug!("guest wrote {data:02x?} to ROM at {addr:#x}: ignored");
                }
            } else if !sh.mmio.write(addr, data) {
                unhandled(&c.unhandled_mmio, || format!("write {data:02x?} to unbacked guest-physical {addr:#x}"));
            }
            Next::Continue
        }
        Ok(VcpuExit::Interrupted) => Next::Continue,
        Ok(VcpuExit::Hlt) => {
            // Only reachable without an in-kernel LAPIC: this vCPU can never wake again.
            if sh.running_vcpus.fetch_sub(1, Ordering::SeqCst) == 1 {
                Next::Stop(ExitReason::Halted)
            } else {
                Next::Leave
            }
        }
        Ok(VcpuExit::Shutdown) => Next::Stop(ExitReason::Reset { source: "triple fault" }),
        Ok(VcpuExit::SystemShutdown) => Next::Stop(ExitReason::PowerOff { source: "KVM system event" }),
        Ok(VcpuExit::SystemReset) => Next::Stop(ExitReason::Reset { source: "KVM system event" }),
        Ok(VcpuExit::SystemCrash) => Next::Stop(ExitReason::GuestCrash),
        Ok(VcpuExit::InternalError(info)) => Next::Fatal(format!(
            "KVM internal error: {} (suberror {}, data {:x?})",
            info.describe(),
            info.suberror,
            info.data
        )),
        Ok(VcpuExit::FailEntry { reason, cpu }) => Next::Fatal(format!(
            "KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
        )),
        Ok(VcpuExit::Unexpected(what)) => Next::Fatal(format!("unexpected KVM exit: {what}")),
        Err(e) => Next::Fatal(e.to_string()),
    }
}

fn unhandled(counter: &AtomicU64, what: impl FnOnce() -> String) {
    if counter.fetch_add(1, Ordering::Relaxed) < UNHANDLED_LOG_LIMIT {
        tracing::debug!("{}", what());
    }
}

fn vcpu_thread(mut vcpu: Vcpu, sh: Arc<Shared>, seccomp: bool) {
    if let Err(e) = crate::confine::apply(seccomp, keel_seccomp::ThreadKind::Vcpu) {
        sh.stop.request(ExitReason::VcpuFailed {
            vcpu: vcpu.id(),
            error: e,
            state: String::new(),
        });
        return;
    }
    vcpu.publish_immediate_exit();
    run_vcpu(&mut vcpu, &sh);
    if tracing::enabled!(tracing::Level::DEBUG) {
        if let (Ok(r), Ok(mp)) = (vcpu.get_regs(), vcpu.get_mp_state()) {
            tracing::debug!(
                "vCPU {} left at rip={:#x} (mp_state {})",
                vcpu.id(),
                r.rip,
                mp.mp_state
            );
        }
    }
}

impl Shared {
    /// vCPUs that have not halted for good.
    pub(crate) fn running_vcpus(&self) -> u32 {
        self.running_vcpus.load(Ordering::SeqCst)
    }
}

fn run_vcpu(vcpu: &mut Vcpu, sh: &Shared) {
    while !sh.stop.is_stopping() {
        let id = vcpu.id();
        let parked = sh.pause.park_if_requested(
            id,
            || sh.stop.is_stopping(),
            |msrs| vcpu.save_state(msrs).map_err(|e| e.to_string()),
        );
        if parked {
            continue; // the loop's condition sees a stop that ended the pause
        }
        match handle_exit(vcpu, sh) {
            Next::Continue => {}
            Next::Stop(reason) => {
                sh.stop.request(reason);
                break;
            }
            Next::Leave => break,
            Next::Fatal(msg) => {
                sh.stop.request(ExitReason::VcpuFailed {
                    vcpu: vcpu.id(),
                    error: msg,
                    state: describe_vcpu(vcpu, &sh.mem),
                });
                break;
            }
        }
    }
}

/// Where a VM that arrived by migration tells the sender it runs.
enum Ack {
    Whole(Box<keel_migration::Channel<std::net::TcpStream>>),
    /// Post-copy: the sending half, shared with the thread that asks for pages.
    Shared(Arc<Mutex<keel_migration::ChannelTx<std::net::TcpStream>>>),
}

impl Ack {
    fn resumed(self) -> Result<(), keel_migration::Error> {
        let m = keel_migration::Message::Resumed;
        match self {
            Ack::Whole(mut ch) => ch.send(&m).and_then(|()| ch.flush()),
            Ack::Shared(tx) => {
                let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
                tx.send(&m).and_then(|()| tx.flush())
            }
        }
    }
}

/// When a migrated guest's MAC is announced after it starts running here: at once, then
/// with growing gaps, for switches that missed the first (QEMU's default pattern).
const ANNOUNCE_AT_MS: [u64; 5] = [0, 50, 150, 300, 500];

/// Announces each guest MAC on its tap, from a thread of its own, so traffic follows the
/// guest to this host (see `keel_net::rarp_announcement`).
fn announce_moved(taps: Vec<(Arc<keel_net::Tap>, keel_net::MacAddr)>, seccomp: bool) {
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            if let Err(e) = crate::confine::apply(seccomp, keel_seccomp::ThreadKind::Device) {
                tracing::error!("announcing the migrated guest: {e}");
                return;
            }
            let start = Instant::now();
            for at in ANNOUNCE_AT_MS {
                let wait = Duration::from_millis(at).saturating_sub(start.elapsed());
                std::thread::sleep(wait);
                for (tap, mac) in &taps {
                    if let Err(e) = tap.announce(*mac) {
                        tracing::warn!("announcing {mac} on {}: {e}", tap.name());
                    }
                }
            }
            tracing::debug!("announced {} address(es)", taps.len());
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot announce the migrated guest's addresses: {e}");
    }
}

impl Vmm {
    /// Runs the VM until the guest powers off or resets, a vCPU fails, or a stop is
    /// requested. Console input is fed on the calling thread.
    pub fn run(mut self) -> Result<Outcome, VmmError> {
        keel_hypervisor::install_kick_handler()?;
        let start = Instant::now();
        let seccomp = self.config.seccomp;
        if seccomp {
            // Before any thread starts: every thread of the VM descends from this one.
            keel_seccomp::prepare()?;
            keel_seccomp::apply(keel_seccomp::ThreadKind::Vmm)?;
            tracing::debug!("seccomp: filters installed (vmm thread)");
        }
        // A restored VM's memory pager: first, and dropped (stopped) last, after every
        // thread that may touch guest memory.
        let lazy_memory = self.lazy_memory.take();
        let migration_ack = self.migration_ack.take();
        let announce = std::mem::take(&mut self.announce);
        // A VM that arrived by post-copy: its threads serve memory before any vCPU runs, and
        // are ended (closing the userfaultfd) only after the vCPUs are.
        let (migration_ack, _postcopy) = match (migration_ack, self.postcopy.take()) {
            (Some(ch), Some(remote)) => {
                let (tx, rx) = ch.split().map_err(|e| VmmError::Migration(e.to_string()))?;
                let tx = Arc::new(Mutex::new(tx));
                let threads = crate::migration::postcopy::PostcopyThreads::start(
                    remote,
                    tx.clone(),
                    rx,
                    self.shared.stop.clone(),
                    seccomp,
                )?;
                (Some(Ack::Shared(tx)), Some(threads))
            }
            (Some(ch), None) => (Some(Ack::Whole(Box::new(ch))), None),
            (None, _) => (None, None),
        };
        let _pager = match &lazy_memory {
            Some(lazy) => Some(crate::snapshot::lazy::PagerThreads::start(
                lazy.clone(),
                self.shared.stop.clone(),
                seccomp,
            )?),
            None => None,
        };
        let Vmm {
            vcpus,
            vm,
            shared,
            serial,
            debug_port,
            power_button,
            pci,
            api_listener,
            statm,
            // Held to the end of `run`: the cgroup is left and removed after every thread.
            _cgroup: cgroup,
            console_in,
            console_escape,
            config,
            activator,
            mut snapshotter,
            disk_info,
            ..
        } = self;
        tracing::debug!("PCI devices: {:?}", pci.names);
        let _cgroup = cgroup;
        let _api = match (api_listener, &config.api_socket) {
            (Some(l), Some(path)) => {
                let control = crate::api::Control {
                    info: keel_api::VmInfo {
                        vcpus: config.vcpus,
                        memory_bytes: config.memory,
                        devices: pci.names.clone(),
                        vmm_rss_bytes: 0,
                        state: keel_api::VmState::Running,
                        disks: Vec::new(),
                        memory_pager: None,
                    },
                    balloon: pci.balloon.clone(),
                    statm,
                    shared: shared.clone(),
                    snapshots: snapshotter.as_ref().map(|s| s.requests.clone()),
                    disks: disk_info.clone(),
                    pager: lazy_memory.clone(),
                };
                Some(crate::api::ApiServer::start(
                    l,
                    path.clone(),
                    Arc::new(control),
                    seccomp,
                )?)
            }
            _ => None,
        };
        let power = PowerButton {
            evt: power_button,
            timeout: Duration::from_secs(config.shutdown_timeout_secs.into()),
            deadline: None,
        };
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let sh = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || vcpu_thread(vcpu, sh, seccomp))
                .map_err(|source| VmmError::Io {
                    what: "spawning a vCPU thread",
                    source,
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop.request(ExitReason::Halted);
                    stop_threads(threads);
                    return Err(e);
                }
            }
        }
        shared
            .pause
            .register_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        // A VM that arrived by migration runs here now: the sender may stop. If this word
        // is lost, the sender stays paused (it never resumes without it).
        if let Some(ack) = migration_ack {
            let said = ack.resumed();
            match said {
                Ok(()) => tracing::info!("migration: the VM runs here; told the sender"),
                Err(e) => {
                    tracing::error!("migration: the VM runs here, but the sender was not told: {e}")
                }
            }
        }
        if !announce.is_empty() {
            announce_moved(announce, seccomp);
        }
        let console = Console::new(console_in, console_escape);
        let snapshots = snapshotter.as_mut().map(|s| (s, &vm));
        event_loop(&shared, &serial, &activator, snapshots, console, power);
        // No kick may name a thread once it is joined.
        shared.pause.register_threads(Vec::new());
        stop_threads(threads);
        drop(vm);
        serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
        let last_post_code = debug_port
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_code();
        let reason = shared.stop.take().unwrap_or(ExitReason::Halted);
        Ok(Outcome {
            reason,
            wall_time: start.elapsed(),
            stats: shared.counters.snapshot(),
            last_post_code,
        })
    }
}

fn stop_threads(threads: Vec<std::thread::JoinHandle<()>>) {
    // Kick until every thread has left KVM_RUN: a kick that lands between the stop check and
    // KVM_RUN is caught by immediate_exit, but repeat in case a thread had not yet published.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_micros(50);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: the pthread_t comes from a live JoinHandle (not yet joined), so it names
            // a thread of this process; the kick signal has a handler that only sets a flag.
            unsafe { libc::pthread_kill(t.as_pthread_t(), keel_hypervisor::kick_signal()) };
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
    for t in threads {
        if t.is_finished() {
            let _ = t.join();
        } else {
            tracing::error!("a vCPU thread did not stop within 10 s; leaving it behind");
        }
    }
}

/// Console input, with the Ctrl-A escape.
struct Console {
    fd: Option<OwnedFd>,
    escape: bool,
    saw_ctrl_a: bool,
    pending: VecDeque<u8>,
}

const CTRL_A: u8 = 0x01;

impl Console {
    fn new(fd: Option<OwnedFd>, escape: bool) -> Self {
        if let Some(f) = &fd {
            // SAFETY: fcntl on a valid, owned fd with valid flag arguments.
            unsafe {
                let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
        }
        Console {
            fd,
            escape,
            saw_ctrl_a: false,
            pending: VecDeque::new(),
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Reads what is available; returns true when the user typed the escape to quit.
    fn read_input(&mut self) -> bool {
        let Some(fd) = self.raw_fd() else {
            return false;
        };
        let mut buf = [0u8; 256];
        // SAFETY: reading into a stack buffer of the given length from an owned fd.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            // EOF: no more input (e.g. stdin is /dev/null); stop watching it.
            self.fd = None;
            return false;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                tracing::warn!("console input failed, ignoring it from now on: {e}");
                self.fd = None;
            }
            return false;
        }
        for &b in buf.iter().take(n as usize) {
            if !self.escape {
                self.pending.push_back(b);
            } else if self.saw_ctrl_a {
                self.saw_ctrl_a = false;
                match b {
                    b'x' | b'X' => return true,
                    CTRL_A => self.pending.push_back(CTRL_A),
                    other => {
                        self.pending.push_back(CTRL_A);
                        self.pending.push_back(other);
                    }
                }
            } else if b == CTRL_A {
                self.saw_ctrl_a = true;
            } else {
                self.pending.push_back(b);
            }
        }
        false
    }
}

// Signals that stop the VM: the handler records the signal and wakes the event loop.
static SIGNAL_STOP_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the stop eventfd of the running VM
        // (or a stale number after it ended, where a failed write is harmless).
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP stop the running VM cleanly (exit status 128+N).
pub fn install_stop_signal_handlers() -> Result<(), VmmError> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal).map_err(|e| {
            VmmError::Io {
                what: "installing a signal handler",
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

/// SIGTERM asks the guest to shut down through its ACPI power button; a guest that has not
/// powered off when the timeout runs out (or a second SIGTERM) is stopped.
struct PowerButton {
    evt: EventFd,
    timeout: Duration,
    deadline: Option<Instant>,
}

impl PowerButton {
    /// Handles SIGTERM; returns true when the VM must stop now.
    fn on_sigterm(&mut self) -> bool {
        if self.deadline.is_some() || self.timeout.is_zero() {
            return true;
        }
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("cannot press the guest's power button: {e}");
            return true;
        }
        tracing::info!(
            "SIGTERM: pressed the guest's power button; it is stopped if it has not powered off in {} s",
            self.timeout.as_secs()
        );
        self.deadline = Some(Instant::now() + self.timeout);
        false
    }

    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Milliseconds until the deadline, for poll(2).
    fn poll_timeout(&self) -> Option<i32> {
        self.deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
        })
    }
}

fn event_loop(
    sh: &Shared,
    serial: &Mutex<keel_devices::serial::Serial>,
    activator: &crate::activator::QueuedActivator,
    mut snapshots: Option<(&mut crate::snapshot::Snapshotter, &keel_hypervisor::Vm)>,
    mut console: Console,
    mut power: PowerButton,
) {
    SIGNAL_STOP_FD.store(sh.stop.evt.as_raw_fd(), Ordering::SeqCst);
    loop {
        let sig = LAST_SIGNAL.swap(0, Ordering::SeqCst);
        if sig == libc::SIGTERM {
            if power.on_sigterm() {
                sh.stop.request(ExitReason::Signal(sig));
            }
        } else if sig != 0 {
            sh.stop.request(ExitReason::Signal(sig));
        }
        if power.expired() {
            tracing::warn!(
                "the guest did not power off within {} s of its power button; stopping it",
                power.timeout.as_secs()
            );
            sh.stop.request(ExitReason::Signal(libc::SIGTERM));
        }
        if sh.stop.is_stopping() {
            break;
        }
        // Feed what is pending first; while the guest's FIFO is full, poll again soon.
        if !console.pending.is_empty() {
            let mut s = serial.lock().unwrap_or_else(|p| p.into_inner());
            let (a, _) = console.pending.as_slices();
            let n = s.enqueue_input(a);
            console.pending.drain(..n);
        }
        let mut fds = vec![
            libc::pollfd {
                fd: sh.stop.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: activator.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: snapshots.as_ref().map_or(-1, |(s, _)| s.requests.fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let watch_input = console.pending.is_empty();
        if let (true, Some(fd)) = (watch_input, console.raw_fd()) {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut timeout = if console.pending.is_empty() { -1 } else { 10 };
        if let Some(t) = power.poll_timeout() {
            timeout = if timeout < 0 { t } else { timeout.min(t) };
        }
        // SAFETY: `fds` is a valid array of pollfd of the given length for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            continue; // EINTR from a signal: loop to pick it up
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = sh.stop.evt.read();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            activator.run_pending();
        }
        if fds[2].revents & libc::POLLIN != 0 {
            if let Some((s, vm)) = snapshots.as_mut() {
                s.run_pending(vm, sh);
            }
        }
        if fds.len() > 3 && fds[3].revents != 0 && console.read_input() {
            sh.stop.request(ExitReason::ConsoleEscape);
        }
    }
    SIGNAL_STOP_FD.store(-1, Ordering::SeqCst);
}
