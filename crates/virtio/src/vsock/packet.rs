//! The virtio-vsock packet header (virtio 1.2 §5.10.6): 44 little-endian bytes in front of
//! every packet on the rx and tx queues. Parsing takes plain bytes so it can be fuzzed.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;

/// The host's context ID: every packet from the guest must be addressed to it.
pub const HOST_CID: u64 = 2;

/// `type` of a stream socket, the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event-queue event the device sends after its transport was reset (e.g. on restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// What a packet asks for (`op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    pub fn raw(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// Both ends of a packet: who sent it and to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
}

/// A parsed, well-typed packet header. `len` is what the header claims; whether the
/// buffers hold that much is checked by whoever reads the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub addrs: Addrs,
    pub len: u32,
    pub op: Op,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header was rejected. Errors after the address fields carry the addresses, so
/// the device can answer the sender with a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("packet header is {0} bytes, needs {HDR_LEN}")]
    Short(usize),
    #[error("unsupported socket type {ty}")]
    Type { ty: u16, addrs: Addrs },
    #[error("unknown operation {op}")]
    Op { op: u16, addrs: Addrs },
}

fn le16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(x)
}
fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Parses the first [`HDR_LEN`] bytes of `bytes` (extra bytes are ignored). Only a
/// stream-type header with a known operation is accepted.
pub fn parse_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    let Some(b) = bytes.get(..HDR_LEN) else {
        return Err(HeaderError::Short(bytes.len()));
    };
    let addrs = Addrs {
        src_cid: le64(b, 0),
        dst_cid: le64(b, 8),
        src_port: le32(b, 16),
        dst_port: le32(b, 20),
    };
    let ty = le16(b, 28);
    if ty != TYPE_STREAM {
        return Err(HeaderError::Type { ty, addrs });
    }
    let raw_op = le16(b, 30);
    let op = Op::from_raw(raw_op).ok_or(HeaderError::Op { op: raw_op, addrs })?;
    Ok(Header {
        addrs,
        len: le32(b, 24),
        op,
        flags: le32(b, 32),
        buf_alloc: le32(b, 36),
        fwd_cnt: le32(b, 40),
    })
}

impl Header {
    /// The header's wire form (stream type).
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.addrs.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.addrs.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.addrs.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.addrs.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.raw().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

impl Addrs {
    /// The same two endpoints seen from the other side.
    pub fn reversed(&self) -> Addrs {
        Addrs {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// A reset answering a packet with addresses `to` (no credit information).
pub fn rst_reply(to: &Addrs) -> Header {
    Header {
        addrs: to.reversed(),
        len: 0,
        op: Op::Rst,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            addrs: Addrs {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: 1234,
                dst_port: 5678,
            },
            len: 10,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(parse_header(&b), Ok(h));
        // Field offsets of virtio_vsock_hdr.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &1234u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        // Trailing payload bytes are not the header's business.
        let mut longer = b.to_vec();
        longer.extend_from_slice(&[0xff; 9]);
        assert_eq!(parse_header(&longer), Ok(h));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_header(&[]), Err(HeaderError::Short(0)));
        assert_eq!(parse_header(&[0; 43]), Err(HeaderError::Short(43)));
        let mut b = sample().to_bytes();
        b[28] = 2; // SEQPACKET
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::Type { ty: 2, addrs }) if addrs.src_port == 1234
        ));
        let mut b = sample().to_bytes();
        b[30] = 0;
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::Op { op: 0, .. })
        ));
        b[30] = 8;
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::Op { op: 8, .. })
        ));
        // Every byte pattern parses or fails cleanly.
        for seed in 0u32..2000 {
            let bytes: Vec<u8> = (0..(seed % 50))
                .map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            let _ = parse_header(&bytes);
        }
    }

    #[test]
    fn rst_reply_swaps_ends() {
        let h = sample();
        let r = rst_reply(&h.addrs);
        assert_eq!(r.op, Op::Rst);
        assert_eq!(r.addrs.src_cid, HOST_CID);
        assert_eq!(r.addrs.dst_cid, 3);
        assert_eq!(r.addrs.src_port, 5678);
        assert_eq!(r.addrs.dst_port, 1234);
    }
}
