//! The Linux ABI this crate uses: tun/tap and interface ioctls and `struct ifreq`.
//!
//! Defined here from the kernel's UAPI headers (`<linux/if_tun.h>`, `<linux/if.h>`,
//! `<linux/sockios.h>`, `<asm-generic/ioctl.h>`) rather than taken piecemeal from libc, so each
//! value sits next to its source; a test checks them against libc's copies.

use libc::{c_char, c_int, c_short, c_ulong, c_void, Ioctl};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `IFNAMSIZ`: an interface name and its terminating NUL.
pub const IFNAMSIZ: usize = 16;

// `<linux/if_tun.h>`: TUNSETIFF flags (`ifr_flags`).
pub const IFF_TAP: c_short = 0x0002;
pub const IFF_PERSIST: c_short = 0x0800;
pub const IFF_NO_PI: c_short = 0x1000;
pub const IFF_VNET_HDR: c_short = 0x4000;

// `<linux/if.h>`: interface flags.
pub const IFF_UP: c_short = 0x0001;

// The generic ioctl encoding (`<asm-generic/ioctl.h>`): nr 8 bits, type 8, size 14, dir 2.
// powerpc, mips and sparc encode differently; Keel does not run there.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
compile_error!("keel-net encodes ioctl numbers the asm-generic way; add this architecture's");

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> Ioctl {
    ((dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32) as Ioctl
}
const fn iow<T>(ty: u8, nr: u8) -> Ioctl {
    ioc(IOC_WRITE, ty, nr, size_of::<T>())
}
const fn ior<T>(ty: u8, nr: u8) -> Ioctl {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}

// `<linux/if_tun.h>`. The size in the number is the header's, not always the real argument:
// TUNSETIFF and TUNGETIFF pass a `struct ifreq *`, TUNSETOFFLOAD and TUNSETPERSIST the value
// itself, the VNETHDRSZ pair an `int *`.
pub const TUNSETIFF: Ioctl = iow::<c_int>(b'T', 202);
/// Only the tests make persistent taps (to attach to one).
#[cfg(test)]
pub const TUNSETPERSIST: Ioctl = iow::<c_int>(b'T', 203);
pub const TUNSETOFFLOAD: Ioctl = iow::<libc::c_uint>(b'T', 208);
pub const TUNGETIFF: Ioctl = ior::<libc::c_uint>(b'T', 210);
pub const TUNGETVNETHDRSZ: Ioctl = ior::<c_int>(b'T', 215);
pub const TUNSETVNETHDRSZ: Ioctl = iow::<c_int>(b'T', 216);

// `<linux/sockios.h>`: interface ioctls on any socket, each passing a `struct ifreq *`.
pub const SIOCGIFFLAGS: Ioctl = 0x8913 as Ioctl;
pub const SIOCSIFFLAGS: Ioctl = 0x8914 as Ioctl;
pub const SIOCGIFADDR: Ioctl = 0x8915 as Ioctl;
pub const SIOCSIFADDR: Ioctl = 0x8916 as Ioctl;
pub const SIOCGIFNETMASK: Ioctl = 0x891b as Ioctl;
pub const SIOCSIFNETMASK: Ioctl = 0x891c as Ioctl;

/// `struct ifmap`: never used, but it is the largest member of the `ifreq` union and so sets
/// its size (24 bytes on 64-bit targets, 16 on 32-bit).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IfMap {
    mem_start: c_ulong,
    mem_end: c_ulong,
    base_addr: u16,
    irq: u8,
    dma: u8,
    port: u8,
}

/// The `ifr_ifru` union of `struct ifreq`, with the members this crate uses.
#[repr(C)]
#[derive(Clone, Copy)]
pub union IfReqData {
    /// `ifr_flags`: TUNSETIFF/TUNGETIFF flags or interface flags (SIOC[GS]IFFLAGS).
    pub flags: c_short,
    /// `ifr_addr` / `ifr_netmask` (a `struct sockaddr`, 16 bytes, which `sockaddr_in` fills).
    pub addr: libc::sockaddr_in,
    _map: IfMap,
}

/// `struct ifreq` (`<linux/if.h>`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IfReq {
    pub name: [c_char; IFNAMSIZ],
    pub data: IfReqData,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<IfReq>() == 40 && align_of::<IfReq>() == 8);
#[cfg(target_pointer_width = "32")]
const _: () = assert!(size_of::<IfReq>() == 32);
const _: () = assert!(size_of::<libc::sockaddr_in>() == 16);

impl IfReq {
    /// An all-zero request for interface `name`, which must be at most `IFNAMSIZ - 1` bytes
    /// without NUL (callers validate names first).
    pub fn new(name: &str) -> IfReq {
        assert!(name.len() < IFNAMSIZ && !name.contains('\0'));
        // SAFETY: IfReq is plain old data (integers and arrays of them in a C struct and
        // union); all-zero bytes are a valid value of every member.
        let mut req: IfReq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as c_char;
        }
        req
    }

    /// `ifr_name` up to its NUL, as the kernel filled it in.
    pub fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn flags(&self) -> c_short {
        // SAFETY: every bit pattern is a valid c_short, and the union's bytes are always
        // initialised (zeroed at creation, then written by us or the kernel).
        unsafe { self.data.flags }
    }

    pub fn addr(&self) -> libc::sockaddr_in {
        // SAFETY: as for `flags`: sockaddr_in is integers only, the bytes are initialised.
        unsafe { self.data.addr }
    }
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// ioctl(2) whose argument is a pointer to `*arg`.
///
/// # Safety
/// `req` must be a request that reads and/or writes at most one `T` through its argument, and
/// leaves every byte of `T` a valid value when it writes.
pub unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, req: Ioctl, arg: &mut T) -> io::Result<c_int> {
    // SAFETY: `arg` is a live, exclusively borrowed T for the duration of the call; the caller
    // guarantees the kernel accesses no more than that T through it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T as *mut c_void) })
}

/// ioctl(2) whose argument is passed by value.
///
/// # Safety
/// `req` must be a request that takes an integer argument, not a pointer.
pub unsafe fn ioctl_val(fd: BorrowedFd<'_>, req: Ioctl, arg: c_ulong) -> io::Result<c_int> {
    // SAFETY: the caller guarantees the kernel does not dereference `arg`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) })
}
