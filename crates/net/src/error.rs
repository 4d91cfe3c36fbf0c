use std::io;

/// Errors from host networking. Each names what failed and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid MAC address {input:?}: {reason}")]
    InvalidMac { input: String, reason: String },
    #[error("cannot read random bytes for a MAC address: {0}")]
    Random(#[source] io::Error),
    #[error("invalid tap name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("opening /dev/net/tun: {source}{hint}")]
    OpenTun {
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("opening tap {name:?}: {source}{hint}")]
    OpenTap {
        /// The requested name (`keel%d` when the kernel picks one).
        name: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("{op} on {name}: {source}{hint}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("vnet header size {0} is invalid: it must be at least 10 bytes (struct virtio_net_hdr); virtio 1.0 uses 12")]
    VnetHdrSize(usize),
    #[error("IPv4 prefix length /{0} is invalid: it must be 0 to 32")]
    Prefix(u8),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The advice that goes with a refused privileged operation.
pub(crate) const NEED_NET_ADMIN: &str = " — run as root or give CAP_NET_ADMIN";

/// A hint for an errno that means "not allowed", empty otherwise.
pub(crate) fn privilege_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => NEED_NET_ADMIN,
        _ => "",
    }
}
