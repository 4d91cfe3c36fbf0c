//! `keel migrate` and `keel receive`: move a running VM to another host over TCP.
//!
//! The receiver's VMM (jailed like `keel run`) listens before its jail, in the host's
//! network, and builds the VM from what arrives. The sender's VMM sits in a network
//! namespace of its own, so `keel migrate` connects on the host and hands the connection to
//! it over the control socket. Both ends hold the same pre-shared key (`--migration-key`):
//! the stream is authenticated and encrypted (`docs/migration.md`).

use keel_api::{Client, MigrateRequest, Reply, Request};
use keel_vmm::device_config::{DiskConfig, NetConfig, VsockConfig};
use keel_vmm::migration::ReceiveOptions;
use keel_vmm::{VmConfig, Vmm};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The VM's API socket (`keel run --api-socket PATH`).
    #[arg(long, value_name = "SOCKET")]
    vm: PathBuf,
    /// Where `keel receive` listens.
    #[arg(long, value_name = "ADDR:PORT")]
    to: String,
    /// The pre-shared key both ends hold (at least 16 bytes).
    #[arg(long, value_name = "FILE")]
    migration_key: PathBuf,
    /// The longest the guest may be paused: pre-copy goes on while the guest runs until
    /// what is left fits, at the bandwidth measured.
    #[arg(long, value_name = "MS", default_value_t = 30)]
    downtime_ms: u64,
    /// Post-copy: after the first round the VM runs on the destination, which pulls the
    /// pages it still lacks (also what happens when pre-copy does not converge). If the
    /// connection breaks before every page is there, the VM is lost on both sides.
    #[arg(long)]
    postcopy: bool,
}

#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Where to wait for the sender.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// The pre-shared key both ends hold (at least 16 bytes).
    #[arg(long, value_name = "FILE")]
    migration_key: PathBuf,
    /// Listen for control requests on this Unix socket once the VM runs here.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// This host's side of each of the VM's disks, in its order, as `keel run --disk` takes
    /// it. Shared storage: the image the VM writes (its top layer), which the sender lets go
    /// of once paused; size and readonly= must be the VM's.
    #[arg(long = "disk", value_name = "path=IMG,...", value_parser = DiskConfig::parse)]
    disks: Vec<DiskConfig>,
    /// This host's tap for each of the VM's network interfaces, in its order, as `keel run
    /// --net` takes it (the MAC is the guest's; it is announced here once the VM runs).
    #[arg(long = "net", value_name = "tap=NAME,...", value_parser = NetConfig::parse)]
    nets: Vec<NetConfig>,
    /// This host's socket for the VM's vsock device (cid= must be the VM's). Connections
    /// open on the sender's side do not move.
    #[arg(long, value_name = "cid=N,...", value_parser = VsockConfig::parse)]
    vsock: Option<VsockConfig>,
    #[command(flatten)]
    confinement: crate::Confinement,
}

fn read_key(path: &PathBuf) -> Result<Vec<u8>, String> {
    let key =
        std::fs::read(path).map_err(|e| format!("--migration-key {}: {e}", path.display()))?;
    if key.len() < keel_migration::KEY_MIN {
        return Err(format!(
            "--migration-key {}: the key must be at least {} bytes",
            path.display(),
            keel_migration::KEY_MIN
        ));
    }
    Ok(key)
}

fn address(s: &str, flag: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{flag} {s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{flag} {s}: no address"))
}

fn usage(e: String) -> ExitCode {
    eprintln!("keel: {e}");
    ExitCode::from(2)
}

/// Both verbs' `--migration-key` and address (`flag` names the address's option); a bad one
/// is a usage error.
fn key_and_address(
    key: &PathBuf,
    addr: &str,
    flag: &str,
) -> Result<(Vec<u8>, SocketAddr), ExitCode> {
    let key = read_key(key).map_err(usage)?;
    let addr = address(addr, flag).map_err(usage)?;
    Ok((key, addr))
}

pub fn migrate(args: MigrateArgs) -> ExitCode {
    let (key, to) = match key_and_address(&args.migration_key, &args.to, "--to") {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut client = match Client::connect(&args.vm) {
        Ok(c) => c,
        Err(e) => return usage(e.to_string()),
    };
    let stream = match TcpStream::connect_timeout(&to, std::time::Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keel: cannot reach {to}: {e} (is `keel receive --listen {to}` running?)");
            return ExitCode::from(1);
        }
    };
    let key_hex = keel_migration::key_to_hex(&key);
    if let Err(e) = client.set_timeout(None) {
        eprintln!("keel: {e}");
        return ExitCode::from(1);
    }
    let reply = client.call_with_fds(
        &Request::Migrate(MigrateRequest {
            key_hex,
            downtime_ms: args.downtime_ms,
            postcopy: args.postcopy,
        }),
        &[stream.as_raw_fd()],
    );
    drop(stream);
    match reply {
        Ok(Reply::Migrated(r)) => {
            eprintln!(
                "keel: migrated to {to}: {:.1} ms in all, guest paused {:.1} ms, {} MiB sent \
                 ({} pages of data, {} zero pages), {} round(s){}",
                r.total_us as f64 / 1000.0,
                r.downtime_us as f64 / 1000.0,
                r.bytes_sent >> 20,
                r.data_pages,
                r.zero_pages,
                r.rounds,
                match (r.converged, r.postcopy_pages) {
                    (true, 0) => String::new(),
                    (true, n) => format!(", post-copy of {n} pages"),
                    (false, n) => format!(
                        ", pre-copy did not converge (the guest dirties memory faster than it \
                         goes): post-copy of {n} pages"
                    ),
                }
            );
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("keel: unexpected reply to migrate: {other:?}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("keel: migration to {to} failed: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn receive(args: ReceiveArgs) -> ExitCode {
    let (key, listen) = match key_and_address(&args.migration_key, &args.listen, "--listen") {
        Ok(v) => v,
        Err(code) => return code,
    };
    // The machine comes from the sender; the supervisor only needs what is this host's.
    let mut config = VmConfig::new("/nonexistent/received-by-migration");
    config.api_socket = args.api_socket.clone();
    config.seccomp = args.confinement.seccomp();
    let opts = ReceiveOptions {
        listen,
        key,
        api_socket: args.api_socket,
        seccomp: config.seccomp,
        disks: args.disks,
        nets: args.nets,
        vsock: args.vsock,
    };
    let build: crate::jailed::Build = Box::new(move |_config, io| Vmm::receive(opts, io));
    crate::launch(config, build, args.confinement)
}
