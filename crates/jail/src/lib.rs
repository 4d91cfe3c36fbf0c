//! The VMM's jail: what a Keel VM process is confined to before its guest runs.
//!
//! A jailed VM is two processes. The *supervisor* (the `keel run` the user started) stays on
//! the host: it owns the VM's cgroup, forwards signals and reports how the VM ended — also
//! when the kernel killed it. The *VMM* is its child, started with [`spawn`] in new PID, mount,
//! IPC and UTS namespaces, and confined in two steps:
//!
//! 1. [`Child::isolate`], first thing: closes every inherited file descriptor but stdio,
//!    clears the environment, makes every mount private and names the host `keel`. Then the
//!    VMM sets itself up (opens /dev/kvm, its kernel and disks, creates taps, binds sockets,
//!    allocates guest memory) with the host's view, as root.
//! 2. [`confine`], once set up: a new network namespace (or the one it was told to join),
//!    `pivot_root` into a per-VM tmpfs holding only what the VM uses ([`JailSpec::entries`],
//!    bind-mounted at their own paths, read-only unless written), resource limits, and a drop
//!    to an unprivileged uid/gid with no capabilities, no supplementary groups and
//!    `no_new_privs`.
//!
//! Everything here is Linux-specific and needs root (CAP_SYS_ADMIN) to start.

mod privs;
mod root;
mod spawn;

pub use privs::Identity;
pub use root::{Entry, EntryKind};
pub use spawn::{spawn, Child, Ended, Spawned, Supervisor};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source} (the jail needs root; --no-jail runs without it, for debugging only)")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: {path}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, JailError>;

/// The error for a failed system call, with what was being done.
pub(crate) fn sys(what: impl Into<String>) -> JailError {
    JailError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Which network namespace the VMM ends up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNs {
    /// A new, empty one (taps opened during set-up stay attached to the host's).
    New,
    /// Join this one (e.g. `/var/run/netns/NAME`) before set-up, so taps are created there.
    Join(PathBuf),
}

/// Everything [`confine`] needs.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The per-VM directory the new root is mounted on (created if missing).
    pub dir: PathBuf,
    /// What the VM's root holds.
    pub entries: Vec<Entry>,
    /// Who the VMM runs as afterwards.
    pub identity: Identity,
    pub netns: NetNs,
    /// RLIMIT_NOFILE for the VMM.
    pub max_files: u64,
    /// RLIMIT_NPROC (threads count) for the VMM's uid.
    pub max_threads: u64,
}

impl JailSpec {
    /// Checks what can be checked before any namespace is made.
    pub fn validate(&self) -> Result<()> {
        if !self.dir.is_absolute() {
            return Err(JailError::Invalid(format!(
                "the jail directory {} is not an absolute path",
                self.dir.display()
            )));
        }
        for e in &self.entries {
            if !e.path.is_absolute() {
                return Err(JailError::Invalid(format!(
                    "{} is not an absolute path",
                    e.path.display()
                )));
            }
        }
        self.identity.validate()
    }
}

/// Step 2: from set up to confined. Call it single-purposely after the VMM has opened all it
/// needs and before any guest code runs. Irreversible.
pub fn confine(spec: &JailSpec) -> Result<()> {
    if spec.netns == NetNs::New {
        // SAFETY: unshare has no memory-safety preconditions; it only changes this thread's
        // namespaces (threads spawned later inherit them).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(sys("unshare(CLONE_NEWNET)"));
        }
    }
    root::pivot_into(&spec.dir, &spec.entries)?;
    privs::set_rlimits(spec.max_files, spec.max_threads)?;
    privs::drop_to(&spec.identity)?;
    Ok(())
}

/// Joins the network namespace at `path` (for [`NetNs::Join`], before set-up).
pub fn join_netns(path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|source| JailError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: setns on a valid, open namespace fd; it changes only this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(sys(format!("joining network namespace {}", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
