//! Advisory image locks, so two VMs cannot write one image.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// Takes `flock(LOCK_SH)` (read-only) or `flock(LOCK_EX)` (read-write) without waiting.
/// The lock lives as long as the file's open file description.
pub(crate) fn lock(file: &File, path: &Path, read_only: bool) -> Result<()> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    loop {
        // SAFETY: flock only reads the fd, which `file` keeps open for this call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::Locked {
                    path: path.to_path_buf(),
                    held: if read_only {
                        "exclusive"
                    } else {
                        "shared or exclusive"
                    },
                })
            }
            // Filesystems without flock support (some network filesystems): go on unlocked.
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
                tracing::warn!(
                    "{}: cannot lock the image ({err}); opening it unlocked",
                    path.display()
                );
                return Ok(());
            }
            _ => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    source: io::Error::new(err.kind(), format!("flock: {err}")),
                })
            }
        }
    }
}

/// Releases a lock taken by [`lock`] (nothing happens if there is none).
pub(crate) fn unlock(file: &File) {
    // SAFETY: flock only reads the fd, which `file` keeps open for this call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}
