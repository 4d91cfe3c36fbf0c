//! `keel`: run a VM on the serial console, or check what this host offers.

mod ctl;
mod host_check;
mod jailed;
mod migrate;
mod restore;
mod snapshot;
mod terminal;

use clap::{Parser, Subcommand};
use keel_rate_limiter::{BucketConfig, RateLimitConfig};
use keel_vmm::device_config::{DiskConfig, NetConfig, VsockConfig};
use keel_vmm::{parse_size, VmConfig, VmIo, Vmm};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a KVM hypervisor",
    propagate_version = true
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); also KEEL_LOG.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM with its serial console on this terminal.
    ///
    /// The VM ends when the guest powers off or reboots (exit status 0), on SIGINT/SIGTERM
    /// (128+signal), on Ctrl-A x typed at the console (0), or when a vCPU fails (1).
    Run(Box<RunArgs>),
    /// Control a running VM through its API socket.
    Ctl(ctl::CtlArgs),
    /// Stop a running VM's vCPUs (it keeps its state; `keel resume` lets it run again).
    Pause(VmArg),
    /// Let a paused VM run again.
    Resume(VmArg),
    /// Snapshot a running VM (memory, vCPUs, devices and disks) into a directory; or list
    /// or delete snapshots.
    Snapshot(snapshot::SnapshotArgs),
    /// Start a VM from a snapshot, on this terminal like `keel run`. Its disks get new
    /// overlays over the snapshot's, so any snapshot can be restored again, in any order,
    /// and many times side by side.
    Restore(Box<restore::RestoreArgs>),
    /// Move a running VM to another host (where `keel receive` waits): it runs there after,
    /// and its VMM here exits.
    Migrate(migrate::MigrateArgs),
    /// Wait for a VM sent by `keel migrate` and run it here, on this terminal.
    Receive(Box<migrate::ReceiveArgs>),
    /// Report whether this host can run Keel VMs: the KVM kind, capabilities, cgroups, devices.
    HostCheck {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct VmArg {
    /// The VM's API socket (`keel run --api-socket PATH`).
    #[arg(long, value_name = "SOCKET")]
    vm: PathBuf,
}

/// How the VMM is confined: the same for `keel run` and `keel restore`.
#[derive(clap::Args)]
pub(crate) struct Confinement {
    /// Run without the per-thread seccomp filters (debugging only: a compromised VMM then
    /// keeps every system call).
    #[arg(long)]
    no_seccomp: bool,
    /// Run the VMM without its jail (namespaces, pivot_root, unprivileged uid): for
    /// debugging only.
    #[arg(long)]
    no_jail: bool,
    /// Directory below which each VM's jail root is mounted (as <DIR>/vm-<PID>).
    #[arg(long, value_name = "DIR", default_value = jailed::DEFAULT_JAIL_DIR)]
    jail_dir: PathBuf,
    /// The uid the jailed VMM runs as (default: one of its own, 0x4b000000 + keel's PID).
    #[arg(long, value_name = "UID")]
    jail_uid: Option<u32>,
    /// The gid the jailed VMM runs as (default: like the uid).
    #[arg(long, value_name = "GID")]
    jail_gid: Option<u32>,
    /// Join this network namespace (e.g. /var/run/netns/NAME) instead of a new, empty one;
    /// taps are then created there.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
}

impl Confinement {
    pub(crate) fn seccomp(&self) -> bool {
        !self.no_seccomp
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: bzImage, or ELF vmlinux (booted via PVH when it has the PVH note).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (initramfs).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = keel_vmm::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = keel_vmm::config::DEFAULT_VCPUS)]
    cpus: u32,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = memory_size)]
    memory: u64,
    /// Do not append the guest-side parameters this host's KVM needs (e.g. on PVM).
    #[arg(long)]
    no_host_quirks: bool,
    /// Limit the VM to this many CPUs' worth of time (e.g. 0.5, 1.5), through its cgroup.
    #[arg(long, value_name = "CPUS", value_parser = cpu_quota)]
    cpu_quota: Option<(u64, u64)>,
    /// The VM's share of contended CPU time, 1-10000 (100 is every process's default).
    #[arg(long, value_name = "WEIGHT", value_parser = clap::value_parser!(u32).range(1..=10000))]
    cpu_weight: Option<u32>,
    /// Hard memory limit for the whole VMM process, e.g. 600M, or `auto`: guest RAM plus
    /// 32 MiB for Keel's own memory (~2 MiB measured with no devices). Past it the kernel
    /// stops the VM; swap does not count as room.
    #[arg(long, value_name = "SIZE|auto", value_parser = memory_limit)]
    memory_limit: Option<MemoryLimit>,
    /// Most threads and processes the VMM may have.
    #[arg(long, value_name = "N")]
    pids_max: Option<u64>,
    /// Limit the data all of the VM's disks move together, bytes per second (e.g. 20M), with
    /// a 100 ms burst. Enforced by Keel on the guest's requests (one budget shared by the
    /// disks) and, where a disk image lives on a real block device, by the cgroup I/O
    /// throttle on that device (reads and writes each). Each disk's own bps= applies too.
    #[arg(long, value_name = "RATE", value_parser = positive_size)]
    io_bps: Option<u64>,
    /// Limit the requests all of the VM's disks make together, per second; enforced the same
    /// way as --io-bps. Each disk's own iops= applies too.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    io_iops: Option<u64>,
    /// Back all guest memory with host RAM before the guest starts.
    #[arg(long)]
    prefault: bool,
    /// A virtio-blk disk: path=IMG[,format=raw|qcow2][,readonly=on]. Repeatable; the first
    /// is /dev/vda. Its own limits: bps=RATE (bytes/s, e.g. 10M), iops=N, and their bursts
    /// bps_burst=SIZE, iops_burst=N (default: 100 ms worth).
    #[arg(long = "disk", value_name = "path=IMG,...", value_parser = DiskConfig::parse)]
    disks: Vec<DiskConfig>,
    /// A virtio-net NIC on a tap device: [tap=NAME][,mac=MAC]. Repeatable; without tap=,
    /// Keel creates one. Limits per direction (rx: to the guest, tx: from it): rx_bps=RATE,
    /// tx_bps=RATE (bytes/s, e.g. 1M), rx_pps=N, tx_pps=N (frames/s), and bursts
    /// rx_bps_burst=, tx_bps_burst=, rx_pps_burst=, tx_pps_burst=.
    #[arg(long = "net", value_name = "tap=NAME,...", value_parser = NetConfig::parse)]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device: cid=N[,socket=PATH] (host connections through the Unix
    /// socket PATH).
    #[arg(long, value_name = "cid=N,...", value_parser = VsockConfig::parse)]
    vsock: Option<VsockConfig>,
    /// A virtio-rng entropy device fed from the host's getrandom(2).
    #[arg(long)]
    rng: bool,
    /// A virtio memory balloon, sized through the API socket.
    #[arg(long)]
    balloon: bool,
    /// Listen for control requests (e.g. the balloon target) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    #[command(flatten)]
    confinement: Confinement,
    /// Seconds the guest gets to power off after SIGTERM presses its power button.
    #[arg(long, value_name = "SECS", default_value_t = keel_vmm::config::DEFAULT_SHUTDOWN_TIMEOUT_SECS)]
    shutdown_timeout: u32,
}

/// `--cpu-quota 1.5` → 150000 µs of CPU time per 100000 µs period.
fn cpu_quota(s: &str) -> Result<(u64, u64), String> {
    let cpus: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of CPUs (e.g. 0.5, 2)"))?;
    if !cpus.is_finite() || !(0.01..=1024.0).contains(&cpus) {
        return Err(format!("{s} CPUs is outside 0.01..=1024"));
    }
    const PERIOD: u64 = 100_000;
    Ok(((cpus * PERIOD as f64).round() as u64, PERIOD))
}

fn limits(args: &RunArgs) -> Option<keel_cgroup::Limits> {
    let l = keel_cgroup::Limits {
        cpu_quota: args.cpu_quota,
        cpu_weight: args.cpu_weight,
        memory_max: args.memory_limit.map(|l| match l {
            MemoryLimit::Auto => args
                .memory
                .saturating_add(keel_vmm::config::VMM_MEMORY_OVERHEAD),
            MemoryLimit::Size(n) => n,
        }),
        pids_max: args.pids_max,
        io: io_throttles(args),
    };
    (!l.controllers().is_empty()).then_some(l)
}

/// The cgroup I/O throttles for --io-bps/--io-iops: one per block device holding a disk
/// image. A disk on something else (tmpfs, overlay) gets none; Keel's own limiter still
/// holds it to the rate.
fn io_throttles(args: &RunArgs) -> Vec<keel_cgroup::IoLimit> {
    let mut out: Vec<keel_cgroup::IoLimit> = Vec::new();
    if args.io_bps.is_none() && args.io_iops.is_none() {
        return out;
    }
    for disk in &args.disks {
        match keel_cgroup::block_device_of(&disk.path) {
            Ok(Some((major, minor))) => {
                if out.iter().any(|l| (l.major, l.minor) == (major, minor)) {
                    continue;
                }
                tracing::info!(
                    "--io-bps/--io-iops: cgroup I/O throttle on block device {major}:{minor} \
                     (holds {})",
                    disk.path.display()
                );
                out.push(keel_cgroup::IoLimit {
                    major,
                    minor,
                    read_bps: args.io_bps,
                    write_bps: args.io_bps,
                    read_iops: args.io_iops,
                    write_iops: args.io_iops,
                });
            }
            Ok(None) => tracing::info!(
                "--io-bps/--io-iops: {} is not on a block device (tmpfs, overlay, ...): no \
                 cgroup I/O throttle there; Keel's own limit applies",
                disk.path.display()
            ),
            // Opening the disk reports a missing file with its own clear error.
            Err(e) => tracing::debug!("{}: {e}", disk.path.display()),
        }
    }
    out
}

/// The VM-wide limit shared by all disks.
fn io_limit(args: &RunArgs) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: args.io_bps.map(BucketConfig::with_rate),
        ops: args.io_iops.map(BucketConfig::with_rate),
    }
}

/// `--memory-limit`: a size, or guest RAM plus Keel's stated overhead.
#[derive(Clone, Copy, Debug)]
enum MemoryLimit {
    Auto,
    Size(u64),
}

fn memory_limit(s: &str) -> Result<MemoryLimit, String> {
    if s == "auto" {
        return Ok(MemoryLimit::Auto);
    }
    memory_size(s).map(MemoryLimit::Size)
}

pub(crate) fn memory_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A size of at least 1 (a rate in bytes per second).
fn positive_size(s: &str) -> Result<u64, String> {
    match parse_size(s).map_err(|e| e.to_string())? {
        0 => Err(format!("'{s}' must be at least 1 byte per second")),
        n => Ok(n),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line naming the problem (clap's first line), exit status 2.
            // Clap's message runs until the first blank line (a header and its indented items).
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("keel: {}", message.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    init_logging(&cli.log);
    match cli.command {
        Command::Run(args) => run(*args),
        Command::HostCheck { json } => host_check::run(json),
        Command::Ctl(args) => ctl::run(args),
        Command::Pause(a) => ctl::call(&a.vm, keel_api::Request::Pause),
        Command::Resume(a) => ctl::call(&a.vm, keel_api::Request::Resume),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Restore(args) => restore::run(*args),
        Command::Migrate(args) => migrate::migrate(args),
        Command::Receive(args) => migrate::receive(*args),
    }
}

fn init_logging(default: &str) {
    let filter = std::env::var("KEEL_LOG").unwrap_or_else(|_| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn run(args: RunArgs) -> ExitCode {
    let limits = limits(&args);
    let io_limit = io_limit(&args);
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.cpus,
        memory: args.memory,
        host_quirks: !args.no_host_quirks,
        prefault: args.prefault,
        limits,
        disks: args.disks,
        nets: args.nets,
        vsock: args.vsock,
        rng: args.rng,
        balloon: args.balloon,
        api_socket: args.api_socket,
        io_limit,
        shutdown_timeout_secs: args.shutdown_timeout,
        seccomp: args.confinement.seccomp(),
    };
    launch(config, Box::new(Vmm::new), args.confinement)
}

/// The console of `keel run` and `keel restore`: this terminal, Ctrl-A x to leave.
fn console_io() -> VmIo {
    let stdin: Option<OwnedFd> = std::io::stdin().as_fd().try_clone_to_owned().ok();
    VmIo {
        serial_out: Box::new(std::io::stdout()),
        console_in: stdin,
        console_escape: true,
    }
}

/// Builds the VM with `build` and runs it on this terminal, jailed unless `--no-jail`.
pub(crate) fn launch(config: VmConfig, build: jailed::Build, c: Confinement) -> ExitCode {
    if c.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VMM's threads run without seccomp filters (debugging only)"
        );
    }
    if !c.no_jail {
        let opts = jailed::JailOptions {
            dir: c.jail_dir,
            uid: c.jail_uid,
            gid: c.jail_gid,
            netns: c.netns,
        };
        return jailed::run(config, build, console_io, opts);
    }
    tracing::warn!("--no-jail: the VMM runs with all of this process's privileges");
    let vmm = match build(config, console_io()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(if e.is_usage() { 2 } else { 1 });
        }
    };
    if let Err(e) = keel_vmm::install_stop_signal_handlers() {
        eprintln!("keel: {e}");
        return ExitCode::from(1);
    }
    run_vmm(vmm)
}

/// Runs a built VM on this terminal and turns its outcome into the exit status.
pub(crate) fn run_vmm(vmm: Vmm) -> ExitCode {
    // Raw mode only for an interactive console; restored when the guard drops, before the
    // summary is printed.
    let raw = terminal::RawMode::enable_on_stdin();
    let result = vmm.run();
    drop(raw);
    match result {
        Ok(outcome) => {
            eprintln!("{}", outcome.summary());
            ExitCode::from(outcome.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("keel: {e}");
            ExitCode::from(1)
        }
    }
}
