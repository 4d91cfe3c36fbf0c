//! Guest memory in a snapshot: one file holding every range of `layout::ram_ranges` back to
//! back, with holes for pages that are zero; restored by mapping that file privately, so a
//! page is read only when the guest (or a device) first touches it and a write copies it.

use crate::memory::GuestRam;
use keel_arch::layout;
use keel_snapshot::{PageHasher, PAGE};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

/// What saving guest memory produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedMemory {
    /// `PartKind::Pages` checksum.
    pub digest: String,
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
/// from `/proc/self/pagemap`) plus, for a region mapped from a file, the file's data
/// extents. Without a pagemap, every page.
fn candidates(
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
    if let Some(fo) = region.file_offset() {
        mark_data_extents(fo.file(), fo.start(), region.len(), &mut want)?;
    }
    Ok(want)
}

/// Marks the pages of `file[start..start+len]` that hold data.
fn mark_data_extents(file: &File, start: u64, len: u64, want: &mut [bool]) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let end = start + len;
    let mut pos = start;
    while pos < end {
        let Ok(at) = i64::try_from(pos) else { break };
        // SAFETY: lseek on a valid fd; no memory is passed.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            // No SEEK_DATA support: every page may hold data.
            want.fill(true);
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            want.fill(true);
            return Ok(());
        }
        let (data, hole) = (data as u64, (hole as u64).min(end));
        if data >= end {
            break;
        }
        let first = (data - start) / PAGE as u64;
        let last = (hole - start).div_ceil(PAGE as u64);
        for p in first..last {
            if let Some(w) = want.get_mut(p as usize) {
                *w = true;
            }
        }
        pos = hole.max(data + 1);
    }
    Ok(())
}

/// Writes guest memory to `out` (which becomes `file_size` long, with holes for zero pages).
/// The guest and the devices must not be running.
pub(crate) fn save(
    mem: &GuestMemoryMmap,
    out: &File,
    pagemap: Option<&File>,
) -> std::io::Result<SavedMemory> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(0)?;
    out.set_len(total)?;
    let mut hasher = PageHasher::new(total);
    let mut data_bytes = 0u64;
    let mut base = 0u64;
    let mut page = vec![0u8; PAGE];
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
            if !*w {
                flush(&mut run, run_at)?;
                continue;
            }
            region
                .read_slice(&mut page, MemoryRegionAddress((i * PAGE) as u64))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if keel_snapshot::is_zero_page(&page) {
                flush(&mut run, run_at)?;
                continue;
            }
            hasher.page(off / PAGE as u64, &page);
            data_bytes += PAGE as u64;
            if run.is_empty() {
                run_at = off;
            }
            run.extend_from_slice(&page);
            if run.len() >= 1 << 20 {
                flush(&mut run, run_at)?;
            }
        }
        flush(&mut run, run_at)?;
        base += region.len();
    }
    out.sync_all()?;
    Ok(SavedMemory {
        digest: hasher.finish(),
        size: total,
        data_bytes,
    })
}

/// Guest memory of `size` bytes mapped privately from a snapshot's memory `file`: nothing
/// is read now; the guest's first touch of a page reads it, its first write copies it.
pub(crate) fn map(size: u64, file: &File) -> Result<GuestRam, String> {
    let expected = file_size(size);
    let actual = file.metadata().map_err(|e| e.to_string())?.len();
    if actual != expected {
        return Err(format!(
            "the memory file is {actual} bytes; a VM of {size} bytes needs {expected}"
        ));
    }
    let file = Arc::new(file.try_clone().map_err(|e| e.to_string())?);
    let mut all = Vec::new();
    let mut writable = Vec::new();
    let mut offset = 0u64;
    for r in layout::ram_ranges(size) {
        let len = usize::try_from(r.size).map_err(|e| e.to_string())?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| e.to_string())?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.start))
            .map(Arc::new)
            .ok_or_else(|| format!("guest range {:#x}+{:#x} overflows", r.start, r.size))?;
        if !r.read_only {
            writable.push(region.clone());
        }
        all.push(region);
        offset += r.size;
    }
    Ok(GuestRam {
        all: GuestMemoryMmap::from_arc_regions(all).map_err(|e| e.to_string())?,
        devices: GuestMemoryMmap::from_arc_regions(writable).map_err(|e| e.to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("keel-mem-{tag}-{}", std::process::id()))
    }

    #[test]
    fn saved_memory_maps_back_lazily_and_privately() {
        let size = 64 << 20;
        let ram = crate::memory::allocate(size).unwrap();
        let marks = [0x1000u64, 0x10_0000, 0x20_0123, size - 8];
        for a in marks {
            ram.all.write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
        }
        ram.all
            .write_obj(0xabcdu16, GuestAddress(layout::ROM_START))
            .unwrap();
        // A touched page that is zero again is a hole too.
        ram.all.write_obj(0u64, GuestAddress(0x30_0000)).unwrap();
        let path = tmp("save");
        let out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let pagemap = File::open("/proc/self/pagemap").ok();
        let saved = save(&ram.all, &out, pagemap.as_ref()).unwrap();
        assert_eq!(saved.size, file_size(size));
        assert_eq!(
            saved.data_bytes,
            5 * PAGE as u64,
            "only the touched non-zero pages"
        );
        // The same checksum the snapshot loader computes from the file.
        assert_eq!(
            keel_snapshot::hash_pages_file(&path).unwrap().0,
            saved.digest
        );
        // Without a pagemap every page is looked at: same result.
        let again = save(&ram.all, &out, None).unwrap();
        assert_eq!(again, saved);

        let restored = map(size, &out).unwrap();
        for a in marks {
            assert_eq!(
                restored.all.read_obj::<u64>(GuestAddress(a)).unwrap(),
                a ^ 0x5a5a
            );
        }
        assert_eq!(
            restored
                .all
                .read_obj::<u16>(GuestAddress(layout::ROM_START))
                .unwrap(),
            0xabcd
        );
        assert!(restored
            .devices
            .read_obj::<u16>(GuestAddress(layout::ROM_START))
            .is_err());
        // Writes stay private to the VM: the file keeps the snapshot.
        restored.all.write_obj(7u64, GuestAddress(0x1000)).unwrap();
        let before = std::fs::read(&path).unwrap();
        assert_eq!(
            u64::from_le_bytes(before[0x1000..0x1008].try_into().unwrap()),
            0x1000 ^ 0x5a5a
        );
        // Saving a restored VM sees both its own writes and the pages it never touched.
        let path2 = tmp("save2");
        let out2 = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path2)
            .unwrap();
        save(&restored.all, &out2, pagemap.as_ref()).unwrap();
        let after = map(size, &out2).unwrap();
        assert_eq!(after.all.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
        assert_eq!(
            after.all.read_obj::<u64>(GuestAddress(size - 8)).unwrap(),
            (size - 8) ^ 0x5a5a
        );
        // A memory file of the wrong size is refused.
        assert!(map(size * 2, &out).err().unwrap().contains("needs"));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&path2);
    }
}
