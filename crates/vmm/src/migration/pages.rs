//! Guest pages over a migration channel.

use crate::memory::GuestMemoryMmap;
use keel_migration::{Channel, Incoming, Message, MAX_RUN_PAGES, PAGE};
use std::io::{Read, Write};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// What sending a set of pages did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    /// Pages sent with their bytes.
    pub data_pages: u64,
    /// Pages sent as zero ranges.
    pub zero_pages: u64,
}

/// Every page of guest RAM, in order.
#[cfg(test)]
pub(crate) fn all_pages(mem: &GuestMemoryMmap) -> impl Iterator<Item = u64> + '_ {
    mem.iter().flat_map(|r| {
        let first = r.start_addr().0 / PAGE as u64;
        first..first + r.len() / PAGE as u64
    })
}

/// Sends guest pages `pages` (page numbers, increasing) of `mem`: consecutive non-zero pages
/// as runs of at most [`MAX_RUN_PAGES`], consecutive zero pages as one range each.
pub(crate) fn send<S: Read + Write>(
    ch: &mut Channel<S>,
    mem: &GuestMemoryMmap,
    pages: impl IntoIterator<Item = u64>,
) -> Result<Sent, String> {
    let mut sent = Sent::default();
    // The run being gathered: its first page and the bytes of its pages (one buffer for the
    // whole call; each page is read straight into it).
    let mut run: Vec<u8> = Vec::with_capacity((MAX_RUN_PAGES + 1) * PAGE);
    let mut run_first = 0u64;
    let mut zeros: Option<(u64, u64)> = None;
    let mut last: Option<u64> = None;
    let e = |e: keel_migration::Error| e.to_string();
    let flush_run = |ch: &mut Channel<S>, run: &mut Vec<u8>, first: u64, sent: &mut Sent| {
        sent.data_pages += (run.len() / PAGE) as u64;
        let r = ch.send_pages(first, run).map_err(e);
        run.clear();
        r
    };
    for p in pages {
        if last.is_some_and(|l| p <= l) {
            return Err(format!(
                "pages out of order: {p:#x} after {:#x}",
                last.unwrap_or(0)
            ));
        }
        // A run ends where this page does not continue it, or when it is full.
        let continues_run = !run.is_empty()
            && run_first + (run.len() / PAGE) as u64 == p
            && run.len() < MAX_RUN_PAGES * PAGE;
        if !run.is_empty() && !continues_run {
            flush_run(ch, &mut run, run_first, &mut sent)?;
        }
        let at = run.len();
        run.resize(at + PAGE, 0);
        let page = run.get_mut(at..).unwrap_or_default();
        mem.read_slice(page, GuestAddress(p * PAGE as u64))
            .map_err(|err| format!("guest page {p:#x}: {err}"))?;
        let zero = keel_snapshot::is_zero_page(page);
        if zero {
            run.truncate(at);
            if !run.is_empty() {
                flush_run(ch, &mut run, run_first, &mut sent)?;
            }
        }
        match zeros {
            Some((first, n)) if !zero || first + n != p => {
                sent.zero_pages += n;
                ch.send(&Message::Zeros {
                    first_page: first,
                    count: n,
                })
                .map_err(e)?;
                zeros = None;
            }
            _ => {}
        }
        if zero {
            zeros = Some(match zeros {
                Some((first, n)) => (first, n + 1),
                None => (p, 1),
            });
        } else if at == 0 {
            run_first = p;
        }
        last = Some(p);
    }
    if !run.is_empty() {
        flush_run(ch, &mut run, run_first, &mut sent)?;
    }
    if let Some((first, n)) = zeros {
        sent.zero_pages += n;
        ch.send(&Message::Zeros {
            first_page: first,
            count: n,
        })
        .map_err(e)?;
    }
    Ok(sent)
}

/// Writes arriving pages into the destination's guest memory. Every page must lie inside
/// guest RAM (untrusted input); anything else is an error and nothing of the message is
/// written.
///
/// Memory that was never touched is filled through userfaultfd where the host allows it:
/// `UFFDIO_COPY` places a page with its bytes, where a plain write would first fault in a
/// zeroed page and then overwrite it (measured: page clearing was most of the receiver's
/// time). Pages already there (sent again by a later round) are overwritten as usual. While
/// a `Filler` lives no one else may touch guest memory (a missing page would wait on it);
/// dropping it unregisters the memory.
pub(crate) struct Filler {
    mem: GuestMemoryMmap,
    uffd: Option<std::sync::Arc<keel_uffd::Uffd>>,
}

impl Filler {
    pub(crate) fn new(mem: &GuestMemoryMmap) -> Filler {
        let uffd = (|| -> Result<keel_uffd::Uffd, String> {
            let uffd = keel_uffd::Uffd::new().map_err(|e| e.to_string())?;
            for r in mem.iter() {
                let host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_err(|e| e.to_string())?;
                uffd.register(host as u64, r.len())
                    .map_err(|e| e.to_string())?;
            }
            Ok(uffd)
        })();
        let uffd = match uffd {
            Ok(u) => Some(std::sync::Arc::new(u)),
            Err(e) => {
                tracing::debug!("migration: pages are written plainly (userfaultfd: {e})");
                None
            }
        };
        Filler {
            mem: mem.clone(),
            uffd,
        }
    }

    /// The userfaultfd guest memory is registered with, if the host gave one.
    pub(crate) fn uffd(&self) -> Option<&std::sync::Arc<keel_uffd::Uffd>> {
        self.uffd.as_ref()
    }

    pub(crate) fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether pages `first..first+count` all lie inside one guest RAM region.
    fn inside(&self, first: u64, count: u64) -> Result<(), String> {
        let start = first
            .checked_mul(PAGE as u64)
            .ok_or_else(|| format!("page {first:#x} is outside guest RAM"))?;
        let len = count
            .checked_mul(PAGE as u64)
            .ok_or_else(|| format!("{count} pages are more than guest RAM"))?;
        // One region must hold the whole range (RAM ranges are separated by holes).
        let fits = self.mem.iter().any(|r| {
            let a = r.start_addr().0;
            start >= a && start.checked_add(len).is_some_and(|e| e <= a + r.len())
        });
        if !fits {
            return Err(format!(
                "pages {first:#x}+{count} are not all inside one guest RAM range"
            ));
        }
        Ok(())
    }

    /// Applies a `Pages` or `Zeros` message; returns the pages it covered.
    pub(crate) fn apply(&self, m: &Incoming<'_>) -> Result<u64, String> {
        match m {
            Incoming::Pages { first_page, data } => self.pages(*first_page, data),
            Incoming::Other(Message::Zeros { first_page, count }) => {
                self.zeros(*first_page, *count)
            }
            Incoming::Other(other) => Err(format!("expected guest pages, got {other:?}")),
        }
    }

    fn pages(&self, first_page: u64, data: &[u8]) -> Result<u64, String> {
        let count = (data.len() / PAGE) as u64;
        self.inside(first_page, count)?;
        let at = GuestAddress(first_page * PAGE as u64);
        let what = |e: &dyn std::fmt::Display| format!("pages {first_page:#x}+{count}: {e}");
        if let Some(uffd) = &self.uffd {
            let host = self.mem.get_host_address(at).map_err(|e| what(&e))?;
            let copied = uffd.copy(host as u64, data).map_err(|e| what(&e))?;
            if copied == data.len() as u64 {
                return Ok(count);
            }
            // Some were there already: every page is now, so a plain write cannot fault.
        }
        self.mem.write_slice(data, at).map_err(|e| what(&e))?;
        Ok(count)
    }

    fn zeros(&self, first_page: u64, count: u64) -> Result<u64, String> {
        self.inside(first_page, count)?;
        let at = GuestAddress(first_page * PAGE as u64);
        let host = self
            .mem
            .get_host_address(at)
            .map_err(|e| format!("pages {first_page:#x}+{count}: {e}"))?;
        // Private anonymous memory given back reads as zeros (or, registered, is missing
        // again and filled on its next copy), and a range never written costs nothing (the
        // balloon releases pages the same way).
        // SAFETY: `inside` checked that the whole range lies in one guest RAM region, a
        // private anonymous mapping this VMM owns; nothing holds references into it.
        let r = unsafe { libc::madvise(host.cast(), (count as usize) * PAGE, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(format!(
                "zeroing pages {first_page:#x}+{count}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(count)
    }
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
