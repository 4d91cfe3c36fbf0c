//! Guest pages over a migration channel.

use keel_migration::{Channel, Message, MAX_RUN_PAGES, PAGE};
use std::io::{Read, Write};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    let mut run: Vec<u8> = Vec::with_capacity(MAX_RUN_PAGES * PAGE);
    let mut run_first = 0u64;
    let mut zeros: Option<(u64, u64)> = None;
    let mut page = vec![0u8; PAGE];
    let mut last: Option<u64> = None;
    let e = |e: keel_migration::Error| e.to_string();
    for p in pages {
        if last.is_some_and(|l| p <= l) {
            return Err(format!(
                "pages out of order: {p:#x} after {:#x}",
                last.unwrap_or(0)
            ));
        }
        mem.read_slice(&mut page, GuestAddress(p * PAGE as u64))
            .map_err(|err| format!("guest page {p:#x}: {err}"))?;
        let zero = keel_snapshot::is_zero_page(&page);
        // A run ends where the next page does not continue it.
        let continues_run = !run.is_empty() && run_first + (run.len() / PAGE) as u64 == p;
        if !run.is_empty() && (zero || !continues_run || run.len() == MAX_RUN_PAGES * PAGE) {
            sent.data_pages += (run.len() / PAGE) as u64;
            ch.send(&Message::Pages {
                first_page: run_first,
                data: std::mem::take(&mut run),
            })
            .map_err(e)?;
            run.reserve(MAX_RUN_PAGES * PAGE);
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
        } else {
            if run.is_empty() {
                run_first = p;
            }
            run.extend_from_slice(&page);
        }
        last = Some(p);
    }
    if !run.is_empty() {
        sent.data_pages += (run.len() / PAGE) as u64;
        ch.send(&Message::Pages {
            first_page: run_first,
            data: run,
        })
        .map_err(e)?;
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

/// Applies a `Pages` or `Zeros` message to the destination's guest memory. Every page must
/// lie inside guest RAM (untrusted input); anything else is an error and nothing of the
/// message is written. Returns the pages it covered.
pub(crate) fn apply(mem: &GuestMemoryMmap, m: &Message) -> Result<u64, String> {
    let inside = |first: u64, count: u64| -> Result<(), String> {
        let start = first
            .checked_mul(PAGE as u64)
            .ok_or_else(|| format!("page {first:#x} is outside guest RAM"))?;
        let len = count
            .checked_mul(PAGE as u64)
            .ok_or_else(|| format!("{count} pages are more than guest RAM"))?;
        // One region must hold the whole range (RAM ranges are separated by holes).
        let fits = mem.iter().any(|r| {
            let a = r.start_addr().0;
            start >= a && start.checked_add(len).is_some_and(|e| e <= a + r.len())
        });
        if !fits {
            return Err(format!(
                "pages {first:#x}+{count} are not all inside one guest RAM range"
            ));
        }
        Ok(())
    };
    match m {
        Message::Pages { first_page, data } => {
            let count = (data.len() / PAGE) as u64;
            inside(*first_page, count)?;
            mem.write_slice(data, GuestAddress(first_page * PAGE as u64))
                .map_err(|e| format!("pages {first_page:#x}+{count}: {e}"))?;
            Ok(count)
        }
        Message::Zeros { first_page, count } => {
            inside(*first_page, *count)?;
            let at = GuestAddress(first_page * PAGE as u64);
            let host = mem
                .get_host_address(at)
                .map_err(|e| format!("pages {first_page:#x}+{count}: {e}"))?;
            // Private anonymous memory given back reads as zeros, and a range never written
            // costs nothing (the balloon releases pages the same way).
            // SAFETY: `inside` checked that the whole range lies in one guest RAM region, a
            // private anonymous mapping this VMM owns; nothing holds references into it.
            let r = unsafe {
                libc::madvise(host.cast(), (*count as usize) * PAGE, libc::MADV_DONTNEED)
            };
            if r != 0 {
                return Err(format!(
                    "zeroing pages {first_page:#x}+{count}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(*count)
        }
        other => Err(format!("expected guest pages, got {other:?}")),
    }
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
