//! `keel host-check`: what this host offers Keel, in the spirit of `virt-host-validate`.

use keel_hypervisor::{HostInfo, Hypervisor, KvmKind};
use std::path::Path;
use std::process::ExitCode;

/// The cgroup hierarchies mounted on this host.
#[derive(Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct CgroupLayout {
    /// "v2" (unified only), "v1" (legacy only), "hybrid" (both), or "none".
    pub mode: String,
    /// v1 controllers and where each is mounted.
    pub v1: Vec<(String, String)>,
    /// The v2 mount point and the controllers it offers.
    pub v2: Option<(String, Vec<String>)>,
}

/// Parses /proc/self/mounts-style text (with keel-cgroup's parser, the one `keel run` uses).
pub fn cgroup_layout(
    mounts: &str,
    read_controllers: impl Fn(&Path) -> Option<String>,
) -> CgroupLayout {
    let l = keel_cgroup::Layout::parse(mounts, "", read_controllers);
    CgroupLayout {
        mode: l.mode().into(),
        v1: l.v1_controllers(),
        v2: l.v2(),
    }
}

#[derive(serde::Serialize)]
struct Report {
    kvm: Option<HostInfo>,
    kvm_error: Option<String>,
    cgroups: CgroupLayout,
    devices: Vec<(String, bool)>,
    usable: bool,
}

pub fn run(json: bool) -> ExitCode {
    let (kvm, kvm_error) = match Hypervisor::open() {
        Ok(hv) => (Some(hv.host_info().clone()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let cgroups = cgroup_layout(&mounts, |p| std::fs::read_to_string(p).ok());
    let devices = [
        "/dev/kvm",
        "/dev/net/tun",
        "/dev/vhost-net",
        "/dev/vhost-vsock",
    ]
    .iter()
    .map(|d| (d.to_string(), Path::new(d).exists()))
    .collect();
    let usable = kvm.as_ref().is_some_and(|k| k.missing_required().is_none());
    let report = Report {
        kvm,
        kvm_error,
        cgroups,
        devices,
        usable,
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("keel: cannot encode the report: {e}"),
        }
    } else {
        print_report(&report);
    }
    if report.usable {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn mark(ok: bool, required: bool) -> &'static str {
    match (ok, required) {
        (true, _) => "PASS",
        (false, true) => "FAIL",
        (false, false) => "WARN",
    }
}

fn print_report(r: &Report) {
    match (&r.kvm, &r.kvm_error) {
        (Some(k), _) => {
            println!("{:<44} PASS", "KVM: /dev/kvm opens");
            println!("  kind:          {}", k.kind);
            println!("  API version:   {}", k.api_version);
            println!(
                "  vCPUs per VM:  {} (recommended {})",
                k.max_vcpus, k.recommended_vcpus
            );
            println!("KVM capabilities:");
            for c in &k.capabilities {
                let what = format!(
                    "  {}{}",
                    c.name,
                    if c.required { "" } else { " (optional)" }
                );
                println!("{what:<44} {}", mark(c.present, c.required));
            }
            match k.kind {
                KvmKind::Pvm => println!(
                    "note: PVM runs guest kernel code in an emulator: no stock distribution kernel boots;\n      \
                     use the Keel test kernel (guest/build.sh). Keel appends the guest parameters PVM needs."
                ),
                KvmKind::Unknown => println!("note: unrecognised KVM backend; hardware features are unknown"),
                _ => {}
            }
        }
        (None, Some(e)) => println!("{:<44} FAIL\n  {e}", "KVM: /dev/kvm opens"),
        (None, None) => {}
    }
    println!("cgroups: {}", r.cgroups.mode);
    if !r.cgroups.v1.is_empty() {
        let names: Vec<&str> = r.cgroups.v1.iter().map(|(c, _)| c.as_str()).collect();
        println!("  v1 controllers: {}", names.join(", "));
    }
    if let Some((dir, ctrls)) = &r.cgroups.v2 {
        println!(
            "  v2 at {dir}: {}",
            if ctrls.is_empty() {
                "(no controllers)".into()
            } else {
                ctrls.join(", ")
            }
        );
    }
    println!("devices:");
    for (d, present) in &r.devices {
        println!(
            "{:<44} {}",
            format!("  {d}"),
            mark(*present, d == "/dev/kvm")
        );
    }
    println!(
        "{}",
        if r.usable {
            "Keel can run VMs on this host."
        } else {
            "Keel cannot run VMs on this host (see FAIL above)."
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_layout_is_recognised() {
        let mounts = "\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,xattr,name=systemd 0 0
proc /proc proc rw 0 0";
        let l = cgroup_layout(mounts, |_| Some("hugetlb\n".into()));
        assert_eq!(l.mode, "hybrid");
        let names: Vec<&str> = l.v1.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, vec!["cpu", "cpuacct", "memory"]);
        assert_eq!(
            l.v2,
            Some(("/sys/fs/cgroup/unified".into(), vec!["hugetlb".into()]))
        );
    }

    #[test]
    fn pure_v2_and_none() {
        let l = cgroup_layout("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0", |_| {
            Some("cpu io memory pids".into())
        });
        assert_eq!(l.mode, "v2");
        assert_eq!(l.v2.unwrap().1.len(), 4);
        assert_eq!(cgroup_layout("garbage\n\n", |_| None).mode, "none");
    }
}
