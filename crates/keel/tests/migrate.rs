//! Live migration between two Keel processes on this machine: a kit guest that ticks ten
//! times a second is pre-copied while it runs and goes on ticking on the destination right
//! after its last tick on the source; one writing its disk moves on shared storage; no
//! receiver, one without the key, one that does not name the VM's disk, and one dying at any
//! phase leave the source VM running; a corrupt stream ends the receiver with a clear error.
//! Reported ignored, loudly, without a usable /dev/kvm.

#[allow(dead_code)]
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::kit::{keel, migrate, port, src_end, wait_socket, Vm};

/// Line 1 (kit part): the guest goes on where it was, on the other side.
fn ticks_go_on_on_the_destination() -> Result<(), Failed> {
    let dir = support::Scratch::new("migrate")?;
    let key = dir.path("key");
    std::fs::write(&key, b"a migration key for this test only").map_err(|e| e.to_string())?;
    let (src_api, dst_api) = (dir.path("src.sock"), dir.path("dst.sock"));
    let port = port();
    let dst = Vm::receiver(port, &key, &dst_api)?;
    let src = Vm::source(&src_api)?;
    wait_socket(&src_api)?;
    src.ticks_to(5, Duration::from_secs(20))?;
    let o = migrate(&src_api, port, &key)?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() || !said.contains("migrated to") {
        return Err(format!("keel migrate: {:?}: {said}", o.status).into());
    }
    // No virtio device: pre-copy ran (its full round while the guest ticked, then the rest
    // paused).
    let rounds: u32 = said
        .split(" round(s)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no round count in: {said}"))?;
    if rounds < 2 {
        return Err(format!("no pre-copy round: {said}").into());
    }
    let (src_status, src_err) = src_end(src)?;
    if src_status.0 != Some(0) || !src_err.contains("the VM runs on the destination") {
        return Err(format!("source: {:?}\n{src_err}", src_status.0).into());
    }
    let last = src_status.1;
    let on_dst = dst.ticks_to(last + 10, Duration::from_secs(10))?;
    if on_dst.first() != Some(&(last + 1)) || on_dst.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!("source ended at tick {last}; destination ticked {on_dst:?}").into());
    }
    let (code, err) = dst.stop()?;
    if code != Some(143) || err.contains("panicked") {
        return Err(format!("destination: {code:?}\n{err}").into());
    }
    eprintln!(
        "{}; source's last tick {last}, destination's first {}",
        said.trim(),
        last + 1
    );
    Ok(())
}

/// A guest that writes a sector of `disk` every tick and reads back the one before (kit
/// `snapcount`), with an rng device too, and an API socket.
fn disk_guest(disk: &Path, api: &Path) -> Command {
    let mut cmd = keel();
    cmd.args([
        "run",
        "--kernel",
        &KitImage::PvhElf.path().display().to_string(),
    ])
    .args(["--cmdline", "test=snapcount secs=0", "--memory", "64M"])
    .args(["--disk", &format!("path={}", disk.display()), "--rng"])
    .args([
        "--shutdown-timeout",
        "0",
        "--api-socket",
        &api.display().to_string(),
    ]);
    cmd
}

/// Line 1 (disk part, on one host's shared storage): a guest writing its disk every tick is
/// pre-copied with its devices running (their writes to guest memory are tracked), hands
/// the disk over and goes on on the destination with the next count, reading back there
/// the sector it wrote last on the source.
fn a_vm_with_a_disk_moves_on_shared_storage() -> Result<(), Failed> {
    let dir = support::Scratch::new("migrate-disk")?;
    let key = dir.path("key");
    std::fs::write(&key, b"a migration key for the disk test").map_err(|e| e.to_string())?;
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let (src_api, dst_api) = (dir.path("src.sock"), dir.path("dst.sock"));
    let port = port();
    let disk_arg = format!("path={}", disk.display());
    let dst = Vm::receiver_with(port, &key, &dst_api, &["--disk", &disk_arg])?;
    let src = Vm::spawn(&mut disk_guest(&disk, &src_api))?;
    wait_socket(&src_api)?;
    src.ticks_to(5, Duration::from_secs(20))?;
    let o = migrate(&src_api, port, &key)?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() || !said.contains("migrated to") {
        return Err(format!("keel migrate: {:?}: {said}", o.status).into());
    }
    let (src_status, src_err) = src_end(src)?;
    if src_status.0 != Some(0) {
        return Err(format!("source: {:?}\n{src_err}", src_status.0).into());
    }
    let last = src_status.1;
    let on_dst = dst.ticks_to(last + 10, Duration::from_secs(10))?;
    if on_dst.first() != Some(&(last + 1)) || on_dst.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!("source ended at count {last}; destination counted {on_dst:?}").into());
    }
    let (code, err) = dst.stop()?;
    if code != Some(143) || err.contains("panicked") || err.contains("KIT-FAIL") {
        return Err(format!("destination: {code:?}\n{err}").into());
    }
    eprintln!("{}; source's last count {last}", said.trim());
    Ok(())
}

/// Line 3 (first cases): a receiver without the key refuses the stream, none at all refuses
/// the connection; either way the source goes on.
fn a_failed_migration_leaves_the_source_running() -> Result<(), Failed> {
    let dir = support::Scratch::new("migrate-bad")?;
    let key = dir.path("key");
    let other = dir.path("other-key");
    std::fs::write(&key, b"the key the source holds, 32 bytes").map_err(|e| e.to_string())?;
    std::fs::write(&other, b"not the key the source holds, no").map_err(|e| e.to_string())?;
    let src_api = dir.path("src.sock");
    let src = Vm::source(&src_api)?;
    wait_socket(&src_api)?;
    src.ticks_to(3, Duration::from_secs(20))?;
    // Nobody listening.
    let port = port();
    let o = migrate(&src_api, port, &key)?;
    let said = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(1) || !said.contains("cannot reach") {
        return Err(format!("no receiver: {:?}: {said}", o.status).into());
    }
    // A receiver with another key.
    let dst = Vm::receiver(port, &other, &dir.path("dst.sock"))?;
    std::thread::sleep(Duration::from_millis(300));
    let o = migrate(&src_api, port, &key)?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    if o.status.code() != Some(1)
        || !said.contains("authentication failed")
        || !said.contains("goes on here")
    {
        return Err(format!("wrong key, sender: {:?}: {said}", o.status).into());
    }
    let mut dst = dst;
    let (code, err) = dst.end(Duration::from_secs(10))?;
    if code != Some(2) || !err.contains("authentication failed") {
        return Err(format!("wrong key, receiver: {code:?}\n{err}").into());
    }
    // The source still ticks.
    let seen = src.ticks_to(0, Duration::from_secs(5))?;
    let now = seen.last().copied().unwrap_or(0);
    src.ticks_to(now + 5, Duration::from_secs(10))?;
    let (code, err) = src.stop()?;
    if code != Some(143) || err.contains("panicked") {
        return Err(format!("source: {code:?}\n{err}").into());
    }
    // A VM with a disk the receiver does not name is refused before anything moves; it
    // ticks on.
    let disk = dir.path("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let api2 = dir.path("src2.sock");
    let src2 = Vm::spawn(&mut disk_guest(&disk, &api2))?;
    wait_socket(&api2)?;
    src2.ticks_to(2, Duration::from_secs(20))?;
    let port2 = self::port();
    let mut dst2 = Vm::receiver(port2, &key, &dir.path("dst2.sock"))?;
    std::thread::sleep(Duration::from_millis(300));
    let o = migrate(&api2, port2, &key)?;
    let refused = String::from_utf8_lossy(&o.stderr).into_owned();
    if o.status.code() != Some(1)
        || !refused.contains("this side names 0")
        || !refused.contains("goes on here")
    {
        return Err(format!("VM with a disk: {:?}: {refused}", o.status).into());
    }
    let (code, _) = dst2.end(Duration::from_secs(10))?;
    if code != Some(2) {
        return Err(format!("the receiver of a refused VM: {code:?}").into());
    }
    let now = src2.last.get().unwrap_or(2);
    src2.ticks_to(now + 3, Duration::from_secs(10))?;
    let (code, err) = src2.stop()?;
    if code != Some(143) || err.contains("panicked") {
        return Err(format!("source with a disk: {code:?}\n{err}").into());
    }
    eprintln!("no receiver: refused; wrong key: {}", said.trim());
    Ok(())
}

/// A connection that corrupts what it sends: flips the byte at offset `flip`, or sends
/// nothing past offset `cut` (pretending it did).
struct Tamper {
    inner: std::net::TcpStream,
    written: u64,
    flip: Option<u64>,
    cut: Option<u64>,
}

impl Read for Tamper {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Tamper {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let start = self.written;
        self.written += buf.len() as u64;
        let mut out = buf.to_vec();
        if let Some(at) = self.flip.filter(|at| (start..self.written).contains(at)) {
            out[(at - start) as usize] ^= 0x01;
        }
        if let Some(cut) = self.cut {
            out.truncate(cut.saturating_sub(start) as usize);
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Line 4: a receiver given a stream from a peer without the key, one with a byte flipped
/// on the way, and one cut short in the middle of a frame ends each time with exit status 2
/// and an error that says which.
fn a_corrupt_stream_ends_the_receiver_with_a_clear_error() -> Result<(), Failed> {
    use keel_migration::{Channel, Message, Role};
    let dir = support::Scratch::new("migrate-corrupt")?;
    let key = dir.path("key");
    let key_bytes = b"the key the receiver holds, 32 B".to_vec();
    std::fs::write(&key, &key_bytes).map_err(|e| e.to_string())?;
    // The greeting (48 bytes) and the transcript frame (4 + 32 + 16) come first.
    const AFTER_HANDSHAKE: u64 = 100;
    // (what, the sender's key, byte to flip, where to cut, what the receiver says)
    type Case<'a> = (&'a str, &'a [u8], Option<u64>, Option<u64>, &'a str);
    let cases: [Case; 3] = [
        (
            "unauthenticated",
            b"a key that is not the receiver's",
            None,
            None,
            "authentication failed",
        ),
        (
            "flipped byte",
            &key_bytes,
            Some(AFTER_HANDSHAKE + 30),
            None,
            "authentication failed",
        ),
        (
            "truncated",
            &key_bytes,
            None,
            Some(AFTER_HANDSHAKE + 20),
            "in the middle of a frame",
        ),
    ];
    let mut report = Vec::new();
    for (what, sender_key, flip, cut, want) in cases {
        let port = port();
        let mut rx = Vm::receiver(port, &key, &dir.path(&format!("{port}.sock")))?;
        let t = Instant::now();
        let stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("{what}: connect: {e}").into()),
            }
        };
        let wire = Tamper {
            inner: stream,
            written: 0,
            flip,
            cut,
        };
        if let Ok(mut ch) = Channel::handshake(wire, Role::Sender, sender_key) {
            let _ = ch.send(&Message::Config(vec![b'{'; 200]));
            let _ = ch.flush();
            // Hang up (the cut stream ends here, mid-frame).
        }
        let (code, err) = rx.end(Duration::from_secs(10))?;
        if code != Some(2) || !err.contains(want) || err.contains("panicked") {
            return Err(format!("{what}: receiver {code:?}, wanted {want:?}:\n{err}").into());
        }
        let line = err
            .lines()
            .rev()
            .find(|l| l.contains(want))
            .unwrap_or_default();
        report.push(format!("{what}: {}", line.trim()));
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}

/// A receiver played by the test: takes one connection on `port` and drops it at `phase`.
fn dying_receiver(port: u16, key: Vec<u8>, phase: &'static str) -> std::thread::JoinHandle<String> {
    use keel_migration::{Channel, Message, Role};
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return "no connection".into();
        };
        if phase == "greeting" {
            return "dropped before the greeting".into();
        }
        let Ok(mut ch) = Channel::handshake(stream, Role::Receiver, &key) else {
            return "handshake failed".into();
        };
        let mut seen = Vec::new();
        loop {
            let m = match ch.recv() {
                Ok(m) => m,
                Err(e) => return format!("{phase}: {e} after {seen:?}"),
            };
            let kind = match &m {
                Message::Config(_) => "config",
                Message::Pages { .. } => "pages",
                Message::Zeros { .. } => "zeros",
                Message::RoundEnd { .. } => "round end",
                Message::State(_) => "state",
                _ => "other",
            };
            if seen.last() != Some(&kind) {
                seen.push(kind);
            }
            if let Message::RoundEnd { .. } = &m {
                if phase != "mid rounds" && ch.send(&m).and_then(|()| ch.flush()).is_err() {
                    return "could not echo a round".into();
                }
            }
            if kind == "config" && phase != "handshake" {
                // It can take the machine (what a real receiver says first).
                if ch.send(&Message::Ready).and_then(|()| ch.flush()).is_err() {
                    return "could not accept the offer".into();
                }
            }
            let stop = match phase {
                "handshake" => true,
                "first round" => kind == "pages",
                "mid rounds" => kind == "round end",
                // The paused copy is done: the state is here; no `Ready`.
                "stop-and-copy" => kind == "state",
                _ => false,
            };
            if stop {
                return format!("dropped at {phase} after {seen:?}");
            }
        }
    })
}

/// Line 3: the receiver dies at `phase` (greeting, handshake, first round, mid-rounds,
/// stop-and-copy: before it was told to run the VM); the source's guest goes on ticking.
fn a_receiver_dying_leaves_the_source_running(phase: &'static str) -> Result<(), Failed> {
    let dir = support::Scratch::new(&format!("migrate-die-{}", phase.replace(' ', "-")))?;
    let key = dir.path("key");
    let key_bytes = b"the key both ends hold in this test".to_vec();
    std::fs::write(&key, &key_bytes).map_err(|e| e.to_string())?;
    let src_api = dir.path("src.sock");
    let src = Vm::source(&src_api)?;
    wait_socket(&src_api)?;
    src.ticks_to(3, Duration::from_secs(20))?;
    let port = port();
    let rx = dying_receiver(port, key_bytes, phase);
    let o = migrate(&src_api, port, &key)?;
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    let what = rx.join().unwrap_or_default();
    if o.status.code() != Some(1) || !said.contains("goes on here") {
        return Err(format!("{phase} ({what}): {:?}: {said}", o.status).into());
    }
    let now = src.last.get().unwrap_or(0);
    let more = src.ticks_to(now + 3, Duration::from_secs(10))?;
    let (code, err) = src.stop()?;
    if code != Some(143) || err.contains("panicked") {
        return Err(format!("source: {code:?}\n{err}").into());
    }
    eprintln!("{what}: source ticked on to {:?}", more.last());
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One at a time: two tests time the guest's own pause, which a neighbour's migration
    // on the same two CPUs would stretch.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let trials = vec![
        Trial::test(
            "ticks_go_on_on_the_destination",
            ticks_go_on_on_the_destination,
        ),
        Trial::test(
            "a_vm_with_a_disk_moves_on_shared_storage",
            a_vm_with_a_disk_moves_on_shared_storage,
        ),
        Trial::test(
            "a_failed_migration_leaves_the_source_running",
            a_failed_migration_leaves_the_source_running,
        ),
        Trial::test(
            "a_corrupt_stream_ends_the_receiver_with_a_clear_error",
            a_corrupt_stream_ends_the_receiver_with_a_clear_error,
        ),
    ];
    let mut trials = trials;
    for phase in [
        "greeting",
        "handshake",
        "first round",
        "mid rounds",
        "stop-and-copy",
    ] {
        trials.push(Trial::test(
            format!(
                "a_receiver_dying_at_{}_leaves_the_source_running",
                phase.replace([' ', '-'], "_")
            ),
            move || a_receiver_dying_leaves_the_source_running(phase),
        ));
    }
    let host = support::Host::probe();
    let trials = support::skip_all(trials, "migration tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}
