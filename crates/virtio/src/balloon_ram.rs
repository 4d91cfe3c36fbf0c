//! The guest RAM the balloon takes frames from: its regions, which frames are inflated, and
//! giving their host memory back (marked for a migration in progress).

use super::{Shared, PAGE_MASK, PAGE_SHIFT};
use crate::GuestMemory;
use std::sync::atomic::Ordering::SeqCst;
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

/// A writable, page-aligned RAM region and which of its frames are in the balloon.
pub(super) struct RamRegion {
    pub(super) start_pfn: u64,
    pub(super) pages: u64,
    /// How to release its pages: `None` where they cannot be (hugetlbfs).
    pub(super) advice: Option<libc::c_int>,
    pub(super) inflated: Vec<u64>,
}

impl RamRegion {
    pub(super) fn contains(&self, pfn: u64) -> bool {
        pfn >= self.start_pfn && pfn - self.start_pfn < self.pages
    }
    /// Sets (inflate) or clears (deflate) the frame's bit; false if it already was so.
    pub(super) fn flip(&mut self, pfn: u64, inflate: bool) -> bool {
        let i = pfn - self.start_pfn;
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        let Some(w) = self.inflated.get_mut(word) else {
            return false;
        };
        if (*w & bit != 0) == inflate {
            return false;
        }
        *w ^= bit;
        true
    }
}

/// The regions of `mem` the balloon may take frames from: writable and 4 KiB aligned.
pub(super) fn ram_regions(mem: &GuestMemory) -> Vec<RamRegion> {
    mem.iter()
        .filter(|r| r.prot() & libc::PROT_WRITE != 0)
        .filter(|r| r.start_addr().raw_value() & PAGE_MASK as u64 == 0)
        .map(|r| {
            let pages = r.len() >> PAGE_SHIFT;
            let advice = if r.is_hugetlbfs() == Some(true) {
                None
            } else if r.flags() & libc::MAP_SHARED != 0 {
                // Shared (memfd, file) memory: punch the backing out, not just our mapping.
                Some(libc::MADV_REMOVE)
            } else {
                Some(libc::MADV_DONTNEED)
            };
            RamRegion {
                start_pfn: r.start_addr().raw_value() >> PAGE_SHIFT,
                pages,
                advice,
                inflated: vec![0; pages.div_ceil(64) as usize],
            }
        })
        .collect()
}

/// Releases the host memory behind `pages` frames from `first_pfn`, all inside `region`.
pub(super) fn release(
    mem: &GuestMemory,
    region: &RamRegion,
    first_pfn: u64,
    pages: u64,
    shared: &Shared,
) {
    let Some(advice) = region.advice else {
        return;
    };
    let first = GuestAddress(first_pfn << PAGE_SHIFT);
    let len = pages << PAGE_SHIFT;
    let (Ok(host), Ok(last)) = (
        mem.get_host_address(first),
        mem.get_host_address(first.unchecked_add(len - 1)),
    ) else {
        return;
    };
    // The range must be one contiguous, page-aligned host mapping.
    if host as usize & PAGE_MASK != 0 || last as usize != host as usize + (len as usize - 1) {
        return;
    }
    shared.madvise_calls.fetch_add(1, SeqCst);
    // The guest gave these frames up, so discarding their contents is what it asked for;
    // Rust code reaches guest memory only through volatile accesses, never references.
    // SAFETY: [host, host + len) is whole pages of one writable guest RAM mapping (both ends
    // translate within it, checked above) that `mem` keeps mapped.
    if unsafe { libc::madvise(host.cast(), len as usize, advice) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!("balloon: madvise of {len} bytes at {first:#x?} failed: {e}");
    }
    // The pages read as zero now: a migration in progress sends them again.
    if let Some((r, at)) = mem.to_region_addr(first) {
        r.bitmap().mark_dirty(at.raw_value() as usize, len as usize);
    }
}
