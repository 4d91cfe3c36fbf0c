//! Creating qcow2 v3 images: empty ones and overlays over a backing file.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{Header, EXT_BACKING_FORMAT, EXT_END, MAX_BACKING_NAME, V3_HEADER_LEN};
use super::refcount::set_refcount;
use super::table::set_entry;
use crate::{open_image, Error, ImageFormat, OpenOptions, Result};

/// 64 KiB clusters, as QEMU's default.
const CLUSTER_BITS: u32 = 16;
/// 16-bit refcounts, as QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// Creates an empty qcow2 v3 image of `size` bytes (64 KiB clusters). Fails if `path`
/// exists: nothing is ever overwritten.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    create(path, size, None)
}

/// Creates a qcow2 v3 overlay over `backing`, with the backing file's size. Reads of
/// anything not yet written come from `backing`, which is never written. `backing` is
/// recorded as given; a relative name is resolved against the overlay's directory (as QEMU
/// does), both now and when the overlay is opened. Fails if `path` exists.
pub fn create_qcow2_overlay(
    path: &Path,
    backing: &Path,
    backing_format: ImageFormat,
) -> Result<()> {
    let resolved = match (backing.is_relative(), path.parent()) {
        (true, Some(dir)) => dir.join(backing),
        _ => backing.to_path_buf(),
    };
    let base = open_image(
        &resolved,
        &OpenOptions {
            format: Some(backing_format),
            read_only: true,
            direct: false,
        },
    )?;
    let size = base.size();
    drop(base);
    create(path, size, Some((backing, backing_format)))
}

fn create(path: &Path, size: u64, backing: Option<(&Path, ImageFormat)>) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let r = write_image(&file, path, size, backing);
    if r.is_err() {
        // Leave no half-made image behind.
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Writes a fresh qcow2 v3 overlay of `size` bytes into `file` (which must be empty),
/// recording `backing_name` (with its format) as its backing file, without opening it: for
/// a caller that already holds the backing image (a running VM's disk, locked by it) and
/// will open the overlay with [`crate::open_overlay`]. `path` only names the file in errors.
pub fn create_qcow2_overlay_in(
    file: &std::fs::File,
    path: &Path,
    size: u64,
    backing_name: &Path,
    backing_format: ImageFormat,
) -> Result<()> {
    let len = file.metadata().map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if len.len() != 0 {
        return Err(Error::Create {
            path: path.to_path_buf(),
            reason: "the file is not empty".into(),
        });
    }
    write_image(file, path, size, Some((backing_name, backing_format)))
}

fn write_image(
    file: &std::fs::File,
    path: &Path,
    size: u64,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<()> {
    let fail = |reason: String| Error::Create {
        path: path.to_path_buf(),
        reason,
    };
    let cs = 1u64 << CLUSTER_BITS;
    let bytes_per_l1 = cs * (cs / 8);
    if size > i64::MAX as u64 / 2 {
        return Err(fail(format!("size {size} is too large")));
    }
    let l1_size = size.div_ceil(bytes_per_l1).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // Layout: header, refcount table, one refcount block, L1 table.
    let (rt, rb, l1) = (cs, 2 * cs, 3 * cs);
    let clusters = 3 + l1_clusters;
    let per_block = (cs * 8) >> REFCOUNT_ORDER;
    if clusters > per_block || l1_size * 8 > 32 << 20 {
        return Err(fail(format!("size {size} is too large")));
    }

    let mut head = vec![0u8; cs as usize];
    let mut ext_end = u64::from(V3_HEADER_LEN);
    let (mut name_off, mut name_len) = (0u64, 0u32);
    if let Some((b, fmt)) = backing {
        let name = b.as_os_str().as_bytes();
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(fail(format!(
                "the backing file name must be 1 to {MAX_BACKING_NAME} bytes"
            )));
        }
        let f = fmt.name().as_bytes();
        let mut ext = Vec::new();
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(f.len() as u32).to_be_bytes());
        ext.extend_from_slice(f);
        ext.resize(ext.len().next_multiple_of(8), 0);
        ext.extend_from_slice(&EXT_END.to_be_bytes());
        ext.extend_from_slice(&0u32.to_be_bytes());
        put(&mut head, ext_end, &ext);
        ext_end += ext.len() as u64;
        name_off = ext_end;
        name_len = name.len() as u32;
        put(&mut head, name_off, name);
    }
    let h = Header {
        version: 3,
        cluster_bits: CLUSTER_BITS,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: l1,
        refcount_table_offset: rt,
        refcount_table_clusters: 1,
        refcount_order: REFCOUNT_ORDER,
        ..Header::default()
    };
    h.encode_v3(&mut head, name_off, name_len);

    let mut table = vec![0u8; cs as usize];
    set_entry(&mut table, 0, rb);
    let mut block = vec![0u8; cs as usize];
    for i in 0..clusters as usize {
        set_refcount(&mut block, REFCOUNT_ORDER, i, 1);
    }

    let written = file
        .write_all_at(&head, 0)
        .and_then(|()| file.write_all_at(&table, rt))
        .and_then(|()| file.write_all_at(&block, rb))
        .and_then(|()| file.set_len(clusters * cs))
        .and_then(|()| file.sync_all());
    written.map_err(|e| fail(e.to_string()))
}

fn put(buf: &mut [u8], off: u64, bytes: &[u8]) {
    let off = off as usize;
    if let Some(d) = buf.get_mut(off..off + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}
