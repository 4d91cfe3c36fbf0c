//! Disk layers for snapshots: an image is *frozen* (made durable and read-only, its lock
//! shared so other VMs may read it too) and a qcow2 overlay that the caller created is
//! stacked on it, so the VM writes the overlay from then on and the frozen image keeps the
//! disk as it was at the snapshot.

use crate::storage::FileStorage;
use crate::{lock, probe, DiskImage, Error, ImageFormat, Qcow2Image, Result};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Flushes `image` and turns its exclusive lock into a shared one, so other VMs may read it
/// (a clone restored from the snapshot) but none may write it. The caller stops writing it
/// (it becomes the backing of an overlay, which only reads).
pub fn freeze(image: &Arc<dyn DiskImage>) -> Result<()> {
    if image.read_only() {
        return Ok(());
    }
    image.flush()?;
    if let Some(fd) = image.lock_fd() {
        downgrade(fd).map_err(|e| Error::io(&image.id(), "flock(LOCK_SH)", 0, e))?;
    }
    Ok(())
}

fn downgrade(fd: std::os::unix::io::RawFd) -> std::io::Result<()> {
    loop {
        // SAFETY: flock only reads the fd, which the image keeps open for this call; converting
        // our own exclusive lock to a shared one cannot block on ourselves.
        let rc = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // A file system without flock never had the lock to begin with.
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(e),
        }
    }
}

/// Hands a writable image over to another process (a live migration's destination, on
/// shared storage): flushes it and drops its exclusive lock. The caller stops writing it
/// until [`take_back`] (the migration failed) or for good.
pub fn hand_over(image: &Arc<dyn DiskImage>) -> Result<()> {
    if image.read_only() {
        return Ok(());
    }
    image.flush()?;
    if let Some(fd) = image.lock_fd() {
        // SAFETY: flock only reads the fd, which the image keeps open for this call.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
    }
    Ok(())
}

/// Takes the exclusive lock of an image [`hand_over`] let go back, waiting up to `wait`
/// for the process it went to (if it took it) to let go.
pub fn take_back(image: &Arc<dyn DiskImage>, wait: std::time::Duration) -> Result<()> {
    if image.read_only() {
        return Ok(());
    }
    let Some(fd) = image.lock_fd() else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock only reads the fd, which the image keeps open for this call.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => return Ok(()),
            Some(libc::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => return Err(Error::io(&image.id(), "flock(LOCK_EX)", 0, e)),
        }
    }
}

/// Opens the qcow2 overlay in `file` (created with [`crate::create_qcow2_overlay_in`], or
/// a frozen layer of a snapshot) over `backing`, which the caller opened: the backing name
/// in the overlay's header is not followed. `path` names it in messages and locks.
pub fn open_overlay(
    file: File,
    path: &Path,
    read_only: bool,
    backing: Arc<dyn DiskImage>,
) -> Result<Arc<dyn DiskImage>> {
    lock::lock(&file, path, read_only)?;
    let name = path.display().to_string();
    let storage = FileStorage::new(file, false);
    if probe(&storage, &name)? != ImageFormat::Qcow2 {
        return Err(Error::WrongFormat {
            image: name,
            expected: "qcow2",
            reason: "a disk layer must be a qcow2 overlay".into(),
        });
    }
    let image = Qcow2Image::open_over(Box::new(storage), name.clone(), read_only, backing)?;
    if image.size() < image.backing().map_or(0, |b| b.size()) {
        return Err(Error::InvalidArgument(format!(
            "{name}: the overlay is smaller than the disk below it"
        )));
    }
    Ok(Arc::new(image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_qcow2_overlay_in, open_image, OpenOptions};

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keel-layers-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn new_file(p: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn a_handed_over_image_can_be_opened_elsewhere_and_taken_back_after() {
        let d = dir("handover");
        let path = d.join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let rw = OpenOptions::default();
        let img = open_image(&path, &rw).unwrap();
        assert!(matches!(open_image(&path, &rw), Err(Error::Locked { .. })));
        hand_over(&img).unwrap();
        let there = open_image(&path, &rw).expect("the destination opens it");
        let short = std::time::Duration::from_millis(100);
        assert!(take_back(&img, short).is_err(), "held over there");
        drop(there);
        take_back(&img, short).unwrap();
        assert!(matches!(open_image(&path, &rw), Err(Error::Locked { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn freezing_and_stacking_keeps_each_layer_as_it_was() {
        let d = dir("stack");
        let base = d.join("base.raw");
        std::fs::write(&base, vec![0xaau8; 1 << 20]).unwrap();
        let opts = OpenOptions {
            format: Some(ImageFormat::Raw),
            ..Default::default()
        };
        let top = open_image(&base, &opts).unwrap();
        top.write_at(&[1; 512], 0).unwrap();

        // Snapshot 1: freeze the base, continue on overlay 1.
        freeze(&top).unwrap();
        let frozen = top;
        // Others may read the frozen base now; nobody may write it.
        let ro = OpenOptions {
            read_only: true,
            ..opts
        };
        let reader = open_image(&base, &ro).unwrap();
        assert!(open_image(&base, &opts).is_err());
        drop(reader);
        let l1 = d.join("disk0.1.qcow2");
        create_qcow2_overlay_in(&new_file(&l1), &l1, 1 << 20, &base, ImageFormat::Raw).unwrap();
        let top = open_overlay(
            File::options().read(true).write(true).open(&l1).unwrap(),
            &l1,
            false,
            frozen.clone(),
        )
        .unwrap();
        top.write_at(&[2; 512], 512).unwrap();
        let mut b = [0u8; 1024];
        top.read_at(&mut b, 0).unwrap();
        assert_eq!((b[0], b[600]), (1, 2));

        // Snapshot 2 on top of it.
        freeze(&top).unwrap();
        let f1 = top;
        let l2 = d.join("disk0.2.qcow2");
        create_qcow2_overlay_in(
            &new_file(&l2),
            &l2,
            1 << 20,
            Path::new("disk0.1.qcow2"),
            ImageFormat::Qcow2,
        )
        .unwrap();
        let top = open_overlay(
            File::options().read(true).write(true).open(&l2).unwrap(),
            &l2,
            false,
            f1,
        )
        .unwrap();
        top.write_at(&[3; 512], 0).unwrap();
        top.read_at(&mut b, 0).unwrap();
        assert_eq!((b[0], b[600]), (3, 2));
        top.flush().unwrap();

        // Each layer, reopened on its own chain, reads as it was frozen.
        let mut first = [0u8; 1024];
        frozen.read_at(&mut first, 0).unwrap();
        assert_eq!((first[0], first[600]), (1, 0xaa));
        let again = open_overlay(File::open(&l1).unwrap(), &l1, true, frozen.clone()).unwrap();
        again.read_at(&mut b, 0).unwrap();
        assert_eq!((b[0], b[600]), (1, 2));
        // A layer that is not qcow2 is refused.
        assert!(open_overlay(File::open(&base).unwrap(), &base, true, frozen).is_err());
        // An overlay file must start empty.
        assert!(create_qcow2_overlay_in(
            &File::options().read(true).write(true).open(&l1).unwrap(),
            &l1,
            1 << 20,
            &base,
            ImageFormat::Raw
        )
        .is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
