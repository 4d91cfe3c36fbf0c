use crate::error::{Error, Result};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::io::Read;
use std::str::FromStr;

/// A unicast Ethernet (MAC) address, as a NIC owns one.
///
/// Written and parsed as six colon-separated pairs of hex digits (`52:54:00:12:34:56`;
/// either case in, lower case out), and serialised in that form. Every `MacAddr` is unicast
/// and not all-zero: parsing, `TryFrom<[u8; 6]>` and deserialising refuse anything else.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr([u8; 6]);

/// The I/G bit: set in a group (multicast or broadcast) address.
const MULTICAST_BIT: u8 = 0x01;
/// The U/L bit: set in a locally administered address (not from a vendor's OUI).
const LOCAL_BIT: u8 = 0x02;

impl MacAddr {
    /// A random locally administered unicast address, from getrandom(2) (falling back to
    /// `/dev/urandom` on kernels without it). 46 random bits: two VMs on one link collide
    /// with negligible probability.
    pub fn random_local() -> Result<MacAddr> {
        let mut b = [0u8; 6];
        fill_random(&mut b).map_err(Error::Random)?;
        b[0] = (b[0] & !MULTICAST_BIT) | LOCAL_BIT;
        Ok(MacAddr(b))
    }

    /// The six octets, first on the wire first.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for a locally administered address (the U/L bit is set).
    pub const fn is_local(&self) -> bool {
        self.0[0] & LOCAL_BIT != 0
    }

    fn check(b: [u8; 6], input: impl FnOnce() -> String) -> Result<MacAddr> {
        let reason = if b[0] & MULTICAST_BIT != 0 {
            "the multicast bit (lowest bit of the first octet) is set; a NIC address must be unicast"
        } else if b == [0; 6] {
            "the all-zero address is not a usable NIC address"
        } else {
            return Ok(MacAddr(b));
        };
        Err(Error::InvalidMac {
            input: input(),
            reason: reason.into(),
        })
    }
}

impl TryFrom<[u8; 6]> for MacAddr {
    type Error = Error;

    /// Accepts the octets of a unicast, non-zero address.
    fn try_from(b: [u8; 6]) -> Result<MacAddr> {
        MacAddr::check(b, || MacAddr(b).to_string())
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(m: MacAddr) -> [u8; 6] {
        m.0
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<MacAddr> {
        let bad = |reason: String| Error::InvalidMac {
            input: s.into(),
            reason,
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad(format!(
                "expected 6 colon-separated octets like 52:54:00:12:34:56, found {}",
                parts.len()
            )));
        }
        let mut b = [0u8; 6];
        for (i, (part, out)) in parts.iter().zip(b.iter_mut()).enumerate() {
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "octet {} ({part:?}) is not two hex digits",
                    i + 1
                )));
            }
            *out = u8::from_str_radix(part, 16)
                .map_err(|_| bad(format!("octet {} ({part:?}) is not hex", i + 1)))?;
        }
        MacAddr::check(b, || s.into())
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<MacAddr, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = MacAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a unicast MAC address like \"52:54:00:12:34:56\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<MacAddr, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Fills `buf` from getrandom(2), or from `/dev/urandom` where the syscall does not exist.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is valid,
        // writable memory borrowed mutably for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => {
                return std::fs::File::open("/dev/urandom")?.read_exact(&mut buf[done..]);
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> String {
        match s.parse::<MacAddr>() {
            Err(Error::InvalidMac { input, reason }) => {
                assert_eq!(input, s);
                reason
            }
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_and_displays() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.octets(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert_eq!(format!("{m:?}"), "MacAddr(52:54:00:12:34:56)");
        assert!(m.is_local());
        let upper: MacAddr = "AA:BB:CC:DD:EE:0F".parse().unwrap();
        assert_eq!(upper.to_string(), "aa:bb:cc:dd:ee:0f");
        assert!(upper.is_local());
        let vendor: MacAddr = "00:16:3e:00:00:01".parse().unwrap();
        assert!(!vendor.is_local());
        assert_eq!(<[u8; 6]>::from(vendor), [0x00, 0x16, 0x3e, 0, 0, 1]);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(reason("").contains("expected 6"), "{}", reason(""));
        assert!(reason("52:54:00:12:34").contains("found 5"));
        assert!(reason("52:54:00:12:34:56:78").contains("found 7"));
        assert!(reason("52-54-00-12-34-56").contains("found 1"));
        assert!(reason("52:54:00:12:34:zz").contains("octet 6 (\"zz\")"));
        assert!(reason("52:54:0:12:34:56").contains("octet 3"));
        assert!(reason("52:54:000:12:34:56").contains("octet 3"));
        assert!(reason("52:54::12:34:56").contains("octet 3"));
        assert!(reason("52:54:00:12:34:+5").contains("octet 6"));
        assert!(reason(" 52:54:00:12:34:56").contains("octet 1"));
        assert!(reason("01:00:5e:00:00:01").contains("multicast"));
        assert!(reason("ff:ff:ff:ff:ff:ff").contains("multicast"));
        assert!(reason("00:00:00:00:00:00").contains("all-zero"));
        let msg = "53:54:00:12:34:56"
            .parse::<MacAddr>()
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "invalid MAC address \"53:54:00:12:34:56\": the multicast bit (lowest bit of the \
             first octet) is set; a NIC address must be unicast"
        );
    }

    #[test]
    fn try_from_octets_checks_the_same_rules() {
        assert!(MacAddr::try_from([0x52, 0, 0, 0, 0, 1]).is_ok());
        assert!(MacAddr::try_from([0x01, 0, 0, 0, 0, 1]).is_err());
        assert!(MacAddr::try_from([0; 6]).is_err());
    }

    #[test]
    fn random_local_is_local_unicast_and_random() {
        let a = MacAddr::random_local().unwrap();
        let b = MacAddr::random_local().unwrap();
        for m in [a, b] {
            assert_eq!(m.octets()[0] & MULTICAST_BIT, 0, "{m}");
            assert!(m.is_local(), "{m}");
            assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        }
        // 46 random bits each: equal only with probability 2^-46.
        assert_ne!(a, b);
    }

    #[test]
    fn serde_uses_the_string_form() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"52:54:00:ab:cd:ef\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        let owned: MacAddr = serde_json::from_reader(&b"\"52:54:00:AB:CD:EF\""[..]).unwrap();
        assert_eq!(owned, m);
        let e = serde_json::from_str::<MacAddr>("\"01:54:00:ab:cd:ef\"").unwrap_err();
        assert!(e.to_string().contains("multicast"), "{e}");
        let e = serde_json::from_str::<MacAddr>("[82,84,0,1,2,3]").unwrap_err();
        assert!(e.to_string().contains("unicast MAC address like"), "{e}");
    }
}
