//! The limits a VM's cgroup enforces, written in v2 or v1 terms.

use crate::{write, CgroupError, Hierarchy, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Throttles on one block device (major:minor), per second; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimit {
    pub major: u32,
    pub minor: u32,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

/// What a VM may use. Unset fields leave the kernel's defaults (unlimited, weight 100).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU bandwidth: `quota` µs of CPU time per `period` µs (150000/100000 = 1.5 CPUs).
    pub cpu_quota: Option<(u64, u64)>,
    /// Relative CPU share, 1..=10000 (cgroup v2 `cpu.weight`; 100 is the default).
    pub cpu_weight: Option<u32>,
    /// Memory limit in bytes (guest RAM plus the VMM's own overhead).
    pub memory_max: Option<u64>,
    /// Most processes and threads.
    pub pids_max: Option<u64>,
    pub io: Vec<IoLimit>,
}

impl Limits {
    /// The controllers (v2 names) these limits need.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.cpu_quota.is_some() || self.cpu_weight.is_some() {
            v.push("cpu");
        }
        if self.memory_max.is_some() {
            v.push("memory");
        }
        if self.pids_max.is_some() {
            v.push("pids");
        }
        if !self.io.is_empty() {
            v.push("io");
        }
        v
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Some((quota, period)) = self.cpu_quota {
            if !(1000..=1_000_000).contains(&period) || quota < 1000 {
                return Err(CgroupError::BadLimit(format!(
                    "CPU quota {quota} µs per {period} µs (period 1000..=1000000, quota >= 1000)"
                )));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10000).contains(&w) {
                return Err(CgroupError::BadLimit(format!("CPU weight {w} (1..=10000)")));
            }
        }
        if self.memory_max.is_some_and(|m| m < 4096) {
            return Err(CgroupError::BadLimit("memory limit below one page".into()));
        }
        Ok(())
    }

    /// Writes the limits that belong to hierarchy `h` into the VM's directory `dir`.
    pub(crate) fn apply(&self, h: &Hierarchy, dir: &Path) -> Result<()> {
        match h {
            Hierarchy::V2 { .. } => self.apply_v2(dir),
            Hierarchy::V1 { controller, .. } => self.apply_v1(controller, dir),
        }
    }

    fn apply_v2(&self, dir: &Path) -> Result<()> {
        if let Some((q, p)) = self.cpu_quota {
            write(&dir.join("cpu.max"), &format!("{q} {p}"))?;
        }
        if let Some(w) = self.cpu_weight {
            write(&dir.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(m) = self.memory_max {
            write(&dir.join("memory.max"), &m.to_string())?;
            // The limit is on RAM: without this a host with swap would page the guest out
            // instead of stopping the VM at its limit. (No file: the kernel has no swap
            // accounting, so there is nothing to turn off.)
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(n) = self.pids_max {
            write(&dir.join("pids.max"), &n.to_string())?;
        }
        for l in &self.io {
            let f = |v: Option<u64>| v.map_or("max".to_string(), |n| n.to_string());
            write(
                &dir.join("io.max"),
                &format!(
                    "{}:{} rbps={} wbps={} riops={} wiops={}",
                    l.major,
                    l.minor,
                    f(l.read_bps),
                    f(l.write_bps),
                    f(l.read_iops),
                    f(l.write_iops)
                ),
            )?;
        }
        Ok(())
    }

    fn apply_v1(&self, controller: &str, dir: &Path) -> Result<()> {
        match controller {
            "cpu" => {
                if let Some((q, p)) = self.cpu_quota {
                    write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                if let Some(w) = self.cpu_weight {
                    write(&dir.join("cpu.shares"), &shares(w).to_string())?;
                }
            }
            "memory" => {
                if let Some(m) = self.memory_max {
                    write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                    // RAM + swap capped at the same value: no swapping past the limit (the
                    // file exists only with swap accounting; written after the RAM limit,
                    // which it may not be below).
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &m.to_string())?;
                    }
                }
            }
            "pids" => {
                if let Some(n) = self.pids_max {
                    write(&dir.join("pids.max"), &n.to_string())?;
                }
            }
            "blkio" => {
                for l in &self.io {
                    for (file, v) in [
                        ("blkio.throttle.read_bps_device", l.read_bps),
                        ("blkio.throttle.write_bps_device", l.write_bps),
                        ("blkio.throttle.read_iops_device", l.read_iops),
                        ("blkio.throttle.write_iops_device", l.write_iops),
                    ] {
                        if let Some(v) = v {
                            write(&dir.join(file), &format!("{}:{} {v}", l.major, l.minor))?;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// cgroup v1 `cpu.shares` for a v2 weight: 100 ↦ 1024, scaled, at least 2.
pub(crate) fn shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

/// Lets the children of `parent` use `ctrls` (cgroup v2 `cgroup.subtree_control`).
pub(crate) fn enable_v2_controllers(parent: &Path, ctrls: &[&str]) -> Result<()> {
    let want: Vec<String> = ctrls.iter().map(|c| format!("+{c}")).collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&parent.join("cgroup.subtree_control"), &want.join(" "))
}
