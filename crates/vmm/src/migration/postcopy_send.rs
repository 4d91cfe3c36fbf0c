//! Post-copy, the source's side: with the guest paused here for good, every page the
//! destination still lacks goes, in order, while the pages it asks for (`Want`: something
//! there waits on them) jump the queue; its `Ready` is answered with the commit (`Go`). One
//! thread: between runs it looks whether the destination said anything.

use super::pages::Sent;
use crate::memory::GuestMemoryMmap;
use keel_migration::{Channel, Message, MAX_RUN_PAGES, PAGE};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// How long the source waits for the destination once it has nothing left to send.
const QUIET: Duration = Duration::from_secs(30);

/// Whether the connection has something to read within `timeout_ms`.
fn readable(ch: &Channel<TcpStream>, timeout_ms: i32) -> Result<bool, String> {
    let mut p = libc::pollfd {
        fd: ch.get_ref().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one initialised pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(format!("poll: {e}"));
    }
    Ok(p.revents != 0)
}

/// Sends every page of `missing` (sorted), answering the destination as it goes: `Ready`
/// with `Go` (setting `committed`), `Want` with that page at once. Returns the pages sent and
/// when the destination said the VM runs there.
pub(crate) fn serve(
    ch: &mut Channel<TcpStream>,
    mem: &GuestMemoryMmap,
    missing: &[u64],
    committed: &mut bool,
) -> Result<(Sent, Option<Instant>), String> {
    let e = |e: keel_migration::Error| e.to_string();
    let mut sent_flags = vec![false; missing.len()];
    let mut left = missing.len();
    let mut cursor = 0usize;
    let mut sent = Sent::default();
    let mut resumed = None;
    let mut complete = false;
    let mut buf = vec![0u8; MAX_RUN_PAGES * PAGE];
    let mut wanted = 0u64;
    let started = Instant::now();
    loop {
        // What the destination said first: a vCPU there may be waiting.
        while readable(ch, 0)? {
            match ch.recv().map_err(e)? {
                Message::Want { page } => {
                    wanted += 1;
                    if let Ok(i) = missing.binary_search(&page) {
                        if !sent_flags[i] {
                            let one = buf.get_mut(..PAGE).unwrap_or_default();
                            read(mem, page, one)?;
                            ch.send_pages(page, one).map_err(e)?;
                            sent_flags[i] = true;
                            left -= 1;
                            sent.data_pages += 1;
                        }
                    }
                }
                Message::Ready if !*committed => {
                    // The commit: from here on this VM never runs here again.
                    ch.send(&Message::Go).and_then(|()| ch.flush()).map_err(e)?;
                    *committed = true;
                }
                Message::Resumed if *committed => resumed = Some(Instant::now()),
                Message::Abort(why) => return Err(format!("the destination gave up: {why}")),
                other => return Err(format!("the destination answered {other:?}")),
            }
        }
        if left > 0 {
            // The next run of consecutive pages not sent yet.
            while sent_flags.get(cursor) == Some(&true) {
                cursor += 1;
            }
            let Some(&first) = missing.get(cursor) else {
                return Err("post-copy lost count of the pages it sent".into());
            };
            let mut n = 0usize;
            while n < MAX_RUN_PAGES
                && sent_flags.get(cursor + n) == Some(&false)
                && missing.get(cursor + n) == Some(&(first + n as u64))
            {
                n += 1;
            }
            let run = buf.get_mut(..n * PAGE).unwrap_or_default();
            read(mem, first, run)?;
            ch.send_pages(first, run).map_err(e)?;
            for f in sent_flags.iter_mut().skip(cursor).take(n) {
                *f = true;
            }
            left -= n;
            sent.data_pages += n as u64;
            continue;
        }
        if !complete {
            ch.send(&Message::Complete)
                .and_then(|()| ch.flush())
                .map_err(e)?;
            complete = true;
            tracing::info!(
                "post-copy: {} pages sent in {:.1} ms ({wanted} asked for)",
                missing.len(),
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
        if resumed.is_some() {
            return Ok((sent, resumed));
        }
        if !readable(ch, QUIET.as_millis() as i32)? {
            return Err(format!(
                "the destination said nothing for {QUIET:?} (no {})",
                if *committed { "Resumed" } else { "Ready" }
            ));
        }
    }
}

fn read(mem: &GuestMemoryMmap, first: u64, buf: &mut [u8]) -> Result<(), String> {
    mem.read_slice(buf, GuestAddress(first * PAGE as u64))
        .map_err(|err| format!("guest page {first:#x}: {err}"))
}
