//! Which block device holds a file: what an I/O throttle (`io.max`, `blkio.throttle.*`) on
//! that file's reads and writes has to name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The whole-disk block device (major, minor) of the file system holding `path`, or `None`
/// when that file system is not on a block device (tmpfs, overlay, NFS, ...), where a cgroup
/// I/O throttle cannot apply. A partition resolves to its disk: the kernel throttles whole
/// disks only.
pub fn block_device_of(path: &Path) -> std::io::Result<Option<(u32, u32)>> {
    let dev = std::fs::metadata(path)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    Ok(whole_disk(Path::new("/sys/dev/block"), major, minor))
}

/// Looks `major:minor` up under `sys_dev_block` (`/sys/dev/block`, a parameter for tests).
fn whole_disk(sys_dev_block: &Path, major: u32, minor: u32) -> Option<(u32, u32)> {
    let link = sys_dev_block.join(format!("{major}:{minor}"));
    let dir: PathBuf = std::fs::canonicalize(&link).ok()?;
    if !dir.join("partition").exists() {
        return Some((major, minor));
    }
    let parent = std::fs::read_to_string(dir.parent()?.join("dev")).ok()?;
    parse_dev(&parent)
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_resolve_to_their_disk() {
        let root = std::env::temp_dir().join(format!("keel-blockdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let disk = root.join("devices/sda");
        let part = disk.join("sda1");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(disk.join("dev"), "8:0\n").unwrap();
        std::fs::write(part.join("dev"), "8:1\n").unwrap();
        std::fs::write(part.join("partition"), "1\n").unwrap();
        let links = root.join("dev-block");
        std::fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(&disk, links.join("8:0")).unwrap();
        std::os::unix::fs::symlink(&part, links.join("8:1")).unwrap();
        assert_eq!(whole_disk(&links, 8, 0), Some((8, 0)));
        assert_eq!(whole_disk(&links, 8, 1), Some((8, 0)));
        // Not a block device (tmpfs, overlay: anonymous major 0).
        assert_eq!(whole_disk(&links, 0, 42), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pseudo_file_systems_have_no_block_device() {
        assert_eq!(
            block_device_of(Path::new("/proc/self/status")).unwrap(),
            None
        );
        assert!(block_device_of(Path::new("/nonexistent/file")).is_err());
        assert_eq!(parse_dev("254:0\n"), Some((254, 0)));
        assert_eq!(parse_dev("x"), None);
    }
}
