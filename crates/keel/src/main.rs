//! `keel`: run a VM on the serial console, or check what this host offers.

mod ctl;
mod host_check;
mod terminal;

use clap::{Parser, Subcommand};
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
    /// Report whether this host can run Keel VMs: the KVM kind, capabilities, cgroups, devices.
    HostCheck {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Hard memory limit for the whole VMM process (guest RAM plus Keel's own), e.g. 600M.
    #[arg(long, value_name = "SIZE", value_parser = memory_size)]
    memory_limit: Option<u64>,
    /// Most threads and processes the VMM may have.
    #[arg(long, value_name = "N")]
    pids_max: Option<u64>,
    /// Back all guest memory with host RAM before the guest starts.
    #[arg(long)]
    prefault: bool,
    /// Run without the per-thread seccomp filters (debugging only: a compromised VMM then
    /// keeps every system call).
    #[arg(long)]
    no_seccomp: bool,
    /// A virtio-blk disk: path=IMG[,format=raw|qcow2][,readonly=on]. Repeatable; the first
    /// is /dev/vda.
    #[arg(long = "disk", value_name = "path=IMG,...", value_parser = DiskConfig::parse)]
    disks: Vec<DiskConfig>,
    /// A virtio-net NIC on a tap device: [tap=NAME][,mac=MAC]. Repeatable; without tap=,
    /// Keel creates one.
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
        memory_max: args.memory_limit,
        pids_max: args.pids_max,
        io: Vec::new(),
    };
    (!l.controllers().is_empty()).then_some(l)
}

pub(crate) fn memory_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
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
        shutdown_timeout_secs: args.shutdown_timeout,
        seccomp: !args.no_seccomp,
    };
    if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: the VMM's threads run without seccomp filters (debugging only)"
        );
    }
    let stdin: Option<OwnedFd> = std::io::stdin().as_fd().try_clone_to_owned().ok();
    let io = VmIo {
        serial_out: Box::new(std::io::stdout()),
        console_in: stdin,
        console_escape: true,
    };
    let vmm = match Vmm::new(config, io) {
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
