use super::*;
use crate::limits::IoLimit;
use std::process::Command;

const HYBRID_MOUNTS: &str = "\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,nosuid,nodev,noexec,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,nosuid,nodev,noexec,relatime,blkio 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
";
const HYBRID_CGROUP: &str = "\
9:name=systemd:/
7:blkio:/
4:memory:/process_api/20c6
1:cpu:/
0::/
";

#[test]
fn hybrid_hosts_use_v1_for_controllers_v2_lacks() {
    let l = Layout::parse(HYBRID_MOUNTS, HYBRID_CGROUP, |_| Some("hugetlb\n".into()));
    assert_eq!(
        l.hierarchy_for("memory").unwrap(),
        Hierarchy::V1 {
            controller: "memory".into(),
            mount: "/sys/fs/cgroup/memory".into(),
            own: "/sys/fs/cgroup/memory/process_api/20c6".into(),
        }
    );
    let io = l.hierarchy_for("io").unwrap();
    assert_eq!(io.own_path(), Path::new("/sys/fs/cgroup/blkio"));
    assert!(matches!(
        l.hierarchy_for("pids"),
        Err(CgroupError::NoController("pids"))
    ));
}

#[test]
fn v2_hosts_use_the_unified_hierarchy() {
    let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n";
    let cgroup = "0::/system.slice/keel.service\n";
    let l = Layout::parse(mounts, cgroup, |p| {
        assert_eq!(
            p,
            Path::new("/sys/fs/cgroup/system.slice/keel.service/cgroup.controllers")
        );
        Some("cpuset cpu io memory pids\n".into())
    });
    for c in ["cpu", "memory", "pids", "io"] {
        assert_eq!(
            l.hierarchy_for(c).unwrap(),
            Hierarchy::V2 {
                mount: "/sys/fs/cgroup".into(),
                own: "/sys/fs/cgroup/system.slice/keel.service".into(),
            }
        );
    }
    let none = Layout::parse("", "", |_| None);
    assert!(none.hierarchy_for("cpu").is_err());
}

#[test]
fn limits_are_validated_and_weights_map_to_shares() {
    assert_eq!(limits::shares(100), 1024);
    assert_eq!(limits::shares(1), 10);
    assert_eq!(limits::shares(10000), 102400);
    for bad in [
        Limits {
            cpu_quota: Some((500, 100_000)),
            ..Default::default()
        },
        Limits {
            cpu_quota: Some((50_000, 10)),
            ..Default::default()
        },
        Limits {
            cpu_weight: Some(0),
            ..Default::default()
        },
        Limits {
            memory_max: Some(100),
            ..Default::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let l = Limits {
        cpu_weight: Some(50),
        io: vec![IoLimit::default()],
        ..Default::default()
    };
    assert_eq!(l.controllers(), vec!["cpu", "io"]);
}

#[test]
fn bad_names_are_refused_before_anything_is_created() {
    let l = Layout::parse(HYBRID_MOUNTS, HYBRID_CGROUP, |_| None);
    for bad in ["", ".hidden", "a/b", "../x", "sp ace"] {
        assert!(matches!(
            VmCgroup::create(&l, bad, &Limits::default()),
            Err(CgroupError::BadName(_))
        ));
    }
}

fn skip(why: &str) {
    eprintln!("skipped: real cgroup test: {why}");
}

/// On this host, for real: limits land in the kernel's files, a process moves in, and the
/// directories go away afterwards.
#[test]
fn real_cgroup_limits_membership_and_cleanup() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root");
    }
    let layout = match Layout::detect() {
        Ok(l) => l,
        Err(e) => return skip(&e.to_string()),
    };
    let limits = Limits {
        cpu_quota: Some((50_000, 100_000)),
        cpu_weight: Some(200),
        memory_max: Some(64 << 20),
        pids_max: Some(64),
        io: Vec::new(),
    };
    for c in limits.controllers() {
        if let Err(e) = layout.hierarchy_for(c) {
            return skip(&e.to_string());
        }
    }
    let name = format!("test-{}", std::process::id());
    let cg = match VmCgroup::create(&layout, &name, &limits) {
        Ok(cg) => cg,
        Err(e) => return skip(&format!("cannot create cgroups here: {e}")),
    };
    let paths: Vec<PathBuf> = cg.paths().map(Path::to_path_buf).collect();
    let read = |f: &str| {
        paths
            .iter()
            .find_map(|p| std::fs::read_to_string(p.join(f)).ok())
            .unwrap_or_default()
    };
    match layout.hierarchy_for("cpu").unwrap() {
        Hierarchy::V1 { .. } => {
            assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
            assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
            assert_eq!(read("cpu.shares").trim(), "2048");
        }
        Hierarchy::V2 { .. } => {
            assert_eq!(read("cpu.max").trim(), "50000 100000");
            assert_eq!(read("cpu.weight").trim(), "200");
        }
    }
    let mem = read("memory.limit_in_bytes") + &read("memory.max");
    assert_eq!(mem.trim(), (64u64 << 20).to_string());
    // No swapping past the limit, where the kernel accounts swap at all.
    let memsw = read("memory.memsw.limit_in_bytes") + &read("memory.swap.max");
    assert!(
        memsw.is_empty() || memsw.trim() == (64u64 << 20).to_string() || memsw.trim() == "0",
        "swap limit {memsw:?}"
    );
    assert_eq!(read("pids.max").trim(), "64");
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    cg.add(child.id()).unwrap();
    for p in &paths {
        let procs = std::fs::read_to_string(p.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == child.id().to_string()),
            "{p:?}"
        );
    }
    assert!(!cg.oom_killed());
    let _ = child.kill();
    let _ = child.wait();
    drop(cg);
    for p in &paths {
        assert!(!p.exists(), "{p:?} left behind");
    }
}
