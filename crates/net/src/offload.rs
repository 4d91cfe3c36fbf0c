use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

/// Offloads for `TUNSETOFFLOAD` (`TUN_F_*` in `<linux/if_tun.h>`).
///
/// They describe what the *reader* of the tap — Keel, for the guest — can take: with
/// [`CSUM`](Self::CSUM) the tap may hand over frames with a partial checksum, with
/// [`TSO4`](Self::TSO4) TCP segments up to 64 KiB, and so on, each described by the virtio-net
/// header in front of the frame. They map onto the guest's receive features
/// (`VIRTIO_NET_F_GUEST_CSUM`, `_GUEST_TSO4`, ...). Frames Keel *writes* may carry checksum
/// and GSO requests whatever is set here.
///
/// The kernel's rules: every other flag needs `CSUM`; `TSO_ECN` needs `TSO4` or `TSO6`;
/// `USO4` and `USO6` are accepted only together; unknown bits are refused. Linux has built
/// no UFO packets since 4.14: `UFO` is still accepted, for compatibility, but the tap never
/// hands over a UFO frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Offloads(u32);

impl Offloads {
    pub const NONE: Offloads = Offloads(0);
    /// `TUN_F_CSUM`: frames may carry a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: Offloads = Offloads(0x01);
    /// `TUN_F_TSO4`: TCP over IPv4 segmentation.
    pub const TSO4: Offloads = Offloads(0x02);
    /// `TUN_F_TSO6`: TCP over IPv6 segmentation.
    pub const TSO6: Offloads = Offloads(0x04);
    /// `TUN_F_TSO_ECN`: TSO frames with the ECN CWR bit.
    pub const TSO_ECN: Offloads = Offloads(0x08);
    /// `TUN_F_UFO`: UDP fragmentation offload (legacy; see the type's documentation).
    pub const UFO: Offloads = Offloads(0x10);
    /// `TUN_F_USO4`: UDP segmentation over IPv4 (Linux 6.2+).
    pub const USO4: Offloads = Offloads(0x20);
    /// `TUN_F_USO6`: UDP segmentation over IPv6 (Linux 6.2+).
    pub const USO6: Offloads = Offloads(0x40);

    const NAMES: [(Offloads, &'static str); 7] = [
        (Self::CSUM, "CSUM"),
        (Self::TSO4, "TSO4"),
        (Self::TSO6, "TSO6"),
        (Self::TSO_ECN, "TSO_ECN"),
        (Self::UFO, "UFO"),
        (Self::USO4, "USO4"),
        (Self::USO6, "USO6"),
    ];

    /// The raw `TUN_F_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Any bits, including ones this crate has no name for (the kernel refuses unknown ones).
    pub const fn from_bits_retain(bits: u32) -> Offloads {
        Offloads(bits)
    }

    pub const fn contains(self, other: Offloads) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Offloads {
    type Output = Offloads;
    fn bitor(self, rhs: Offloads) -> Offloads {
        Offloads(self.0 | rhs.0)
    }
}

impl BitOrAssign for Offloads {
    fn bitor_assign(&mut self, rhs: Offloads) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Offloads {
    type Output = Offloads;
    fn bitand(self, rhs: Offloads) -> Offloads {
        Offloads(self.0 & rhs.0)
    }
}

impl fmt::Debug for Offloads {
    /// `Offloads(CSUM | TSO4)`, `Offloads(NONE)`, unknown bits in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = Self::NAMES
            .iter()
            .filter(|(o, _)| self.contains(*o))
            .map(|(_, n)| (*n).to_string())
            .collect();
        let known = Self::NAMES.iter().fold(0, |acc, (o, _)| acc | o.0);
        if self.0 & !known != 0 {
            names.push(format!("{:#x}", self.0 & !known));
        }
        if names.is_empty() {
            names.push("NONE".into());
        }
        write!(f, "Offloads({})", names.join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_operations_and_debug() {
        let o = Offloads::CSUM | Offloads::TSO4;
        assert_eq!(o.bits(), 0x03);
        assert!(o.contains(Offloads::CSUM));
        assert!(!o.contains(Offloads::TSO6));
        assert!(o.contains(Offloads::NONE));
        assert_eq!(o & Offloads::TSO4, Offloads::TSO4);
        assert!(Offloads::default().is_empty());
        assert_eq!(format!("{o:?}"), "Offloads(CSUM | TSO4)");
        assert_eq!(format!("{:?}", Offloads::NONE), "Offloads(NONE)");
        let odd = Offloads::from_bits_retain(0x101);
        assert_eq!(format!("{odd:?}"), "Offloads(CSUM | 0x100)");
    }
}
