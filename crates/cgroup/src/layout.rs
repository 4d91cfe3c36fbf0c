//! Where each controller lives on this host, and where this process sits in each hierarchy.

use crate::{CgroupError, Result};
use std::path::{Path, PathBuf};

/// A hierarchy holding a controller, with this process's own cgroup directory in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// A cgroup v1 mount (possibly carrying several controllers, e.g. `cpu,cpuacct`).
    V1 {
        controller: String,
        mount: PathBuf,
        own: PathBuf,
    },
    /// The cgroup v2 (unified) mount.
    V2 { mount: PathBuf, own: PathBuf },
}

impl Hierarchy {
    /// This process's cgroup directory in the hierarchy: VM cgroups go below it.
    pub fn own_path(&self) -> &Path {
        match self {
            Hierarchy::V1 { own, .. } | Hierarchy::V2 { own, .. } => own,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct V1Mount {
    controllers: Vec<String>,
    mount: PathBuf,
}

/// The cgroup mounts of this host and this process's place in them.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    v1: Vec<V1Mount>,
    /// (mount, controllers available to this process's cgroup).
    v2: Option<(PathBuf, Vec<String>)>,
    /// (v1 controller list or "" for v2, path of this process's cgroup).
    own: Vec<(String, String)>,
}

/// The v1 name of a controller Keel asks for by its v2 name.
fn v1_name(ctrl: &str) -> &str {
    match ctrl {
        "io" => "blkio",
        other => other,
    }
}

impl Layout {
    /// Reads /proc/self/mounts, /proc/self/cgroup and the v2 `cgroup.controllers`.
    pub fn detect() -> Result<Layout> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| CgroupError::Layout {
                what: p.into(),
                source,
            })
        };
        let mounts = read("/proc/self/mounts")?;
        let cgroup = read("/proc/self/cgroup")?;
        Ok(Self::parse(&mounts, &cgroup, |p| {
            std::fs::read_to_string(p).ok()
        }))
    }

    /// Parses the contents of /proc/self/mounts and /proc/self/cgroup; `read` reads a file
    /// (the v2 controller list).
    pub fn parse(mounts: &str, cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> Layout {
        let mut l = Layout::default();
        for line in cgroup.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            l.own.push((ctrls.to_string(), path.to_string()));
        }
        let mut v2_mount = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(dir), Some(fstype), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
                continue;
            };
            match *fstype {
                "cgroup" => {
                    let controllers: Vec<String> = opts
                        .split(',')
                        .filter(|o| {
                            !matches!(
                                *o,
                                "rw" | "ro" | "nosuid" | "nodev" | "noexec" | "relatime" | "xattr"
                            ) && !o.starts_with("name=")
                                && !o.starts_with("release_agent")
                                && !o.starts_with("clone_children")
                        })
                        .map(String::from)
                        .collect();
                    if !controllers.is_empty() {
                        l.v1.push(V1Mount {
                            controllers,
                            mount: PathBuf::from(dir),
                        });
                    }
                }
                "cgroup2" => v2_mount = Some(PathBuf::from(dir)),
                _ => {}
            }
        }
        if let Some(m) = v2_mount {
            let own = l.own_rel("");
            let dir = join(&m, own.as_deref().unwrap_or("/"));
            let ctrls = read(&dir.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default();
            l.v2 = Some((m, ctrls));
        }
        l
    }

    /// "v2" (unified only), "v1" (legacy only), "hybrid" (both), or "none".
    pub fn mode(&self) -> &'static str {
        match (self.v1.is_empty(), self.v2.is_some()) {
            (true, true) => "v2",
            (false, true) => "hybrid",
            (false, false) => "v1",
            (true, false) => "none",
        }
    }

    /// Each v1 controller and where its hierarchy is mounted.
    pub fn v1_controllers(&self) -> Vec<(String, String)> {
        self.v1
            .iter()
            .flat_map(|m| {
                let dir = m.mount.display().to_string();
                m.controllers.iter().map(move |c| (c.clone(), dir.clone()))
            })
            .collect()
    }

    /// The v2 mount and the controllers this process's v2 cgroup offers.
    pub fn v2(&self) -> Option<(String, Vec<String>)> {
        self.v2
            .as_ref()
            .map(|(m, c)| (m.display().to_string(), c.clone()))
    }

    /// This process's cgroup path in the hierarchy with `ctrls` (v1 list, "" for v2).
    fn own_rel(&self, ctrl: &str) -> Option<String> {
        self.own
            .iter()
            .find(|(c, _)| {
                if ctrl.is_empty() {
                    c.is_empty()
                } else {
                    c.split(',').any(|x| x == ctrl)
                }
            })
            .map(|(_, p)| p.clone())
    }

    /// Where controller `ctrl` (v2 name: cpu, memory, pids, io) lives: v2 when this
    /// process's v2 cgroup can use it, else its v1 mount.
    pub fn hierarchy_for(&self, ctrl: &'static str) -> Result<Hierarchy> {
        if let Some((mount, ctrls)) = &self.v2 {
            if ctrls.iter().any(|c| c == ctrl) {
                let own = join(mount, self.own_rel("").as_deref().unwrap_or("/"));
                return Ok(Hierarchy::V2 {
                    mount: mount.clone(),
                    own,
                });
            }
        }
        let name = v1_name(ctrl);
        let m = self
            .v1
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == name))
            .ok_or(CgroupError::NoController(ctrl))?;
        let own = join(&m.mount, self.own_rel(name).as_deref().unwrap_or("/"));
        Ok(Hierarchy::V1 {
            controller: name.to_string(),
            mount: m.mount.clone(),
            own,
        })
    }
}

fn join(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}
