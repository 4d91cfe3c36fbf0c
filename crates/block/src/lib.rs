//! Disk images for Keel's virtio-blk: raw files and qcow2 (v2/v3, with backing chains), and an
//! asynchronous engine that runs requests off the device thread.
//!
//! Image files and guest requests are untrusted: every offset is checked against the disk
//! size, every qcow2 table entry against the file, and anything wrong comes back as an
//! [`Error`] naming the image — never as a panic.
//!
//! ```text
//! open_image(path, OpenOptions) ──► Arc<dyn DiskImage> ──► IoEngine (thread pool)
//!        │ format probe, flock            │ raw: pread/pwrite     │ Request{kind, offset,
//!        │                                │ qcow2: L1→L2→cluster  │   buffers, user_data}
//!        ▼                                ▼                       ▼ Completion + EventFd
//! ```

// Image bytes and request offsets come from outside: no indexing that can panic, no unwrap.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)
)]

pub mod engine;
mod error;
pub mod layers;
mod lock;
pub mod qcow2;
pub mod raw;
pub mod storage;
#[cfg(feature = "io-uring")]
mod uring;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub use engine::{
    Completion, EngineConfig, EngineKind, IoEngine, Request, RequestKind, ThreadHook,
};
pub use error::{Error, Result};
pub use layers::{freeze, hand_over, open_overlay, take_back};
pub use qcow2::{create_qcow2, create_qcow2_overlay, create_qcow2_overlay_in, Qcow2Image};
pub use raw::RawImage;

/// How many images a backing chain may hold below the top image before opening stops.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Length of the virtio-blk device ID (`VIRTIO_BLK_T_GET_ID`).
pub const DEVICE_ID_LEN: usize = 20;

/// On-disk image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// The guest's bytes, as they are.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses for the format (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a QEMU format name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A virtual disk. Shared by several worker threads through `Arc<dyn DiskImage>`: every
/// method takes `&self` and carries its own offset.
pub trait DiskImage: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. Unallocated areas read as zeros (or from the backing file);
    /// a raw file shorter than expected is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes completed writes durable (metadata and data, then `fdatasync`).
    fn flush(&self) -> Result<()>;
    /// Tells the image `[offset, offset+len)` is no longer needed. Content afterwards is
    /// unspecified by virtio; see each format for what it does.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Whether the image was opened read-only.
    fn read_only(&self) -> bool;
    /// A stable device ID of at most [`DEVICE_ID_LEN`] bytes.
    fn id(&self) -> String;
    /// The image's format.
    fn format(&self) -> ImageFormat;
    /// For engines that hand I/O to the kernel themselves (io_uring): the descriptor of a
    /// file that *is* the virtual disk byte for byte, needing no checks beyond range and
    /// read-only ones. Only raw images opened without `O_DIRECT` and with a given format
    /// offer it; everything else goes through the methods above.
    fn raw_file_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
    /// The descriptor holding the image's file lock, if it has a file (see
    /// [`layers::freeze`]).
    fn lock_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// The format, or `None` to detect it from the file's first bytes.
    pub format: Option<ImageFormat>,
    /// Open `O_RDONLY` with a shared lock; writes fail with [`Error::ReadOnly`].
    pub read_only: bool,
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
}

/// The qcow2 magic, "QFI\xfb".
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Opens a disk image.
///
/// Format detection (`options.format == None`): a file starting with the qcow2 magic is
/// qcow2, anything else is raw. This follows QEMU's safety rule: an image is opened as raw
/// *despite* a qcow2-looking header only when the user says `format: Some(Raw)`. A guest could
/// otherwise write a qcow2 header (naming, say, `/etc/shadow` as its backing file) into its
/// raw disk and be handed that file on the next boot. For the same reason, a raw image whose
/// format was *detected* refuses guest writes that would put the qcow2 magic at offset 0
/// ([`Error::ProbedRawSignature`]); an explicit `format: Some(Raw)` allows them.
///
/// The file is locked with `flock`: shared when read-only, exclusive otherwise, so two VMs
/// cannot both write one image (nor one write what another reads). A conflict is
/// [`Error::Locked`]. qcow2 backing files are opened read-only with shared locks.
pub fn open_image(path: &Path, options: &OpenOptions) -> Result<Arc<dyn DiskImage>> {
    open_image_at_depth(path, options, 0)
}

pub(crate) fn open_image_at_depth(
    path: &Path,
    options: &OpenOptions,
    depth: usize,
) -> Result<Arc<dyn DiskImage>> {
    let file = open_file(path, options.read_only, options.direct)?;
    lock::lock(&file, path, options.read_only)?;
    let name = path.display().to_string();
    let storage = storage::FileStorage::new(file, options.direct);
    let probed = probe(&storage, &name)?;
    match options.format {
        Some(ImageFormat::Raw) => open_raw(storage, name, options, false),
        None if probed == ImageFormat::Raw => {
            tracing::info!("{name}: no format given and no qcow2 header found: opening as raw");
            open_raw(storage, name, options, true)
        }
        Some(ImageFormat::Qcow2) if probed != ImageFormat::Qcow2 => Err(Error::WrongFormat {
            image: name,
            expected: "qcow2",
            reason: "the file does not start with the qcow2 magic".into(),
        }),
        _ => Ok(Arc::new(Qcow2Image::open_file(
            storage, path, options, depth,
        )?)),
    }
}

fn open_raw(
    storage: storage::FileStorage,
    name: String,
    options: &OpenOptions,
    probed: bool,
) -> Result<Arc<dyn DiskImage>> {
    let raw = RawImage::new(storage, name, options.read_only, probed)?;
    let raw = if options.direct && !options.read_only {
        raw.require_aligned_size()?
    } else {
        raw
    };
    Ok(Arc::new(raw))
}

/// Detects the format from the first bytes of the storage.
pub(crate) fn probe(storage: &dyn storage::Storage, name: &str) -> Result<ImageFormat> {
    let mut magic = [0u8; 4];
    let n = storage
        .read_full(&mut magic, 0)
        .map_err(|e| Error::io(name, "read (format probe)", 0, e))?;
    Ok(if n == magic.len() && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(!read_only);
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    o.custom_flags(flags);
    o.open(path).map_err(|source| {
        let source = if direct && source.raw_os_error() == Some(libc::EINVAL) {
            std::io::Error::new(
                source.kind(),
                "the filesystem does not support O_DIRECT (open without direct I/O)",
            )
        } else {
            source
        };
        Error::Open {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Checks `[offset, offset+len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(image: &str, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            image: image.to_string(),
            offset,
            len,
            size,
        }),
    }
}

/// A [`DEVICE_ID_LEN`]-byte ID derived from a file's (device, inode): stable across opens
/// and VM restarts while the file exists, distinct between files.
pub(crate) fn device_id(identity: Option<(u64, u64)>, fallback: &str) -> String {
    // FNV-1a over the identity (or the name for storage without one).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    match identity {
        Some((dev, ino)) => {
            eat(&dev.to_le_bytes());
            eat(&ino.to_le_bytes());
        }
        None => eat(fallback.as_bytes()),
    }
    format!("keel{h:016x}")
}

// The device model moves the engine to its own thread and shares images between workers.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<IoEngine>();
    send_sync::<RawImage>();
    send_sync::<Qcow2Image>();
    send_sync::<Error>();
};

#[cfg(test)]
mod tests;
