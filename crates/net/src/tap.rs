use crate::error::{privilege_hint, Error, Result};
use crate::offload::Offloads;
use crate::sys::{self, IfReq};
use libc::{c_int, c_ulong};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use tracing::debug;

/// Bytes of the virtio-net header in front of every frame for a virtio 1.0 device (and a
/// legacy one with `VIRTIO_NET_F_MRG_RXBUF`): `struct virtio_net_hdr_v1`, i.e. the 10-byte
/// `struct virtio_net_hdr` plus `num_buffers`. Pass it to [`Tap::set_vnet_hdr_size`].
pub const VNET_HDR_LEN: usize = 12;

/// The longest interface name Linux takes (`IFNAMSIZ` less its NUL).
pub const MAX_NAME_LEN: usize = sys::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";
/// The name for a tap whose number the kernel picks (`keel0`, `keel1`, ...).
const ANONYMOUS_NAME: &str = "keel%d";
/// The size of `struct virtio_net_hdr`, the least the kernel takes as a vnet header size.
const MIN_VNET_HDR_LEN: usize = 10;

/// A tap interface: the host end of a guest's virtio-net link.
///
/// Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every frame read or written is a
/// virtio-net header followed by an Ethernet frame (no FCS), one frame per read or write.
/// The header's size is the kernel's default of 10 bytes until
/// [`set_vnet_hdr_size`](Self::set_vnet_hdr_size) changes it (virtio 1.0: [`VNET_HDR_LEN`]).
/// Its fields are little-endian on little-endian hosts (x86_64, aarch64), as virtio 1.0 wants.
///
/// All methods take `&self`, so one `Tap` can serve a receive and a transmit thread.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// True when the kernel created the interface for this fd: it is not persistent and goes
    /// away when `fd` closes.
    created: bool,
    /// The offloads `set_offloads` last set, which `probe_offloads` puts back.
    offloads: AtomicU32,
    /// The header size `set_vnet_hdr_size` last set (0: not set here).
    hdr_len: AtomicU32,
}

impl Tap {
    /// Opens a tap interface.
    ///
    /// - `None`: creates a new tap named `keelN`, the kernel picking the first free `N`.
    /// - `Some(name)`: attaches to the existing *persistent* tap `name` (as made by
    ///   `ip tuntap add dev NAME mode tap`), or creates `name` if no interface has it. This is
    ///   what `TUNSETIFF`, and so `ip tuntap`, does. Names with `%` are refused: pass `None`
    ///   to let the kernel number the tap.
    ///
    /// A tap created here is not persistent: the kernel removes it when this `Tap` is dropped.
    /// An attached persistent tap stays (and keeps any offloads and header size set here).
    /// [`created_by_keel`](Self::created_by_keel) tells which happened; the answer comes from
    /// the tap's own flags after the open, so a race with another creator cannot mislead it.
    ///
    /// Needs `CAP_NET_ADMIN` to create a tap, or to attach to one owned by another user.
    /// The fd is close-on-exec and blocking ([`set_nonblocking`](Self::set_nonblocking)).
    pub fn open(name: Option<&str>) -> Result<Tap> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let requested = name.unwrap_or(ANONYMOUS_NAME);
        // Only for the error message: the kernel decides what happens.
        let existed = name.is_some_and(interface_exists);

        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .map_err(|source| {
                let hint = if source.kind() == io::ErrorKind::NotFound {
                    " — load the tun module (modprobe tun) or create the node \
                     (mknod /dev/net/tun c 10 200)"
                } else {
                    privilege_hint(&source)
                };
                Error::OpenTun { source, hint }
            })?
            .into();

        let mut req = IfReq::new(requested);
        req.data.flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads a struct ifreq and writes the interface's name back into
        // it; `req` is one.
        unsafe { sys::ioctl_ptr(fd.as_fd(), sys::TUNSETIFF, &mut req) }.map_err(|source| {
            let hint = match source.raw_os_error() {
                Some(libc::EBUSY) => {
                    " — another process has this tap open (a tap without multi_queue \
                     takes one user)"
                }
                Some(libc::EINVAL) if existed => {
                    " — an interface with this name exists but is not a single-queue tap \
                     (a tun, a multi_queue tap or another kind of device)"
                }
                _ => privilege_hint(&source),
            };
            Error::OpenTap {
                name: requested.into(),
                source,
                hint,
            }
        })?;
        let actual = req.name();

        let mut got = IfReq::new("");
        // SAFETY: TUNGETIFF writes a struct ifreq (name and flags); `got` is one.
        unsafe { sys::ioctl_ptr(fd.as_fd(), sys::TUNGETIFF, &mut got) }.map_err(|source| {
            Error::Ioctl {
                op: "TUNGETIFF",
                name: actual.clone(),
                source,
                hint: "",
            }
        })?;
        let created = got.flags() & sys::IFF_PERSIST == 0;
        debug!(
            tap = %actual,
            created,
            flags = format_args!("{:#x}", got.flags()),
            "opened tap"
        );
        Ok(Tap {
            fd,
            name: actual,
            created,
            offloads: AtomicU32::new(0),
            hdr_len: AtomicU32::new(0),
        })
    }

    /// The interface's name, as the kernel reports it (`keel0` for an anonymous tap).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when this `Tap` created the interface, which then disappears when it is dropped;
    /// false when it attached to a persistent tap, which outlives it.
    pub fn created_by_keel(&self) -> bool {
        self.created
    }

    /// Sets the size of the virtio-net header in front of every frame, at least 10.
    /// [`VNET_HDR_LEN`] (12) for a virtio 1.0 device. Only the first 10 bytes carry
    /// anything: the kernel ignores the rest of a written header, and on a read zeroes them
    /// (Linux 6.x) or leaves them as they were (older kernels), so the device sets
    /// `num_buffers` itself.
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<()> {
        let mut v = c_int::try_from(size)
            .ok()
            .filter(|_| size >= MIN_VNET_HDR_LEN)
            .ok_or(Error::VnetHdrSize(size))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int through its argument.
        unsafe { sys::ioctl_ptr(self.fd.as_fd(), sys::TUNSETVNETHDRSZ, &mut v) }
            .map_err(|e| self.ioctl_err("TUNSETVNETHDRSZ", e))?;
        self.hdr_len.store(v as u32, Ordering::Relaxed);
        Ok(())
    }

    /// The header size as last set here, else as the kernel has it.
    pub(crate) fn known_vnet_hdr_size(&self) -> Result<usize> {
        match self.hdr_len.load(Ordering::Relaxed) {
            0 => self.vnet_hdr_size(),
            n => Ok(n as usize),
        }
    }

    /// The current size of the virtio-net header in front of every frame.
    pub fn vnet_hdr_size(&self) -> Result<usize> {
        let mut v: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int through its argument.
        unsafe { sys::ioctl_ptr(self.fd.as_fd(), sys::TUNGETVNETHDRSZ, &mut v) }
            .map_err(|e| self.ioctl_err("TUNGETVNETHDRSZ", e))?;
        Ok(v as usize)
    }

    /// Tells the kernel which offloads Keel (the guest) accepts in frames it reads from the
    /// tap (`TUNSETOFFLOAD`). [`Offloads::NONE`] means whole frames with full checksums.
    /// Combinations the kernel refuses are an error; see [`Offloads`] for its rules.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<()> {
        self.try_offloads(offloads).map_err(|source| {
            let hint = if source.raw_os_error() == Some(libc::EINVAL) {
                " — the kernel refuses this combination (every offload needs CSUM, TSO_ECN \
                 needs TSO4 or TSO6, USO4 and USO6 go together); probe_offloads() says what \
                 this tap takes"
            } else {
                ""
            };
            Error::Ioctl {
                op: "TUNSETOFFLOAD",
                name: self.name.clone(),
                source,
                hint,
            }
        })?;
        self.offloads.store(offloads.bits(), Ordering::Relaxed);
        debug!(tap = %self.name, ?offloads, "set tap offloads");
        Ok(())
    }

    /// Which offloads this tap's kernel accepts, found by trying them: each flag with the
    /// ones it needs (CSUM; TSO4/TSO6 for TSO_ECN; USO4 and USO6 as a pair where the kernel
    /// takes only the pair). [`set_offloads`](Self::set_offloads) accepts the whole result.
    /// Afterwards the offloads last set through this `Tap` (none at first) are put back;
    /// do not call it concurrently with `set_offloads`.
    pub fn probe_offloads(&self) -> Result<Offloads> {
        let found = self.probe_offloads_inner();
        let before = Offloads::from_bits_retain(self.offloads.load(Ordering::Relaxed));
        let restored = self.try_offloads(before);
        let found = found?;
        restored.map_err(|e| self.ioctl_err("TUNSETOFFLOAD", e))?;
        debug!(tap = %self.name, ?found, "probed tap offloads");
        Ok(found)
    }

    fn probe_offloads_inner(&self) -> Result<Offloads> {
        let accepts = |o: Offloads| match self.try_offloads(o) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(self.ioctl_err("TUNSETOFFLOAD", e)),
        };
        let csum = Offloads::CSUM;
        if !accepts(csum)? {
            return Ok(Offloads::NONE);
        }
        let mut found = csum;
        for one in [
            Offloads::TSO4,
            Offloads::TSO6,
            Offloads::UFO,
            Offloads::USO4,
            Offloads::USO6,
        ] {
            if accepts(csum | one)? {
                found |= one;
            }
        }
        let tso = found & (Offloads::TSO4 | Offloads::TSO6);
        if !tso.is_empty() && accepts(csum | tso | Offloads::TSO_ECN)? {
            found |= Offloads::TSO_ECN;
        }
        let uso = Offloads::USO4 | Offloads::USO6;
        if !found.contains(uso) && accepts(csum | uso)? {
            found |= uso;
        }
        Ok(found)
    }

    fn try_offloads(&self, offloads: Offloads) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value, not through a pointer.
        unsafe {
            sys::ioctl_val(
                self.fd.as_fd(),
                sys::TUNSETOFFLOAD,
                offloads.bits() as c_ulong,
            )
        }
        .map(drop)
    }

    /// Makes reads and writes return [`io::ErrorKind::WouldBlock`] instead of waiting (for
    /// an event loop), or wait again.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL only reads the open file's status flags; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(self.ioctl_err("fcntl(F_GETFL)", io::Error::last_os_error()));
        }
        let wanted = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: F_SETFL only changes the open file's status flags; no memory is passed.
        if wanted != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, wanted) } < 0 {
            return Err(self.ioctl_err("fcntl(F_SETFL)", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Sets the interface up (`IFF_UP`), as `ip link set NAME up` does.
    pub fn bring_up(&self) -> Result<()> {
        let mut req = IfReq::new(&self.name);
        self.if_ioctl(IfOp::GetFlags, &mut req)?;
        req.data.flags = req.flags() | sys::IFF_UP;
        self.if_ioctl(IfOp::SetFlags, &mut req)
    }

    /// Gives the host end an IPv4 address and prefix length, replacing its primary IPv4
    /// address, as `ifconfig NAME ADDR netmask MASK` does; the kernel adds the route to the
    /// subnet once the interface is up.
    pub fn set_ipv4(&self, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        if prefix > 32 {
            return Err(Error::Prefix(prefix));
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let mut req = IfReq::new(&self.name);
        req.data.addr = sockaddr_in(addr);
        self.if_ioctl(IfOp::SetAddr, &mut req)?;
        req.data.addr = sockaddr_in(Ipv4Addr::from(mask));
        self.if_ioctl(IfOp::SetNetmask, &mut req)
    }

    /// The interface's primary IPv4 address and prefix length, if it has one.
    pub fn ipv4(&self) -> Result<Option<(Ipv4Addr, u8)>> {
        let mut req = IfReq::new(&self.name);
        match self.if_ioctl(IfOp::GetAddr, &mut req) {
            Err(Error::Ioctl { source, .. })
                if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) =>
            {
                return Ok(None)
            }
            other => other?,
        }
        let addr = Ipv4Addr::from(u32::from_be(req.addr().sin_addr.s_addr));
        self.if_ioctl(IfOp::GetNetmask, &mut req)?;
        let mask = u32::from_be(req.addr().sin_addr.s_addr);
        Ok(Some((addr, mask.leading_ones() as u8)))
    }

    /// Reads one frame, header first, into `buf`; a frame longer than `buf` is cut short.
    /// With offloads set a frame can be 64 KiB and more (a TSO/USO segment), otherwise up to
    /// the MTU plus the Ethernet header.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is valid,
        // exclusively borrowed memory.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        cvt_len(n)
    }

    /// Reads one frame spread over `bufs` (readv(2)): typically the virtio-net header, then
    /// the guest's receive buffers.
    pub fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let count = iov_count(bufs.len())?;
        // SAFETY: std guarantees IoSliceMut has the layout of struct iovec on Unix; each one
        // describes valid memory exclusively borrowed for this call, and the kernel writes
        // only within those `count` buffers.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), bufs.as_ptr().cast(), count) };
        cvt_len(n)
    }

    /// Writes one frame, header first (at least the header plus 14 bytes of Ethernet header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`, which is valid memory.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        cvt_len(n)
    }

    /// Writes one frame gathered from `bufs` (writev(2)): the header and the frame can come
    /// from separate buffers, as they do in a virtqueue.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = iov_count(bufs.len())?;
        // SAFETY: std guarantees IoSlice has the layout of struct iovec on Unix; each one
        // describes valid memory borrowed for this call, which the kernel only reads.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast(), count) };
        cvt_len(n)
    }

    fn if_ioctl(&self, op: IfOp, req: &mut IfReq) -> Result<()> {
        let sock = control_socket().map_err(|e| self.ioctl_err("socket(AF_INET)", e))?;
        // SAFETY: every IfOp is a SIOC[GS]IF* request, which reads and/or writes exactly one
        // struct ifreq (name plus one integer or sockaddr member); `req` is one.
        unsafe { sys::ioctl_ptr(sock.as_fd(), op.request(), req) }
            .map(drop)
            .map_err(|e| self.ioctl_err(op.name(), e))
    }

    fn ioctl_err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Ioctl {
            op,
            name: self.name.clone(),
            hint: privilege_hint(&source),
            source,
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl io::Read for &Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read(self, buf)
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        Tap::read_vectored(self, bufs)
    }
}

impl io::Write for &Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Tap::write(self, buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Tap::write_vectored(self, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.created {
            debug!(tap = %self.name, "closing tap; the kernel removes it");
        } else {
            debug!(tap = %self.name, "closing persistent tap; it stays");
        }
    }
}

/// The interface ioctls this crate issues on an AF_INET socket.
#[derive(Clone, Copy)]
enum IfOp {
    GetFlags,
    SetFlags,
    GetAddr,
    SetAddr,
    GetNetmask,
    SetNetmask,
}

impl IfOp {
    fn request(self) -> libc::Ioctl {
        match self {
            IfOp::GetFlags => sys::SIOCGIFFLAGS,
            IfOp::SetFlags => sys::SIOCSIFFLAGS,
            IfOp::GetAddr => sys::SIOCGIFADDR,
            IfOp::SetAddr => sys::SIOCSIFADDR,
            IfOp::GetNetmask => sys::SIOCGIFNETMASK,
            IfOp::SetNetmask => sys::SIOCSIFNETMASK,
        }
    }

    fn name(self) -> &'static str {
        match self {
            IfOp::GetFlags => "SIOCGIFFLAGS",
            IfOp::SetFlags => "SIOCSIFFLAGS",
            IfOp::GetAddr => "SIOCGIFADDR",
            IfOp::SetAddr => "SIOCSIFADDR",
            IfOp::GetNetmask => "SIOCGIFNETMASK",
            IfOp::SetNetmask => "SIOCSIFNETMASK",
        }
    }
}

/// Checks a tap name the way Linux's `dev_valid_name` does, before anything is opened, and
/// refuses `%` (a kernel numbering template) and non-ASCII bytes besides.
fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "too long (max 15 bytes)"
    } else if name == "." || name == ".." {
        "\".\" and \"..\" are not interface names"
    } else if name.contains('%') {
        "'%' asks the kernel to number the tap; open without a name for that (keelN)"
    } else if name.contains(['/', ':']) {
        "Linux forbids '/' and ':' in interface names"
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        "only printable ASCII without spaces is accepted"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.into(),
        reason,
    })
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// A datagram socket to carry interface ioctls, which any socket family accepts.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn iov_count(len: usize) -> io::Result<c_int> {
    c_int::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt_len(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests;
