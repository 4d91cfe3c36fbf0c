//! Host-side networking for Keel's virtio-net device.
//!
//! It owns two things and nothing else:
//! - [`MacAddr`]: a unicast Ethernet address, parsed from and serialised as
//!   `"52:54:00:12:34:56"`, or made at random ([`MacAddr::random_local`]);
//! - [`Tap`]: a Linux tap interface opened through `/dev/net/tun` with a virtio-net header in
//!   front of every frame (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), its offloads
//!   ([`Offloads`]), and the few interface settings a test or a simple set-up needs (up, an
//!   IPv4 address) without shelling out to `ip`;
//! - the RARP announcement a migrated guest's address is made known by ([`Tap::announce`]).
//!
//! The virtio-net device reads and writes whole frames through [`Tap`]; it never sees an ioctl.
//! Linux only: every system interface here is Linux's.

mod announce;
mod error;
mod mac;
mod offload;
mod sys;
mod tap;

pub use announce::{rarp_announcement, ANNOUNCE_LEN};
pub use error::{Error, Result};
pub use mac::MacAddr;
pub use offload::Offloads;
pub use tap::{Tap, MAX_NAME_LEN, VNET_HDR_LEN};
