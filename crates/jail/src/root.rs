//! The VM's new root: a small tmpfs holding bind mounts of exactly what the VM uses, at the
//! paths the VMM knows them by.

use crate::{sys, JailError, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (kernel, initrd, disk image) or a socket.
    File,
    /// A device node (/dev/kvm, /dev/net/tun): the only entries without `nodev`.
    Device,
    /// A directory, with everything below it (e.g. where vsock sockets are made).
    Dir,
}

/// One thing the VM's root holds, bind-mounted from the same path on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: EntryKind,
    pub writable: bool,
}

impl Entry {
    pub fn file(path: impl Into<PathBuf>, writable: bool) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            writable,
        }
    }
    pub fn device(path: impl Into<PathBuf>) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::Device,
            writable: true,
        }
    }
    pub fn dir(path: impl Into<PathBuf>, writable: bool) -> Self {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            writable,
        }
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Invalid(format!("{} contains a NUL byte", p.display())))
}

fn path_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Path {
        path: path.to_path_buf(),
        source,
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype_c = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data_c = data.map(|s| CString::new(s).unwrap_or_default());
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            p(&src_c),
            target_c.as_ptr(),
            p(&fstype_c),
            flags,
            p(&data_c).cast(),
        )
    };
    if r != 0 {
        return Err(sys(format!(
            "mounting {} on {}",
            src.map_or("(remount)".into(), |s| s.display().to_string()),
            target.display()
        )));
    }
    Ok(())
}

/// The entries to mount, in order: duplicates and entries inside a directory entry dropped
/// (the directory brings them; creating them would write into the host's directory).
pub(crate) fn plan(entries: &[Entry]) -> Vec<Entry> {
    let mut v: Vec<Entry> = Vec::new();
    let mut sorted = entries.to_vec();
    // Directories before files at equal paths; shorter paths first.
    sorted.sort_by(|a, b| {
        a.path
            .components()
            .count()
            .cmp(&b.path.components().count())
            .then((a.kind != EntryKind::Dir).cmp(&(b.kind != EntryKind::Dir)))
    });
    for e in sorted {
        let covered = v
            .iter()
            .any(|d| d.path == e.path || (d.kind == EntryKind::Dir && e.path.starts_with(&d.path)));
        if !covered {
            v.push(e);
        }
    }
    v
}

/// Where `path` goes below the new root `root`.
fn inside(root: &Path, path: &Path) -> PathBuf {
    let mut t = root.to_path_buf();
    for c in path.components() {
        if let Component::Normal(n) = c {
            t.push(n);
        }
    }
    t
}

/// Mounts the new root on `dir`, fills it, and makes it this process's `/`.
pub(crate) fn pivot_into(dir: &Path, entries: &[Entry]) -> Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(path_err(Path::new("/proc/self/task")))?
        .count();
    if threads != 1 {
        // Capability bounding sets and this process's root are per thread: confine first.
        return Err(JailError::Invalid(format!(
            "the VMM has {threads} threads; it must be confined before it starts any"
        )));
    }
    std::fs::create_dir_all(dir).map_err(path_err(dir))?;
    let hard = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        hard,
        Some("mode=0755,size=64k,nr_inodes=1024"),
    )?;
    for e in plan(entries) {
        let target = inside(dir, &e.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(path_err(parent))?;
        }
        match e.kind {
            EntryKind::Dir => std::fs::create_dir(&target).map_err(path_err(&target))?,
            EntryKind::File | EntryKind::Device => {
                std::fs::File::create(&target).map_err(path_err(&target))?;
            }
        }
        let rec = if e.kind == EntryKind::Dir {
            libc::MS_REC
        } else {
            0
        };
        mount(Some(&e.path), &target, None, libc::MS_BIND | rec, None)?;
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC;
        if e.kind != EntryKind::Device {
            flags |= libc::MS_NODEV;
        }
        if !e.writable {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    // The skeleton itself is read-only: the VMM cannot add files to its root.
    mount(
        None,
        dir,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | hard,
        Some("mode=0755"),
    )?;
    std::env::set_current_dir(dir).map_err(path_err(dir))?;
    let dot = c".";
    // SAFETY: pivot_root with two NUL-terminated paths; "." twice stacks the old root on the
    // new one, to be detached next.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(sys(format!("pivot_root into {}", dir.display())));
    }
    // SAFETY: umount2 of "." (the old root stacked on top) with a valid flag.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(sys("detaching the host's root"));
    }
    std::env::set_current_dir("/").map_err(path_err(Path::new("/")))?;
    Ok(())
}
