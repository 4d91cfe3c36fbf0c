//! Positional byte storage under an image: a host file, or memory (tests, fuzzing).
//!
//! Every call names its offset; nothing shares a file cursor, so one `Storage` serves many
//! threads at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Mutex, RwLock};

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

/// Alignment used for `O_DIRECT` I/O: a safe upper bound of logical block sizes.
pub const DIRECT_ALIGN: u64 = 4096;

/// Positional I/O on the bytes that hold an image.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes written data durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)` so it reads as zeros without changing the length.
    /// Returns `Ok(false)` when the storage cannot do that (nothing changed).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Zeroes `[offset, offset+len)` cheaply if the storage can; `Ok(false)` when it cannot
    /// (the caller then writes zeros).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// A stable identity for `GET_ID`: (device, inode) for files.
    fn identity(&self) -> Option<(u64, u64)>;
    /// The file descriptor, for engines that submit I/O to the kernel themselves.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether I/O bypasses the page cache (`O_DIRECT`: alignment rules apply to the fd).
    fn direct(&self) -> bool {
        false
    }

    /// Reads exactly `buf.len()` bytes; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_full(buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends {} bytes into a {}-byte read", n, buf.len()),
            ));
        }
        Ok(())
    }

    /// Reads until `buf` is full or the end of the storage; returns the bytes read.
    fn read_full(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let rest = buf.get_mut(done..).unwrap_or_default();
            match self.read_at(rest, off) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// A host file (regular file or block device).
pub struct FileStorage {
    file: File,
    direct: bool,
    /// With `O_DIRECT`, unaligned writes read-modify-write whole blocks: they hold this
    /// exclusively, aligned writes hold it shared, so no write is lost inside a block.
    rmw: RwLock<()>,
}

impl FileStorage {
    /// Wraps an open file. `direct` says the file was opened with `O_DIRECT`, so all I/O must
    /// be aligned to [`DIRECT_ALIGN`] (this type bounces unaligned I/O).
    pub fn new(file: File, direct: bool) -> Self {
        FileStorage {
            file,
            direct,
            rmw: RwLock::new(()),
        }
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn is_aligned(buf_addr: usize, len: usize, offset: u64) -> bool {
        (buf_addr as u64) % DIRECT_ALIGN == 0
            && (len as u64) % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN == 0
    }

    /// Reads the aligned blocks around `[offset, offset+len)` into an aligned bounce buffer;
    /// bytes past the end of the file read as zeros. Returns the buffer, the start of
    /// the aligned range inside it and the number of file bytes that existed.
    fn read_blocks(&self, offset: u64, len: usize) -> io::Result<(AlignedBuf, u64, u64)> {
        let start = offset - offset % DIRECT_ALIGN;
        let end = offset
            .checked_add(len as u64)
            .and_then(|e| e.checked_next_multiple_of(DIRECT_ALIGN))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let size = usize::try_from(end - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut bounce = AlignedBuf::new(size);
        let mut done = 0usize;
        while done < size {
            let rest = bounce.as_mut().get_mut(done..).unwrap_or_default();
            match self.file.read_at(rest, start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((bounce, start, done as u64))
    }
}

impl Drop for FileStorage {
    /// Drops the image lock explicitly: a forked child that has not reached `exec` yet holds
    /// a copy of the descriptor, and closing ours alone would leave the lock held by it.
    fn drop(&mut self) {
        crate::lock::unlock(&self.file);
    }
}

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary (no unsafe: the
/// vector is over-allocated and the aligned window is a sub-slice).
struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let vec = vec![0u8; len + DIRECT_ALIGN as usize];
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN as usize);
        AlignedBuf { vec, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        self.vec
            .get_mut(self.start..self.start + self.len)
            .unwrap_or_default()
    }
    fn as_ref(&self) -> &[u8] {
        self.vec
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if !self.direct || Self::is_aligned(buf.as_ptr() as usize, buf.len(), offset) {
            return self.file.read_at(buf, offset);
        }
        let (bounce, start, valid) = self.read_blocks(offset, buf.len())?;
        let skip = offset - start;
        let avail = valid.saturating_sub(skip).min(buf.len() as u64) as usize;
        let src = bounce
            .as_ref()
            .get(skip as usize..skip as usize + avail)
            .unwrap_or_default();
        if let Some(dst) = buf.get_mut(..avail) {
            dst.copy_from_slice(src);
        }
        Ok(avail)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(buf, offset);
        }
        if Self::is_aligned(buf.as_ptr() as usize, buf.len(), offset) {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            return self.file.write_all_at(buf, offset);
        }
        if Self::is_aligned(0, buf.len(), offset) {
            // Whole blocks from an unaligned buffer: copy, no read needed.
            let mut bounce = AlignedBuf::new(buf.len());
            bounce.as_mut().copy_from_slice(buf);
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            return self.file.write_all_at(bounce.as_ref(), offset);
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let (mut bounce, start, _) = self.read_blocks(offset, buf.len())?;
        let skip = (offset - start) as usize;
        if let Some(dst) = bounce.as_mut().get_mut(skip..skip + buf.len()) {
            dst.copy_from_slice(buf);
        }
        self.file.write_all_at(bounce.as_ref(), start)
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block device: its size is where SEEK_END lands. lseek on a dup'ed fd would move the
        // shared cursor all the same; nothing in this crate uses the cursor.
        let mut f = &self.file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        fallocate_or_unsupported(&self.file, FallocateMode::PunchHole, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        fallocate_or_unsupported(&self.file, FallocateMode::ZeroRange, offset, len)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        let m = self.file.metadata().ok()?;
        Some((m.dev(), m.ino()))
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn direct(&self) -> bool {
        self.direct
    }
}

fn fallocate_or_unsupported(
    file: &File,
    mode: FallocateMode,
    offset: u64,
    len: u64,
) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    match fallocate(file, mode, true, offset, len) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.errno(),
                libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
    }
}

/// Bytes in memory: for tests and fuzzing. Writes may grow it up to `max_len`.
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    max_len: u64,
}

impl MemStorage {
    /// Storage holding `data`, allowed to grow to `max_len` bytes.
    pub fn new(data: Vec<u8>, max_len: u64) -> Self {
        MemStorage {
            data: Mutex::new(data),
            max_len,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.lock();
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(src) = data.get(start..) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        if let (Some(d), Some(s)) = (buf.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.max_len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    "in-memory storage limit reached",
                )
            })?;
        let mut data = self.lock();
        let (start, end) = (offset as usize, end as usize);
        if data.len() < end {
            data.resize(end, 0);
        }
        if let Some(d) = data.get_mut(start..end) {
            d.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.zero_range(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut data = self.lock();
        let size = data.len() as u64;
        let start = offset.min(size) as usize;
        let end = offset.saturating_add(len).min(size) as usize;
        if let Some(d) = data.get_mut(start..end) {
            d.fill(0);
        }
        Ok(true)
    }

    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}
