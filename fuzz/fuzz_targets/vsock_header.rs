//! vsock packet headers come from the guest's tx queue: `parse_header` must accept or reject
//! any byte string without panicking, and what it accepts must be exactly what `to_bytes`
//! writes back (it keeps every field; nothing is normalised or dropped).
#![no_main]

use keel_virtio::vsock::{parse_header, HeaderError, Op, HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_header(data) {
        Ok(h) => {
            assert!(data.len() >= HDR_LEN);
            // Byte-for-byte round trip of the 44 header bytes; trailing bytes are payload.
            assert_eq!(&h.to_bytes()[..], &data[..HDR_LEN]);
            assert_eq!(parse_header(&h.to_bytes()), Ok(h));
            assert_eq!(Op::from_raw(h.op.raw()), Some(h.op));
            // Replies go back the way the packet came.
            let back = h.addrs.reversed();
            assert_eq!(back.reversed(), h.addrs);
            assert_eq!(
                (back.src_cid, back.dst_port),
                (h.addrs.dst_cid, h.addrs.src_port)
            );
        }
        Err(HeaderError::Short(n)) => {
            assert_eq!(n, data.len());
            assert!(n < HDR_LEN);
        }
        Err(HeaderError::Type { addrs, .. }) | Err(HeaderError::Op { addrs, .. }) => {
            assert!(data.len() >= HDR_LEN);
            // The addresses are reported (for the RST reply) exactly as sent.
            let le = |a: usize, n: usize| {
                let mut x = [0u8; 8];
                x[..n].copy_from_slice(&data[a..a + n]);
                u64::from_le_bytes(x)
            };
            assert_eq!(addrs.src_cid, le(0, 8));
            assert_eq!(addrs.dst_cid, le(8, 8));
            assert_eq!(u64::from(addrs.src_port), le(16, 4));
            assert_eq!(u64::from(addrs.dst_port), le(20, 4));
        }
    }
});
