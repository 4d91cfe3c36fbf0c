use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Anonymous private memory of `len` bytes, unmapped on drop.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the tests synchronise their accesses.
unsafe impl Send for Anon {}
// SAFETY: as above.
unsafe impl Sync for Anon {}

impl Anon {
    fn new(len: usize) -> Anon {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Anon {
            ptr: ptr.cast(),
            len,
        }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn read(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds of the live mapping; a missing page waits for the handler.
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }

    fn write(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.ptr.add(off), v) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Serves faults until `stop`: pages in the first half get a pattern, the rest zero pages.
fn serve(uffd: &Uffd, mem: &Anon, stop: &AtomicBool, faults: &std::sync::Mutex<Vec<Fault>>) {
    let page = vec![0u8; PAGE as usize];
    while !stop.load(Ordering::SeqCst) {
        uffd.wait(None, 20).unwrap();
        while let Some(f) = uffd.next_fault().unwrap() {
            faults.lock().unwrap().push(f);
            let at = f.address & !(PAGE - 1);
            let off = at - mem.addr();
            if off < mem.len as u64 / 2 {
                let mut p = page.clone();
                p.fill((off / PAGE) as u8 + 1);
                assert_eq!(uffd.copy(at, &p).unwrap(), PAGE);
            } else {
                uffd.zeropage(at, PAGE).unwrap();
            }
        }
    }
}

/// Keel's restores need userfaultfd (root, or /dev/userfaultfd): a host without it fails here.
fn make() -> Option<Uffd> {
    Some(Uffd::new().expect("userfaultfd"))
}

#[test]
fn missing_pages_wait_for_the_handler_and_get_what_it_copies() {
    let Some(uffd) = make() else { return };
    let uffd = Arc::new(uffd);
    let mem = Arc::new(Anon::new(16 * PAGE as usize));
    uffd.register(mem.addr(), mem.len as u64).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = {
        let (u, m, s, f) = (uffd.clone(), mem.clone(), stop.clone(), faults.clone());
        std::thread::spawn(move || serve(&u, &m, &s, &f))
    };
    // Reads of the first half see the handler's pattern; of the second, zeros.
    assert_eq!(mem.read(3 * PAGE as usize + 17), 4);
    assert_eq!(mem.read(12 * PAGE as usize), 0);
    // A write to a missing page waits too, then lands on the copied page.
    mem.write(5 * PAGE as usize, 0xee);
    assert_eq!(mem.read(5 * PAGE as usize), 0xee);
    assert_eq!(mem.read(5 * PAGE as usize + 1), 6);
    // Pages already there fault no more.
    assert_eq!(mem.read(3 * PAGE as usize), 4);
    // The kernel's own copies into the range fault too (as KVM's would): read(2) from a pipe.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: writes 3 bytes from a live buffer to the pipe's write end.
    assert_eq!(unsafe { libc::write(fds[1], b"abc".as_ptr().cast(), 3) }, 3);
    let dst = mem.addr() + 7 * PAGE;
    // SAFETY: reads 3 bytes into the registered (live) mapping.
    assert_eq!(
        unsafe { libc::read(fds[0], dst as *mut libc::c_void, 3) },
        3
    );
    assert_eq!(mem.read(7 * PAGE as usize), b'a');
    assert_eq!(mem.read(7 * PAGE as usize + 3), 8);
    // SAFETY: closes the pipe this test made.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    stop.store(true, Ordering::SeqCst);
    handler.join().unwrap();
    let faults = faults.lock().unwrap();
    let pages: Vec<u64> = faults
        .iter()
        .map(|f| (f.address - mem.addr()) / PAGE)
        .collect();
    assert_eq!(
        pages,
        [3, 12, 5, 7],
        "one fault per missing page: {faults:?}"
    );
    assert!(faults[2].write && !faults[0].write);
}

#[test]
fn copy_over_present_pages_fills_only_the_missing_ones() {
    let Some(uffd) = make() else { return };
    let mem = Anon::new(8 * PAGE as usize);
    uffd.register(mem.addr(), mem.len as u64).unwrap();
    // Fill pages 2 and 5 first, then copy the whole range: those two keep their contents.
    uffd.copy(mem.addr() + 2 * PAGE, &[2u8; PAGE as usize])
        .unwrap();
    uffd.zeropage(mem.addr() + 5 * PAGE, PAGE).unwrap();
    uffd.copy(mem.addr(), &vec![9u8; 8 * PAGE as usize])
        .unwrap();
    for p in 0..8 {
        let want = match p {
            2 => 2,
            5 => 0,
            _ => 9,
        };
        assert_eq!(mem.read(p * PAGE as usize + 100), want, "page {p}");
    }
    // Zero pages over a range whose pages all exist: nothing to do, no error.
    uffd.zeropage(mem.addr(), 8 * PAGE).unwrap();
    assert_eq!(mem.read(0), 9);
}

#[test]
fn bad_ranges_are_refused() {
    let Some(uffd) = make() else { return };
    let mem = Anon::new(4 * PAGE as usize);
    assert!(matches!(
        uffd.register(mem.addr() + 1, PAGE),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        uffd.copy(mem.addr(), &[0u8; 100]),
        Err(Error::Unaligned { .. })
    ));
    // Memory that is not registered cannot be filled.
    assert!(uffd.copy(mem.addr(), &[0u8; PAGE as usize]).is_err());
    // Nothing mapped there.
    assert!(uffd.register(PAGE, PAGE).is_err());
}

#[test]
fn closing_the_descriptor_lets_waiting_faults_go_on_as_zero_pages() {
    let Some(uffd) = make() else { return };
    let mem = Arc::new(Anon::new(4 * PAGE as usize));
    uffd.register(mem.addr(), mem.len as u64).unwrap();
    let m = mem.clone();
    let reader = std::thread::spawn(move || m.read(PAGE as usize));
    // Wait for its fault, then close without serving it.
    uffd.wait(None, 5000).unwrap();
    assert!(uffd.next_fault().unwrap().is_some());
    drop(uffd);
    assert_eq!(reader.join().unwrap(), 0);
}
