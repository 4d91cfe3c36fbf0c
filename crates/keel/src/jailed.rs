//! `keel run` with the jail (the default): this process stays on the host as the VM's
//! supervisor — it owns the cgroup, forwards stop signals, restores the terminal and says how
//! the VM ended, also when the kernel killed it — and the VMM runs in a jailed child.

use crate::terminal;
use keel_jail::{Ended, Entry, Identity, JailSpec, NetNs, Spawned, Supervisor};
use keel_vmm::{HostPath, VmConfig, VmIo, Vmm};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where per-VM jail directories are made by default.
pub const DEFAULT_JAIL_DIR: &str = "/run/keel/jail";

/// How to jail, from the command line.
pub struct JailOptions {
    pub dir: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub netns: Option<PathBuf>,
}

/// Open files the VMM may have: vCPU fds, eventfds, irqfds, disks, sockets, vsock streams.
const MAX_FILES: u64 = 4096;

/// How the jailed child builds its VM (`Vmm::new`, or a restore).
pub type Build = Box<dyn FnOnce(VmConfig, VmIo) -> Result<Vmm, keel_vmm::VmmError>>;

/// `make_io` and `build` run in the VMM process, after the inherited descriptors are closed.
pub fn run(
    mut config: VmConfig,
    build: Build,
    make_io: impl FnOnce() -> VmIo,
    opts: JailOptions,
) -> ExitCode {
    let name = format!("vm-{}", std::process::id());
    let id = Identity::for_vm(std::process::id());
    let identity = Identity {
        uid: opts.uid.unwrap_or(id.uid),
        gid: opts.gid.unwrap_or(id.gid),
    };
    if let Err(e) = identity.validate() {
        eprintln!("keel: {e}");
        return ExitCode::from(2);
    }
    let memory_limit = config.limits.as_ref().and_then(|l| l.memory_max);
    // The supervisor owns the cgroup: it outlives the VMM, sees an OOM kill and cleans up.
    let cgroup = match config.limits.take() {
        None => None,
        Some(limits) => match keel_cgroup::Layout::detect()
            .and_then(|l| keel_cgroup::VmCgroup::create(&l, &name, &limits))
        {
            Ok(cg) => Some(cg),
            Err(e) => {
                eprintln!("keel: {e}");
                let usage = matches!(e, keel_cgroup::CgroupError::BadLimit(_));
                return ExitCode::from(if usage { 2 } else { 1 });
            }
        },
    };
    let sockets = sockets(&config);
    let saved_tty = terminal::Saved::capture();
    let spawned = keel_jail::spawn(|pid| {
        if let Some(cg) = &cgroup {
            cg.add(pid)
                .map_err(|e| keel_jail::JailError::Invalid(e.to_string()))?;
        }
        Ok(())
    });
    let sup = match spawned {
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(1);
        }
        Ok(Spawned::Child(_)) => {
            // Nothing of the supervisor's (the cgroup handle) may be dropped here: it is
            // the supervisor's to remove.
            std::mem::forget(cgroup);
            let spec = JailSpec {
                dir: opts.dir.join(&name),
                entries: Vec::new(),
                identity,
                netns: match opts.netns {
                    Some(p) => NetNs::Join(p),
                    None => NetNs::New,
                },
                max_files: MAX_FILES,
                max_threads: u64::from(config.vcpus) + 256,
            };
            return vmm(config, build, make_io(), spec);
        }
        Ok(Spawned::Supervisor(s)) => s,
    };
    supervise(
        &sup,
        &name,
        &opts.dir,
        cgroup,
        memory_limit,
        &sockets,
        saved_tty,
    )
}

/// The sockets the VMM binds, which a jailed VMM cannot remove itself.
fn sockets(config: &VmConfig) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = config.api_socket.iter().cloned().collect();
    if let Some(vs) = &config.vsock {
        v.push(match &vs.socket {
            Some(p) => p.clone(),
            None => keel_vmm::default_vsock_socket_path(vs.cid),
        });
    }
    v
}

/// The jailed child: set up with the host's view, confine, run.
fn vmm(config: VmConfig, build: Build, io: VmIo, mut spec: JailSpec) -> ExitCode {
    if let NetNs::Join(p) = &spec.netns {
        if let Err(e) = keel_jail::join_netns(p) {
            eprintln!("keel: {e}");
            return ExitCode::from(2);
        }
    }
    let vmm = match build(config, io) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(if e.is_usage() { 2 } else { 1 });
        }
    };
    spec.entries = match entries(&vmm) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = keel_vmm::install_stop_signal_handlers() {
        eprintln!("keel: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = keel_jail::confine(&spec) {
        eprintln!("keel: {e}");
        return ExitCode::from(1);
    }
    tracing::debug!(
        "jailed in {} as uid {} gid {}",
        spec.dir.display(),
        spec.identity.uid,
        spec.identity.gid
    );
    crate::run_vmm(vmm)
}

/// What the VM's root holds: what the VMM uses, by canonical path.
fn entries(vmm: &Vmm) -> Result<Vec<Entry>, String> {
    let canon =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("jail: {}: {e}", p.display()));
    let mut v = Vec::new();
    for hp in vmm.host_paths() {
        v.push(match hp {
            HostPath::File { path, writable } => Entry::file(canon(&path)?, writable),
            HostPath::Device(path) => Entry::device(path),
            HostPath::Dir(path) => {
                let path = canon(&path)?;
                if ["/", "/tmp", "/run", "/var/tmp", "/dev/shm"]
                    .iter()
                    .any(|d| path == Path::new(d))
                {
                    tracing::warn!(
                        "the vsock socket's directory {} is shared with other programs; the jail \
                         must expose all of it: give the socket a directory of its own",
                        path.display()
                    );
                }
                Entry::dir(path, true)
            }
        });
    }
    Ok(v)
}

fn supervise(
    sup: &Supervisor,
    name: &str,
    jail_dir: &Path,
    cgroup: Option<keel_cgroup::VmCgroup>,
    memory_limit: Option<u64>,
    sockets: &[PathBuf],
    saved_tty: Option<terminal::Saved>,
) -> ExitCode {
    if let Err(e) = sup.forward_stop_signals() {
        tracing::warn!("{e}");
    }
    let ended = sup.wait();
    drop(saved_tty); // the VMM may have died with the terminal in raw mode
                     // The jail's mount point (its tmpfs lived in the VMM's mount namespace only).
    let _ = std::fs::remove_dir(jail_dir.join(name));
    let oom = cgroup.as_ref().is_some_and(|cg| cg.oom_killed());
    drop(cgroup);
    // The VMM could not remove its sockets from inside the jail. One nobody listens on any
    // more was ours; one that still answers belongs to another VM (ours failed to bind it).
    for s in sockets {
        let is_socket = std::fs::symlink_metadata(s)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket && std::os::unix::net::UnixStream::connect(s).is_err() {
            let _ = std::fs::remove_file(s);
            if let Some(dir) = s.parent().filter(|d| d.starts_with("/run/keel")) {
                let _ = std::fs::remove_dir(dir); // a default per-VM directory, if empty
            }
        }
    }
    let code = match ended {
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(1);
        }
        Ok(Ended::Exited(c)) => return ExitCode::from(c.clamp(0, 255) as u8),
        Ok(Ended::Killed(sig)) => sig,
    };
    if code == libc::SIGKILL && oom {
        let limit = memory_limit.map_or(String::new(), |l| {
            format!(" (limit {})", keel_vmm::config::format_size(l))
        });
        eprintln!(
            "keel: the VM was stopped by the kernel's OOM killer: out of memory in its cgroup{limit}; \
             raise --memory-limit or lower --memory"
        );
    } else if code == libc::SIGSYS {
        eprintln!(
            "keel: the VMM was killed by SIGSYS: it made a system call its seccomp filter \
             forbids (named above)"
        );
    } else {
        eprintln!("keel: the VMM process was killed by signal {code}");
    }
    ExitCode::from((128 + code).clamp(0, 255) as u8)
}
