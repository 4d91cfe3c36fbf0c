//! Raw images: the guest's bytes at the same offsets in the file, positional I/O only.

use crate::storage::{Storage, DIRECT_ALIGN};
use crate::{check_range, device_id, DiskImage, Error, ImageFormat, Result, QCOW2_MAGIC};

/// Chunk used when zeros have to be written for real.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw disk image. Its size is the file's size when opened.
pub struct RawImage {
    storage: Box<dyn Storage>,
    name: String,
    size: u64,
    read_only: bool,
    /// The format was detected, not given: refuse writes that would make it look like qcow2.
    probed: bool,
}

impl RawImage {
    /// A raw image over any storage. `probed` says the format was guessed (see
    /// [`crate::open_image`]); it makes writes of a qcow2 magic at offset 0 fail.
    pub fn new(
        storage: impl Storage + 'static,
        name: String,
        read_only: bool,
        probed: bool,
    ) -> Result<Self> {
        Self::from_storage(Box::new(storage), name, read_only, probed)
    }

    /// Like [`RawImage::new`] with boxed storage.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        name: String,
        read_only: bool,
        probed: bool,
    ) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io(&name, "size query", 0, e))?;
        Ok(RawImage {
            storage,
            name,
            size,
            read_only,
            probed,
        })
    }

    /// Fails unless `size % DIRECT_ALIGN == 0` (needed with `O_DIRECT`, whose block-sized
    /// writes would otherwise grow the file past the disk's end).
    pub(crate) fn require_aligned_size(self) -> Result<Self> {
        if self.size % DIRECT_ALIGN != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: direct I/O needs a raw image size that is a multiple of {DIRECT_ALIGN} \
                 bytes (it is {})",
                self.name, self.size
            )));
        }
        Ok(self)
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        check_range(&self.name, offset, len, self.size)
    }

    /// With a probed format, a write covering any of the first 4 bytes must not produce the
    /// qcow2 magic there.
    fn check_signature(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed || offset >= QCOW2_MAGIC.len() as u64 || buf.is_empty() {
            return Ok(());
        }
        let mut head = [0u8; 4];
        self.storage
            .read_full(&mut head, 0)
            .map_err(|e| Error::io(&self.name, "read", 0, e))?;
        for (i, b) in buf.iter().enumerate() {
            let pos = offset as usize + i;
            match head.get_mut(pos) {
                Some(h) => *h = *b,
                None => break,
            }
        }
        if head == QCOW2_MAGIC {
            return Err(Error::ProbedRawSignature {
                image: self.name.clone(),
                format: "qcow2",
            });
        }
        Ok(())
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, offset, buf.len() as u64, self.size)?;
        self.storage
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.name, "read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.check_signature(buf, offset)?;
        self.storage
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.name, "write", offset, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.storage
            .sync_data()
            .map_err(|e| Error::io(&self.name, "flush", 0, e))
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`; a no-op where the host cannot punch holes.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        match self.storage.punch_hole(offset, len) {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::debug!("{}: discard not supported by the host: ignored", self.name);
                Ok(())
            }
            Err(e) => Err(Error::io(&self.name, "discard", offset, e)),
        }
    }

    /// `fallocate(ZERO_RANGE)`, else `PUNCH_HOLE`, else zeros written out.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let err = |e| Error::io(&self.name, "write zeroes", offset, e);
        if self.storage.zero_range(offset, len).map_err(err)? {
            return Ok(());
        }
        if self.storage.punch_hole(offset, len).map_err(err)? {
            return Ok(());
        }
        write_zeros(self.storage.as_ref(), offset, len).map_err(err)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        device_id(self.storage.identity(), &self.name)
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn lock_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.storage.raw_fd()
    }

    fn raw_file_fd(&self) -> Option<std::os::unix::io::RawFd> {
        if self.probed || self.storage.direct() {
            return None;
        }
        self.storage.raw_fd()
    }
}

/// Writes `len` zero bytes at `offset`, a chunk at a time.
pub(crate) fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        storage.write_all_at(zeros.get(..n).unwrap_or_default(), offset + done)?;
        done += n as u64;
    }
    Ok(())
}
