//! Tap tests against the real kernel. Those that need `/dev/net/tun` and CAP_NET_ADMIN print
//! "skipped: <test>: <reason>" to stderr (past the harness's capture) and return where this
//! process cannot create a tap. Each test uses its own tap; the ones with addresses use their
//! own subnet in 198.18.0.0/15 (reserved for benchmarking), so they run in parallel.

use super::*;
use crate::MacAddr;
use std::ffi::CString;
use std::fmt::Display;
use std::io::Write as _;
use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

/// Says that a test did not run, on stderr directly so the harness's capture cannot hide it.
fn skip(test: &str, reason: &dyn Display) {
    let _ = writeln!(io::stderr(), "skipped: {test}: {reason}");
}

/// A new anonymous tap, or `None` (said loudly) where this process cannot create one.
fn tap_or_skip(test: &str) -> Option<Tap> {
    match Tap::open(None) {
        Ok(tap) => Some(tap),
        Err(e) if cannot_create_taps(&e) => {
            skip(test, &e);
            None
        }
        Err(e) => panic!("opening an anonymous tap: {e}"),
    }
}

fn cannot_create_taps(e: &Error) -> bool {
    match e {
        Error::OpenTun { .. } => true,
        Error::OpenTap { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        }
        _ => false,
    }
}

fn sys_path(name: &str) -> std::path::PathBuf {
    Path::new("/sys/class/net").join(name)
}

/// A hex attribute of /sys/class/net/NAME ("0x1003").
fn sys_hex(name: &str, attr: &str) -> u32 {
    let path = sys_path(name).join(attr);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
}

/// Waits up to 2 s for an interface to vanish (removal is done by the time close(2) returns;
/// the wait only makes a slow host no reason to fail).
fn gone_soon(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while sys_path(name).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(
        index,
        0,
        "if_nametoindex({name}): {}",
        io::Error::last_os_error()
    );
    index
}

/// A name no other test (or earlier run) uses: `prefix`, this process's id, `suffix`.
fn unique_name(prefix: &str) -> String {
    let name = format!("{prefix}{}", std::process::id());
    assert!(name.len() <= MAX_NAME_LEN);
    name
}

/// A minimal Ethernet frame (60 bytes, no FCS) to broadcast with the IEEE local experimental
/// EtherType 0x88b5 and `marker` as its payload, so a test can pick it out of other traffic.
fn test_frame(marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(MacAddr::random_local().unwrap().octets());
    f.extend(0x88b5u16.to_be_bytes());
    f.extend(marker);
    f.resize(60, 0);
    f
}

/// Reads frames from a non-blocking tap until `want` accepts one (header and frame), for up
/// to 5 s; `idle` runs once a second while nothing arrives (to resend, say).
fn read_until(tap: &Tap, mut want: impl FnMut(&[u8]) -> bool, mut idle: impl FnMut()) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; VNET_HDR_LEN + 65536];
    loop {
        assert!(Instant::now() < deadline, "no matching frame within 5 s");
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, exclusively borrowed for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1000) };
        assert!(ready >= 0, "poll: {}", io::Error::last_os_error());
        if ready == 0 {
            idle();
            continue;
        }
        let n = tap.read(&mut buf).unwrap();
        if want(&buf[..n]) {
            return buf[..n].to_vec();
        }
    }
}

/// An AF_PACKET socket bound to one interface: sees every frame it receives or sends, and
/// sends raw frames out of it.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(ifindex: u32) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                c_int::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh fd from socket(2) that nothing else owns.
        let sock = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: all-zero is a valid sockaddr_ll (integers and a byte array).
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as c_int;
        // SAFETY: `sll` is a valid sockaddr_ll and its exact size is passed.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, whose exact size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        sock
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: the kernel reads at most `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// One frame, or `None` after the 200 ms receive timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Some(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
            _ => panic!("recv AF_PACKET: {e}"),
        }
    }
}

/// Makes (`on`) or removes (`!on`) a persistent tap the way `ip tuntap add/del` does.
fn set_persistent(name: &str, on: bool) -> io::Result<()> {
    let fd: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)?
        .into();
    let mut req = IfReq::new(name);
    req.data.flags = sys::IFF_TAP | sys::IFF_NO_PI;
    // SAFETY: TUNSETIFF reads and writes one struct ifreq; `req` is one.
    unsafe { sys::ioctl_ptr(fd.as_fd(), sys::TUNSETIFF, &mut req) }?;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    unsafe { sys::ioctl_val(fd.as_fd(), sys::TUNSETPERSIST, on as c_ulong) }?;
    Ok(())
}

/// Removes a persistent tap when dropped, so a failing test leaves nothing behind.
struct PersistentTap(String);

impl Drop for PersistentTap {
    fn drop(&mut self) {
        if let Err(e) = set_persistent(&self.0, false) {
            eprintln!("removing persistent tap {}: {e}", self.0);
        }
    }
}

#[test]
fn anonymous_tap_is_created_listed_and_removed_on_drop() {
    let Some(tap) = tap_or_skip("anonymous_tap_is_created_listed_and_removed_on_drop") else {
        return;
    };
    let name = tap.name().to_string();
    assert!(name.starts_with("keel"), "{name}");
    assert!(name[4..].parse::<u32>().is_ok(), "{name}");
    assert!(tap.created_by_keel());
    assert!(sys_path(&name).exists());
    let flags = sys_hex(&name, "tun_flags");
    for f in [sys::IFF_TAP, sys::IFF_NO_PI, sys::IFF_VNET_HDR] {
        assert_ne!(flags & f as u32, 0, "tun_flags {flags:#x} lacks {f:#x}");
    }
    assert_eq!(flags & sys::IFF_PERSIST as u32, 0, "tun_flags {flags:#x}");

    let other = Tap::open(None).unwrap();
    assert_ne!(other.name(), name);
    drop(other);

    drop(tap);
    assert!(
        gone_soon(&name),
        "{name} is still in /sys/class/net after drop"
    );
}

#[test]
fn bring_up_and_ipv4_address() {
    let Some(tap) = tap_or_skip("bring_up_and_ipv4_address") else {
        return;
    };
    let name = tap.name();
    assert_eq!(sys_hex(name, "flags") & sys::IFF_UP as u32, 0);
    tap.bring_up().unwrap();
    assert_ne!(sys_hex(name, "flags") & sys::IFF_UP as u32, 0);
    tap.bring_up().unwrap();

    assert_eq!(tap.ipv4().unwrap(), None);
    let addr = Ipv4Addr::new(198, 18, 201, 1);
    tap.set_ipv4(addr, 24).unwrap();
    assert_eq!(tap.ipv4().unwrap(), Some((addr, 24)));
    tap.set_ipv4(addr, 30).unwrap();
    assert_eq!(tap.ipv4().unwrap(), Some((addr, 30)));
    let moved = Ipv4Addr::new(198, 18, 201, 5);
    tap.set_ipv4(moved, 29).unwrap();
    assert_eq!(tap.ipv4().unwrap(), Some((moved, 29)));

    assert!(matches!(tap.set_ipv4(addr, 33), Err(Error::Prefix(33))));
    let e = tap.set_ipv4(Ipv4Addr::new(224, 0, 0, 1), 24).unwrap_err();
    assert!(
        e.to_string().contains(&format!("SIOCSIFADDR on {name}")),
        "{e}"
    );
}

#[test]
fn vnet_header_size() {
    let Some(tap) = tap_or_skip("vnet_header_size") else {
        return;
    };
    assert_eq!(tap.vnet_hdr_size().unwrap(), 10);
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    assert_eq!(tap.vnet_hdr_size().unwrap(), VNET_HDR_LEN);
    assert!(matches!(
        tap.set_vnet_hdr_size(8),
        Err(Error::VnetHdrSize(8))
    ));
    assert!(tap.set_vnet_hdr_size(usize::MAX).is_err());
    assert_eq!(tap.vnet_hdr_size().unwrap(), VNET_HDR_LEN);
}

#[test]
fn offloads_probe_and_set() {
    let Some(tap) = tap_or_skip("offloads_probe_and_set") else {
        return;
    };
    let found = tap.probe_offloads().unwrap();
    eprintln!("{} accepts {found:?}", tap.name());
    // Every kernel since 2.6.27 takes checksum offload and TSO.
    let basic = Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6 | Offloads::TSO_ECN;
    assert!(found.contains(basic), "{found:?}");
    tap.set_offloads(found).unwrap();
    tap.set_offloads(Offloads::CSUM | Offloads::TSO4).unwrap();
    // Probing again finds the same and leaves the last setting in place.
    assert_eq!(tap.probe_offloads().unwrap(), found);
    assert_eq!(tap.offloads.load(Ordering::Relaxed), 0x03);
    tap.set_offloads(Offloads::NONE).unwrap();

    let e = tap.set_offloads(Offloads::TSO4).unwrap_err();
    assert!(e.to_string().contains("refuses this combination"), "{e}");
    let e = tap
        .set_offloads(Offloads::from_bits_retain(0x8000_0000))
        .unwrap_err();
    assert!(e.to_string().contains("TUNSETOFFLOAD on keel"), "{e}");
}

#[test]
fn nonblocking_read_of_an_idle_tap_would_block() {
    let Some(tap) = tap_or_skip("nonblocking_read_of_an_idle_tap_would_block") else {
        return;
    };
    // Down, the tap gets no traffic from the host.
    tap.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let e = tap.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
    // SAFETY: F_GETFL passes no memory.
    let flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    tap.set_nonblocking(false).unwrap();
    // SAFETY: as above.
    let flags = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_NONBLOCK, 0);
}

#[test]
fn frame_written_to_the_tap_reaches_the_host() {
    let Some(tap) = tap_or_skip("frame_written_to_the_tap_reaches_the_host") else {
        return;
    };
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    tap.bring_up().unwrap();
    let sock = PacketSocket::bind(ifindex(tap.name()));
    let frame = test_frame(b"keel-net: guest to host");
    // An all-zero header: no checksum to complete, no segmentation.
    let hdr = [0u8; VNET_HDR_LEN];
    let n = tap
        .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(&frame)])
        .unwrap();
    assert_eq!(n, hdr.len() + frame.len());

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "frame never seen on the host side"
        );
        if let Some(n) = sock.recv(&mut buf) {
            if buf[..n] == frame[..] {
                break;
            }
        }
    }

    // The kernel takes nothing shorter than a header and an Ethernet header.
    let short = [0u8; VNET_HDR_LEN + 5];
    let e = tap.write(&short).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
}

#[test]
fn an_announcement_reaches_the_host_as_the_guest_s_rarp() {
    let Some(tap) = tap_or_skip("an_announcement_reaches_the_host_as_the_guest_s_rarp") else {
        return;
    };
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    tap.bring_up().unwrap();
    let sock = PacketSocket::bind(ifindex(tap.name()));
    let mac: crate::MacAddr = "52:54:00:aa:bb:cc".parse().unwrap();
    tap.announce(mac).unwrap();
    let want = crate::rarp_announcement(mac);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "announcement never seen on the host side"
        );
        if let Some(n) = sock.recv(&mut buf) {
            if buf[..n] == want[..] {
                break;
            }
        }
    }
}

#[test]
fn frame_sent_by_the_host_is_read_from_the_tap() {
    let Some(tap) = tap_or_skip("frame_sent_by_the_host_is_read_from_the_tap") else {
        return;
    };
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    tap.bring_up().unwrap();
    tap.set_nonblocking(true).unwrap();
    let sock = PacketSocket::bind(ifindex(tap.name()));
    let frame = test_frame(b"keel-net: host to guest");
    sock.send(&frame);

    // Read it back split as a device would: header, then the frame into its own buffer.
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut body = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "frame never read from the tap");
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, exclusively borrowed for the call.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let n = tap
            .read_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(&mut body)])
            .unwrap();
        assert!(n >= VNET_HDR_LEN, "read {n} bytes");
        if body[..n - VNET_HDR_LEN] == frame[..] {
            break;
        }
    }
    // A plain frame: no checksum to complete (flags 0), no GSO (gso_type 0).
    assert_eq!(hdr[..2], [0, 0], "header {hdr:02x?}");
}

#[test]
fn host_traffic_to_the_tap_subnet_arps_on_the_tap() {
    let Some(tap) = tap_or_skip("host_traffic_to_the_tap_subnet_arps_on_the_tap") else {
        return;
    };
    let host = Ipv4Addr::new(198, 18, 202, 1);
    let guest = Ipv4Addr::new(198, 18, 202, 2);
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    tap.set_ipv4(host, 24).unwrap();
    tap.bring_up().unwrap();
    tap.set_nonblocking(true).unwrap();

    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    let send = || {
        udp.send_to(b"keel-net", (guest, 9)).unwrap();
    };
    send();
    let is_arp_for_guest = |f: &[u8]| {
        let e = &f[VNET_HDR_LEN.min(f.len())..];
        e.len() >= 42
            && e[12..14] == [0x08, 0x06] // ARP
            && e[20..22] == [0, 1] // request
            && e[28..32] == host.octets() // sender IP
            && e[38..42] == guest.octets() // target IP
    };
    let frame = read_until(&tap, is_arp_for_guest, send);
    assert_eq!(
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6],
        [0xff; 6],
        "broadcast"
    );
}

#[test]
fn named_tap_is_created_and_held_exclusively() {
    if tap_or_skip("named_tap_is_created_and_held_exclusively").is_none() {
        return;
    }
    let name = unique_name("kn");
    assert!(!sys_path(&name).exists(), "{name} exists already");
    let tap = Tap::open(Some(&name)).unwrap();
    assert_eq!(tap.name(), name);
    assert!(tap.created_by_keel());
    assert!(sys_path(&name).exists());

    let e = Tap::open(Some(&name)).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(&e, Error::OpenTap { source, .. } if source.raw_os_error() == Some(libc::EBUSY))
    );
    assert!(text.contains("another process has this tap open"), "{text}");

    drop(tap);
    assert!(
        gone_soon(&name),
        "{name} is still in /sys/class/net after drop"
    );
}

#[test]
fn attaching_to_a_persistent_tap_leaves_it_in_place() {
    if tap_or_skip("attaching_to_a_persistent_tap_leaves_it_in_place").is_none() {
        return;
    }
    let name = unique_name("kp");
    set_persistent(&name, true).unwrap();
    let persistent = PersistentTap(name.clone());
    assert!(sys_path(&name).exists());

    let tap = Tap::open(Some(&name)).unwrap();
    assert_eq!(tap.name(), name);
    assert!(!tap.created_by_keel());
    assert_ne!(sys_hex(&name, "tun_flags") & sys::IFF_VNET_HDR as u32, 0);
    tap.set_vnet_hdr_size(VNET_HDR_LEN).unwrap();
    drop(tap);
    std::thread::sleep(Duration::from_millis(50));
    assert!(sys_path(&name).exists(), "persistent {name} vanished");

    drop(persistent);
    assert!(gone_soon(&name), "{name} was not removed");
}

#[test]
fn a_name_taken_by_another_kind_of_interface_is_refused() {
    if tap_or_skip("a_name_taken_by_another_kind_of_interface_is_refused").is_none() {
        return;
    }
    let e = Tap::open(Some("lo")).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("opening tap \"lo\": "), "{text}");
    assert!(
        text.contains("exists but is not a single-queue tap"),
        "{text}"
    );
}

#[test]
fn bad_names_are_refused_before_opening_anything() {
    let cases = [
        ("", "empty"),
        ("a234567890123456", "too long (max 15 bytes)"),
        (".", "not interface names"),
        ("..", "not interface names"),
        ("keel%d", "'%'"),
        ("a/b", "'/'"),
        ("eth0:1", "':'"),
        ("a b", "printable ASCII"),
        ("a\tb", "printable ASCII"),
        ("a\0b", "printable ASCII"),
        ("tàp", "printable ASCII"),
    ];
    for (name, why) in cases {
        match Tap::open(Some(name)) {
            Err(Error::InvalidName { name: n, reason }) => {
                assert_eq!(n, name);
                assert!(reason.contains(why), "{name:?}: {reason}");
            }
            other => panic!("{name:?} gave {other:?}"),
        }
    }
    let e = Tap::open(Some("a234567890123456")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid tap name \"a234567890123456\": too long (max 15 bytes)"
    );
    assert!(validate_name("a23456789012345").is_ok());
    assert!(validate_name("tap-0_x.y").is_ok());
}

/// Drops CAP_NET_ADMIN from this thread's effective set (capabilities are per thread).
fn drop_net_admin() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes one header and, for version 3, two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: capset reads one header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn without_cap_net_admin_the_error_says_what_to_do() {
    if tap_or_skip("without_cap_net_admin_the_error_says_what_to_do").is_none() {
        return;
    }
    let result = std::thread::spawn(|| {
        drop_net_admin().map_err(|e| format!("capset: {e}"))?;
        Ok::<_, String>(Tap::open(None))
    })
    .join()
    .unwrap();
    let opened = match result {
        Ok(opened) => opened,
        Err(why) => return skip("without_cap_net_admin_the_error_says_what_to_do", &why),
    };
    let e = opened.unwrap_err();
    assert_eq!(
        e.to_string(),
        "opening tap \"keel%d\": Operation not permitted (os error 1) — run as root or give \
         CAP_NET_ADMIN"
    );
    assert!(cannot_create_taps(&e));
}

#[test]
fn errors_carry_advice() {
    let e = Error::OpenTun {
        source: io::Error::from_raw_os_error(libc::EACCES),
        hint: privilege_hint(&io::Error::from_raw_os_error(libc::EACCES)),
    };
    assert_eq!(
        e.to_string(),
        "opening /dev/net/tun: Permission denied (os error 13) — run as root or give CAP_NET_ADMIN"
    );
    assert_eq!(
        privilege_hint(&io::Error::from_raw_os_error(libc::EBUSY)),
        ""
    );
}

#[test]
fn abi_matches_libc() {
    assert_eq!(size_of::<IfReq>(), size_of::<libc::ifreq>());
    assert_eq!(align_of::<IfReq>(), align_of::<libc::ifreq>());
    assert_eq!(sys::TUNSETIFF, libc::TUNSETIFF);
    assert_eq!(sys::TUNSETPERSIST, libc::TUNSETPERSIST);
    assert_eq!(sys::TUNSETOFFLOAD, libc::TUNSETOFFLOAD);
    assert_eq!(sys::TUNGETIFF, libc::TUNGETIFF);
    assert_eq!(sys::TUNGETVNETHDRSZ, libc::TUNGETVNETHDRSZ);
    assert_eq!(sys::TUNSETVNETHDRSZ, libc::TUNSETVNETHDRSZ);
    assert_eq!(sys::TUNSETIFF, 0x4004_54ca);
    assert_eq!(sys::TUNGETIFF, 0x8004_54d2);
    for (ours, theirs) in [
        (sys::SIOCGIFFLAGS, libc::SIOCGIFFLAGS),
        (sys::SIOCSIFFLAGS, libc::SIOCSIFFLAGS),
        (sys::SIOCGIFADDR, libc::SIOCGIFADDR),
        (sys::SIOCSIFADDR, libc::SIOCSIFADDR),
        (sys::SIOCGIFNETMASK, libc::SIOCGIFNETMASK),
        (sys::SIOCSIFNETMASK, libc::SIOCSIFNETMASK),
    ] {
        assert_eq!(ours as c_ulong, theirs);
    }
    for (ours, theirs) in [
        (sys::IFF_TAP, libc::IFF_TAP),
        (sys::IFF_NO_PI, libc::IFF_NO_PI),
        (sys::IFF_VNET_HDR, libc::IFF_VNET_HDR),
        (sys::IFF_PERSIST, libc::IFF_PERSIST),
        (sys::IFF_UP, libc::IFF_UP),
    ] {
        assert_eq!(c_int::from(ours), theirs);
    }
    for (ours, theirs) in [
        (Offloads::CSUM, libc::TUN_F_CSUM),
        (Offloads::TSO4, libc::TUN_F_TSO4),
        (Offloads::TSO6, libc::TUN_F_TSO6),
        (Offloads::TSO_ECN, libc::TUN_F_TSO_ECN),
        (Offloads::UFO, libc::TUN_F_UFO),
        (Offloads::USO4, libc::TUN_F_USO4),
        (Offloads::USO6, libc::TUN_F_USO6),
    ] {
        assert_eq!(ours.bits(), theirs);
    }
}
