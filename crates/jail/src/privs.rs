//! Resource limits and the drop to an unprivileged identity.

use crate::{sys, JailError, Result};

/// The uid and gid the VMM runs as once confined. Neither may be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// First uid/gid of the range [`Identity::for_vm`] hands out: far above any distribution's
/// users, so a VMM owns nothing on the host and no two VMs share an identity.
pub const VM_ID_BASE: u32 = 0x4b00_0000;

impl Identity {
    /// A uid/gid of its own for the VM whose supervisor is process `pid`.
    pub fn for_vm(pid: u32) -> Identity {
        let id = VM_ID_BASE.saturating_add(pid);
        Identity { uid: id, gid: id }
    }

    pub fn validate(&self) -> Result<()> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Invalid(
                "the VMM must not run as uid or gid 0 in the jail".into(),
            ));
        }
        if self.uid == u32::MAX || self.gid == u32::MAX {
            return Err(JailError::Invalid(
                "uid/gid 4294967295 is not a valid id".into(),
            ));
        }
        Ok(())
    }
}

fn setrlimit(res: libc::__rlimit_resource_t, value: u64, name: &str) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(res, &lim) } != 0 {
        return Err(sys(format!("setrlimit({name}, {value})")));
    }
    Ok(())
}

/// No core dumps (they would hold guest memory), a bounded fd table and thread count.
pub(crate) fn set_rlimits(max_files: u64, max_threads: u64) -> Result<()> {
    setrlimit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    setrlimit(libc::RLIMIT_NOFILE, max_files, "RLIMIT_NOFILE")?;
    setrlimit(libc::RLIMIT_NPROC, max_threads, "RLIMIT_NPROC")?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

/// Becomes `id` with every capability set empty, no supplementary groups, `no_new_privs`,
/// not dumpable (no ptrace by the same uid) and killed if the supervisor dies.
pub(crate) fn drop_to(id: &Identity) -> Result<()> {
    id.validate()?;
    // The bounding set caps what any later exec could regain; needs CAP_SETPCAP, so first.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break; // past the kernel's last capability
            }
            return Err(sys(format!(
                "dropping capability {cap} from the bounding set"
            )));
        }
    }
    // SAFETY: prctl with integer arguments only. EINVAL (kernel without ambient
    // capabilities) leaves nothing to clear.
    let r = unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(sys("clearing the ambient capabilities"));
    }
    // SAFETY: an empty list of groups (null pointer with count 0).
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(sys("setgroups([])"));
    }
    // SAFETY: plain id arguments; glibc applies them to every thread.
    if unsafe { libc::setresgid(id.gid, id.gid, id.gid) } != 0 {
        return Err(sys(format!("setresgid({})", id.gid)));
    }
    // SAFETY: as above. Leaving uid 0 clears the permitted and effective sets.
    if unsafe { libc::setresuid(id.uid, id.uid, id.uid) } != 0 {
        return Err(sys(format!("setresuid({})", id.uid)));
    }
    // The inheritable set survives setuid: clear it too.
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a valid v3 header and the two data words v3 expects.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(sys("clearing the capability sets"));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("PR_SET_NO_NEW_PRIVS"));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(sys("PR_SET_DUMPABLE"));
    }
    // Set last: a credential change clears it.
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(sys("PR_SET_PDEATHSIG"));
    }
    Ok(())
}
