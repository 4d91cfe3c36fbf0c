//! Announcing a guest's MAC address after it moved hosts: a RARP request broadcast from that
//! address, as QEMU and the hardware switches' own practice have it. Every switch and bridge
//! on the way learns that the address now sits behind the port the frame came in on, so
//! traffic for the guest follows it without the guest doing anything.

use crate::{MacAddr, Tap};
use std::io::{self, IoSlice};

/// Ethernet's minimum frame (without the FCS, which the kernel adds).
pub const ANNOUNCE_LEN: usize = 60;

/// EtherType of RARP.
const ETH_P_RARP: u16 = 0x8035;
/// RARP opcode "reverse request" (RFC 903).
const RARP_REQUEST_REVERSE: u16 = 3;

/// The announcement of `mac`: a broadcast RARP "reverse request" from `mac` asking for
/// `mac`'s own protocol address, padded to the minimum frame.
pub fn rarp_announcement(mac: MacAddr) -> [u8; ANNOUNCE_LEN] {
    let m = mac.octets();
    let mut f = [0u8; ANNOUNCE_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&m);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&RARP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&m); // sender hardware address; sender IP 0.0.0.0
    f[32..38].copy_from_slice(&m); // target hardware address; target IP 0.0.0.0
    f
}

impl Tap {
    /// Sends the announcement of `mac` out of this tap, as if the guest had sent it, behind
    /// an empty virtio-net header of the tap's size (no offload asked for; no ioctl once
    /// [`Tap::set_vnet_hdr_size`] set it, as virtio-net does).
    pub fn announce(&self, mac: MacAddr) -> io::Result<()> {
        let hdr = [0u8; 32];
        let len = self
            .known_vnet_hdr_size()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let hdr = hdr
            .get(..len)
            .ok_or_else(|| io::Error::other(format!("vnet header of {len} bytes")))?;
        let frame = rarp_announcement(mac);
        self.write_vectored(&[IoSlice::new(hdr), IoSlice::new(&frame)])
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_request_from_the_guest() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let f = rarp_announcement(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(f[..6], [0xff; 6], "broadcast");
        assert_eq!(f[6..12], mac.octets(), "from the guest's address");
        assert_eq!(f[12..14], [0x80, 0x35], "RARP");
        assert_eq!(f[14..22], [0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(f[22..28], mac.octets());
        assert_eq!(f[28..32], [0; 4]);
        assert_eq!(f[32..38], mac.octets());
        assert!(f[38..].iter().all(|b| *b == 0), "padding");
    }
}
