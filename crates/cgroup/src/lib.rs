//! Per-VM cgroups: CPU quota and weight, a memory limit, a pids limit and block I/O throttles,
//! on cgroup v2 where the host offers a controller there and on v1 otherwise (hybrid hosts,
//! like Keel's PVM test bed, have cpu, memory, pids and blkio only on v1).
//!
//! A VM's cgroup is created below the cgroup the creating process is in, for each controller
//! (so Keel stays inside whatever it was delegated), as `keel/<name>`. [`VmCgroup::add`] moves
//! a process in; dropping the [`VmCgroup`] moves the calling process back out (if it is
//! inside) and removes the directories.

mod blockdev;
mod layout;
mod limits;

pub use blockdev::block_device_of;
pub use layout::{Hierarchy, Layout};
pub use limits::{IoLimit, Limits};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroup layout ({what}): {source}")]
    Layout {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {0} controller is available in neither cgroup v2 nor v1 on this host")]
    NoController(&'static str),
    #[error(
        "'{0}' is not a valid cgroup name (letters, digits, '-', '_', '.'; not starting with '.')"
    )]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid limit: {0}")]
    BadLimit(String),
}

pub type Result<T> = std::result::Result<T, CgroupError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io(path))
}

/// One directory per hierarchy the VM's controllers live in.
#[derive(Debug)]
pub struct VmCgroup {
    /// (hierarchy, the VM's directory in it), without duplicates.
    dirs: Vec<(Hierarchy, PathBuf)>,
}

impl VmCgroup {
    /// Creates `keel/<name>` in every hierarchy that holds a controller `limits` needs, and
    /// applies the limits. Fails before touching anything if a needed controller is missing.
    pub fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<VmCgroup> {
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(CgroupError::BadName(name.into()));
        }
        limits.validate()?;
        let mut dirs: Vec<(Hierarchy, PathBuf)> = Vec::new();
        for ctrl in limits.controllers() {
            let h = layout.hierarchy_for(ctrl)?;
            if dirs.iter().any(|(d, _)| *d == h) {
                continue;
            }
            let dir = h.own_path().join("keel").join(name);
            dirs.push((h, dir));
        }
        let mut cg = VmCgroup { dirs: Vec::new() };
        for (h, dir) in dirs {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                if let Hierarchy::V2 { .. } = h {
                    // Both levels must hand the controllers down: this process's cgroup to
                    // keel/, and keel/ to the VM.
                    limits::enable_v2_controllers(h.own_path(), &limits.controllers())?;
                    limits::enable_v2_controllers(parent, &limits.controllers())?;
                }
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&dir)(e)),
            }
            cg.dirs.push((h, dir));
        }
        for (h, dir) in &cg.dirs {
            limits.apply(h, dir)?;
        }
        Ok(cg)
    }

    /// Moves process `pid` (all its threads) into the VM's cgroups.
    pub fn add(&self, pid: u32) -> Result<()> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The VM's directories, one per hierarchy.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// Whether the kernel OOM-killed a process of this VM (memory limit hit).
    pub fn oom_killed(&self) -> bool {
        self.dirs.iter().any(|(h, dir)| match h {
            Hierarchy::V2 { .. } => std::fs::read_to_string(dir.join("memory.events"))
                .map(|s| {
                    s.lines().any(|l| {
                        l.strip_prefix("oom_kill ")
                            .and_then(|n| n.trim().parse::<u64>().ok())
                            .is_some_and(|n| n > 0)
                    })
                })
                .unwrap_or(false),
            Hierarchy::V1 { controller, .. } if controller == "memory" => {
                std::fs::read_to_string(dir.join("memory.oom_control"))
                    .map(|s| {
                        s.lines().any(|l| {
                            l.strip_prefix("oom_kill ")
                                .and_then(|n| n.trim().parse::<u64>().ok())
                                .is_some_and(|n| n > 0)
                        })
                    })
                    .unwrap_or(false)
            }
            _ => false,
        })
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        for (h, dir) in self.dirs.iter().rev() {
            // Leave the cgroup first if this process is in it, or rmdir fails with EBUSY.
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.lines().any(|p| p.trim() == me) {
                let _ = write(&h.own_path().join("cgroup.procs"), &me);
            }
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests;
