//! Guest memory in a snapshot: one file holding every range of `layout::ram_ranges` back to
//! back, with holes for pages that are zero. A restore maps nothing of it up front: the
//! pager (`super::lazy`) copies each chunk in, checked, when the guest first touches it.

use super::lazy::LazyMemory;
use crate::memory::{GuestMemoryMmap, GuestRam, GuestRegionMmap};
use keel_arch::layout;
use keel_snapshot::{PageHasher, CHUNK, PAGE};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// What saving guest memory produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedMemory {
    /// `PartKind::Pages` checksum.
    pub digest: String,
    /// The digest of each chunk (what a restore checks each chunk against).
    pub chunks: Vec<[u8; 32]>,
    /// File length: the VM's memory size (ROM included).
    pub size: u64,
    /// Bytes actually written (non-zero pages).
    pub data_bytes: u64,
}

/// The bytes of guest memory the file holds: every range, in order.
pub(crate) fn file_size(memory: u64) -> u64 {
    layout::ram_ranges(memory).iter().map(|r| r.size).sum()
}

/// Pages the save must look at in one region: those the process has (present or swapped,
/// from `/proc/self/pagemap`). Without a pagemap, every page.
pub(crate) fn candidates(
    region: &GuestRegionMmap,
    host: *mut u8,
    pagemap: Option<&File>,
) -> std::io::Result<Vec<bool>> {
    let pages = region.len() as usize / PAGE;
    let Some(pm) = pagemap else {
        return Ok(vec![true; pages]);
    };
    let mut want = vec![false; pages];
    let first = host as u64 / PAGE as u64;
    let mut buf = vec![0u8; 8 * 8192];
    let mut i = 0usize;
    while i < pages {
        let n = (pages - i).min(8192);
        let bytes = buf.get_mut(..n * 8).unwrap_or_default();
        pm.read_exact_at(bytes, (first + i as u64) * 8)?;
        for (j, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            // Bit 63: present; bit 62: swapped out.
            if e & (3 << 62) != 0 {
                if let Some(w) = want.get_mut(i + j) {
                    *w = true;
                }
            }
        }
        i += n;
    }
    Ok(want)
}

/// Where the pages of a restored VM its guest never used are: still in the memory part it
/// came from.
struct FromPart<'a> {
    lazy: &'a LazyMemory,
    /// By page of the part, a bit each: in guest memory.
    filled: Vec<u64>,
    buf: Vec<u8>,
    /// The data extents of the chunk `buf` holds (byte ranges in it, in order).
    extents: Vec<std::ops::Range<usize>>,
    held: Option<u64>,
}

/// A page of a restored VM as a snapshot of it sees it.
enum Stored<'a> {
    /// In guest memory (the guest used it).
    InGuest,
    /// In the part, and zero (a hole).
    Zero,
    /// In the part: these bytes (checked).
    Data(&'a [u8]),
}

impl FromPart<'_> {
    /// The page at `offset` of the part, if the guest never used it (read and checked).
    fn page(&mut self, offset: u64) -> std::io::Result<Stored<'_>> {
        // Past the bitmap: not the part's (guest memory decides).
        if super::lazy::page_bit(&self.filled, offset / PAGE as u64) != Some(false) {
            return Ok(Stored::InGuest);
        }
        let chunk = offset / CHUNK;
        if self.held != Some(chunk) {
            self.held = None;
            self.lazy
                .read_checked(chunk, &mut self.buf, &mut self.extents)?;
            self.held = Some(chunk);
        }
        let at = (offset - chunk * CHUNK) as usize;
        if !self.extents.iter().any(|r| r.contains(&at)) {
            return Ok(Stored::Zero);
        }
        Ok(self
            .buf
            .get(at..at + PAGE)
            .map_or(Stored::Zero, Stored::Data))
    }
}

/// Writes guest memory to `out` (which becomes `file_size` long, with holes for zero pages).
/// The guest and the devices must not be running. For a restored VM, `lazy` knows the pages
/// the guest never used: they are copied from the part it came from, checked again.
pub(crate) fn save(
    mem: &GuestMemoryMmap,
    out: &File,
    pagemap: Option<&File>,
    lazy: Option<&LazyMemory>,
) -> std::io::Result<SavedMemory> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(0)?;
    out.set_len(total)?;
    let mut hasher = PageHasher::new(total);
    let mut data_bytes = 0u64;
    let mut base = 0u64;
    let mut page = vec![0u8; PAGE];
    let mut from_part = lazy.map(|lazy| FromPart {
        lazy,
        filled: lazy.filled_pages(),
        buf: vec![0; CHUNK as usize],
        extents: Vec::new(),
        held: None,
    });
    // A run of consecutive non-zero pages, written with one pwrite.
    let mut run: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut run_at = 0u64;
    let flush = |run: &mut Vec<u8>, at: u64| -> std::io::Result<()> {
        if !run.is_empty() {
            out.write_all_at(run, at)?;
            run.clear();
        }
        Ok(())
    };
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let want = candidates(region, host, pagemap)?;
        for (i, w) in want.iter().enumerate() {
            let off = base + (i * PAGE) as u64;
            let stored = match from_part.as_mut() {
                Some(f) => f.page(off)?,
                None => Stored::InGuest,
            };
            let bytes: &[u8] = match stored {
                Stored::Data(p) => p,
                Stored::Zero => {
                    flush(&mut run, run_at)?;
                    continue;
                }
                Stored::InGuest if *w => {
                    region
                        .read_slice(&mut page, MemoryRegionAddress((i * PAGE) as u64))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    &page
                }
                Stored::InGuest => {
                    flush(&mut run, run_at)?;
                    continue;
                }
            };
            if keel_snapshot::is_zero_page(bytes) {
                flush(&mut run, run_at)?;
                continue;
            }
            hasher.page(off / PAGE as u64, bytes);
            data_bytes += PAGE as u64;
            if run.is_empty() {
                run_at = off;
            }
            run.extend_from_slice(bytes);
            if run.len() >= 1 << 20 {
                flush(&mut run, run_at)?;
            }
        }
        flush(&mut run, run_at)?;
        base += region.len();
    }
    out.sync_all()?;
    let (digest, chunks) = hasher.finish_chunks();
    Ok(SavedMemory {
        digest,
        chunks,
        size: total,
        data_bytes,
    })
}

/// Guest memory of `size` bytes to be filled from a snapshot's memory `file` on first use,
/// each chunk checked against `chunks`. Faults wait until the pager serves them.
pub(crate) fn restore(
    size: u64,
    file: &File,
    chunks: Vec<[u8; 32]>,
) -> Result<(GuestRam, Arc<LazyMemory>), String> {
    let expected = file_size(size);
    let actual = file.metadata().map_err(|e| e.to_string())?.len();
    if actual != expected {
        return Err(format!(
            "the memory file is {actual} bytes; a VM of {size} bytes needs {expected}"
        ));
    }
    let ram = crate::memory::allocate(size)?;
    let file = file.try_clone().map_err(|e| e.to_string())?;
    let lazy = LazyMemory::new(file, &ram, chunks)?;
    Ok((ram, lazy))
}
