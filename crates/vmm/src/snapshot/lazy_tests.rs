//! Saving guest memory and restoring it on first use, on real anonymous memory with
//! userfaultfd (no KVM needed: the test thread's own reads are the faults).

use super::*;
use crate::snapshot::memory::{file_size, restore, save};
use keel_arch::layout;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress};

struct Tmp(std::path::PathBuf);

impl Tmp {
    fn new(tag: &str) -> (Tmp, File) {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("keel-lazy-{tag}-{}-{n}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (Tmp(p), f)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A pager thread for `lazy`, stopped on drop.
struct Serving {
    quit: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn serve(lazy: &Arc<LazyMemory>) -> Serving {
    let quit = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let (l, q) = (lazy.clone(), quit.clone());
    Serving {
        quit,
        thread: Some(std::thread::spawn(move || l.serve(&q))),
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.quit.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

/// The pager's counters once it has had a moment with nothing to do.
fn idle_stats(lazy: &LazyMemory) -> keel_api::PagerInfo {
    let mut last = lazy.stats();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = lazy.stats();
        if now == last {
            return now;
        }
        last = now;
    }
}

const SIZE: u64 = 64 << 20;

/// Every mark of [`source`] reads back from `ram`.
fn assert_marks(ram: &crate::memory::GuestRam) {
    for a in MARKS {
        assert_eq!(
            ram.all.read_obj::<u64>(GuestAddress(a)).unwrap(),
            a ^ 0x5a5a,
            "{a:#x}"
        );
    }
}
/// Marks in chunks 0, 0, 7 and 15 of the part (guest-physical holes come out of it), one in
/// the ROM (chunk 0), and a touched page zero again.
const MARKS: [u64; 4] = [0x1000, 0x10_0000, 0x200_0123, SIZE - 8];

fn source() -> (
    crate::memory::GuestRam,
    Tmp,
    File,
    super::super::memory::SavedMemory,
) {
    let ram = crate::memory::allocate(SIZE).unwrap();
    for a in MARKS {
        ram.all.write_obj(a ^ 0x5a5a, GuestAddress(a)).unwrap();
    }
    ram.all
        .write_obj(0xabcdu16, GuestAddress(layout::ROM_START))
        .unwrap();
    ram.all.write_obj(0u64, GuestAddress(0x30_0000)).unwrap();
    let (tmp, out) = Tmp::new("src");
    let pagemap = File::open("/proc/self/pagemap").ok();
    let saved = save(&ram.all, &out, pagemap.as_ref(), None).unwrap();
    (ram, tmp, out, saved)
}

#[test]
fn saved_memory_comes_back_on_first_use_checked_and_private() {
    let (src, tmp, out, saved) = source();
    assert_eq!(saved.size, file_size(SIZE));
    assert_eq!(saved.data_bytes, 5 * PAGE as u64, "only the non-zero pages");
    assert_eq!(
        saved.chunks.len() as u64,
        keel_snapshot::chunk_count(saved.size)
    );
    // The same checksum the snapshot loader computes from the file, made of the chunks.
    assert_eq!(
        keel_snapshot::hash_pages_file(&tmp.0).unwrap().0,
        saved.digest
    );
    assert_eq!(keel_snapshot::pages_digest(&saved.chunks), saved.digest);
    // Without a pagemap every page is looked at: same result.
    assert_eq!(save(&src.all, &out, None, None).unwrap(), saved);

    let (ram, lazy) = restore(SIZE, &out, saved.chunks.clone()).unwrap();
    let _serving = serve(&lazy);
    assert_marks(&ram);
    assert_eq!(
        ram.all
            .read_obj::<u16>(GuestAddress(layout::ROM_START))
            .unwrap(),
        0xabcd
    );
    // Chunks 0 (two marks and the ROM), 7 and 15 came in (the faulting thread goes on
    // before the rest of its chunk is in: count once the pager is idle), nothing else.
    let s = idle_stats(&lazy);
    assert_eq!(s.chunks_loaded, 3, "{s:?}");
    assert_eq!(s.bytes_copied, 5 * PAGE as u64);
    assert!(lazy.failure().is_none());
    // A zero page of a loaded chunk, and a page of a chunk never used: zeros.
    assert_eq!(ram.all.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(), 0);
    assert_eq!(
        ram.all.read_obj::<u64>(GuestAddress(0x100_0000)).unwrap(),
        0
    );
    assert_eq!(idle_stats(&lazy).chunks_loaded, 4);
    // Writes stay in the VM: the part keeps the snapshot.
    ram.all.write_obj(7u64, GuestAddress(0x1000)).unwrap();
    let part = std::fs::read(&tmp.0).unwrap();
    assert_eq!(
        u64::from_le_bytes(part[0x1000..0x1008].try_into().unwrap()),
        0x1000 ^ 0x5a5a
    );
    // A page the balloon gives back comes back as zeros, not as the snapshot's page.
    let host = ram.all.get_host_address(GuestAddress(0x1000)).unwrap();
    // SAFETY: one page of the VM's own mapping, given back as the balloon does.
    assert_eq!(
        unsafe { libc::madvise(host.cast(), PAGE, libc::MADV_DONTNEED) },
        0
    );
    assert_eq!(ram.all.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
}

#[test]
fn a_snapshot_of_a_restored_vm_holds_what_it_never_touched() {
    let (_src, _tmp, out, saved) = source();
    let (ram, lazy) = restore(SIZE, &out, saved.chunks.clone()).unwrap();
    let serving = serve(&lazy);
    // Touch chunk 0 only (and write there); chunks 7 and 15 stay in the part.
    ram.all.write_obj(7u64, GuestAddress(0x1000)).unwrap();
    assert_eq!(idle_stats(&lazy).chunks_loaded, 1);
    let (tmp2, out2) = Tmp::new("again");
    let pagemap = File::open("/proc/self/pagemap").ok();
    let again = save(&ram.all, &out2, pagemap.as_ref(), Some(&lazy)).unwrap();
    assert_eq!(lazy.stats().chunks_loaded, 1, "saving loads nothing");
    assert_eq!(
        keel_snapshot::hash_pages_file(&tmp2.0).unwrap().0,
        again.digest
    );
    drop(serving);
    let (ram2, lazy2) = restore(SIZE, &out2, again.chunks).unwrap();
    let _serving2 = serve(&lazy2);
    assert_eq!(ram2.all.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
    for a in &MARKS[1..] {
        assert_eq!(
            ram2.all.read_obj::<u64>(GuestAddress(*a)).unwrap(),
            a ^ 0x5a5a
        );
    }
}

#[test]
fn a_corrupted_chunk_never_reaches_the_guest() {
    let (_src, tmp, out, saved) = source();
    // Flip a byte of chunk 7's data after the snapshot was taken.
    let off = file_offset(0x200_0123);
    assert_eq!(off / CHUNK, 7);
    let mut b = [0u8; 1];
    out.read_exact_at(&mut b, off).unwrap();
    out.write_all_at(&[b[0] ^ 0x20], off).unwrap();
    let (ram, lazy) = restore(SIZE, &out, saved.chunks.clone()).unwrap();
    let _serving = serve(&lazy);
    // Chunk 0 is fine.
    assert_eq!(
        ram.all.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
        0x1000 ^ 0x5a5a
    );
    assert!(lazy.failure().is_none());
    // Chunk 7 is not: the reader gets zeros and the memory is marked bad.
    assert_eq!(
        ram.all.read_obj::<u64>(GuestAddress(0x200_0123)).unwrap(),
        0
    );
    let f = lazy.failure().unwrap();
    assert!(f.contains("is corrupted") && f.contains("chunk 7"), "{f}");
    // The checker finds it too, in a VM whose guest never looks there.
    let (_ram2, lazy2) = restore(SIZE, &out, saved.chunks.clone()).unwrap();
    lazy2.check_unused(&AtomicBool::new(false));
    assert!(lazy2.failure().unwrap().contains("chunk 7"));
    // Saving a restored VM reads its unused chunks again, checked.
    let (ram3, lazy3) = restore(SIZE, &out, saved.chunks).unwrap();
    let _serving3 = serve(&lazy3);
    let (_t, out3) = Tmp::new("bad");
    let err = save(&ram3.all, &out3, None, Some(&lazy3)).unwrap_err();
    assert!(err.to_string().contains("is corrupted"), "{err}");
    drop(tmp);
}

/// The offset of guest-physical `gpa` in the memory part.
fn file_offset(gpa: u64) -> u64 {
    let mut off = 0;
    for r in layout::ram_ranges(SIZE) {
        if (r.start..r.start + r.size).contains(&gpa) {
            return off + gpa - r.start;
        }
        off += r.size;
    }
    panic!("{gpa:#x} is not RAM");
}

#[test]
fn restores_that_cannot_match_are_refused() {
    let (_src, _tmp, out, saved) = source();
    assert!(restore(SIZE * 2, &out, saved.chunks.clone())
        .err()
        .unwrap()
        .contains("needs"));
    let mut fewer = saved.chunks.clone();
    fewer.pop();
    assert!(restore(SIZE, &out, fewer)
        .err()
        .unwrap()
        .contains("chunk digests"));
}

#[test]
fn faults_on_chunks_being_filled_are_served_once_each_and_none_is_lost() {
    // Chunks 2..=4 of the part dense with data, then many readers at once on all three.
    let ram = crate::memory::allocate(SIZE).unwrap();
    let (lo, hi) = (0x90_0000u64, 0x140_0000u64);
    for a in (lo..hi).step_by(512) {
        ram.all.write_obj(a | 1, GuestAddress(a)).unwrap();
    }
    let (_tmp, out) = Tmp::new("dense");
    let saved = save(&ram.all, &out, None, None).unwrap();
    let (ram2, lazy) = restore(SIZE, &out, saved.chunks).unwrap();
    let _serving = serve(&lazy);
    let ram2 = Arc::new(ram2);
    let readers: Vec<_> = (0..6u64)
        .map(|i| {
            let r = ram2.clone();
            std::thread::spawn(move || {
                // Each reader walks the range from its own starting point, wrapping.
                let span = hi - lo;
                let mut bad = Vec::new();
                for k in 0..(span / 512) {
                    let a = lo + (i * span / 6 / 512 * 512 + k * 512) % span;
                    let v = r.all.read_obj::<u64>(GuestAddress(a)).unwrap();
                    if v != a | 1 {
                        bad.push((a, v));
                    }
                }
                (bad.len(), bad.first().copied(), bad.last().copied())
            })
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let (n, first, last) = r.join().unwrap();
        assert_eq!(
            n, 0,
            "reader {i} saw wrong bytes: first {first:x?}, last {last:x?}"
        );
    }
    let s = idle_stats(&lazy);
    let first = file_offset(lo) / CHUNK;
    let last = file_offset(hi - 1) / CHUNK;
    assert_eq!(s.chunks_loaded, last - first + 1, "{s:?}");
    // Every data page copied exactly once.
    assert_eq!(s.bytes_copied, hi - lo, "{s:?}");
    assert!(lazy.failure().is_none());
}

#[test]
fn the_checker_fills_what_the_guest_never_touched() {
    let (_src, _tmp, out, saved) = source();
    let (ram, lazy) = restore(SIZE, &out, saved.chunks).unwrap();
    lazy.check_unused(&AtomicBool::new(false));
    assert!(lazy.failure().is_none());
    let s = lazy.stats();
    assert!(s.checked_in_us.is_some());
    assert_eq!(
        s.bytes_copied,
        5 * PAGE as u64,
        "the data pages, once: {s:?}"
    );
    // Every page is in place: reads fault no more (a pager runs only to be sure of that).
    let _serving = serve(&lazy);
    assert_marks(&ram);
    assert_eq!(
        ram.all.read_obj::<u64>(GuestAddress(0x100_0000)).unwrap(),
        0
    );
    assert_eq!(idle_stats(&lazy).faults, 0, "no page was missing any more");
    assert!(
        lazy.filled_pages().iter().all(|w| *w == u64::MAX),
        "every page filled"
    );
}
