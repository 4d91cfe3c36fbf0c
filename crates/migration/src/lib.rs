//! The live-migration stream (`docs/migration.md`): what one Keel VMM sends another over TCP
//! to move a running VM.
//!
//! - [`Channel`]: a pre-shared-key handshake, then AES-256-GCM frames, one key per direction
//!   and a counter nonce, so a stream from someone without the key, or a flipped, dropped,
//!   replayed or reordered byte, ends it with an error ([`Error`] says which).
//! - [`Message`]: what the frames carry (machine configuration, runs of guest pages, zero
//!   ranges, the end of a round, the saved state, the switch-over), each decoded with every
//!   length and count bounded: the receiver treats the stream as hostile.

mod channel;
mod message;

pub use channel::{Channel, ChannelRx, ChannelTx, Duplex, Role, KEY_MIN};

/// A pre-shared key as hex, for a control request that carries it.
pub fn key_to_hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pre-shared key from [`key_to_hex`]; `None` for anything but pairs of hex digits.
pub fn key_from_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
pub use message::{Incoming, Message, MAX_BLOB, MAX_RUN_PAGES, PAGE};

/// The largest frame (plaintext) a channel carries: a full run of pages and its header.
pub const MAX_FRAME: usize = MAX_BLOB + 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("migration stream: {0}")]
    Io(#[source] std::io::Error),
    #[error("migration stream: the peer is not a Keel migration endpoint (bad greeting)")]
    NotKeel,
    #[error("migration stream: the peer speaks version {0}; this Keel speaks version {VERSION}")]
    Version(u32),
    #[error("migration stream: both ends are {0}s")]
    SameRole(&'static str),
    #[error("migration stream: authentication failed — the peer does not have the migration key, or the stream was altered")]
    Authentication,
    #[error("migration stream: a frame of {0} bytes is larger than allowed")]
    FrameTooLarge(usize),
    #[error("migration stream: the connection ended in the middle of a frame")]
    Truncated,
    #[error("migration stream: the connection ended")]
    Closed,
    #[error("migration stream: malformed message: {0}")]
    Malformed(String),
    #[error("the migration key must be at least {KEY_MIN} bytes")]
    ShortKey,
    #[error("migration stream: cannot get random bytes: {0}")]
    Random(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The stream's protocol version.
pub const VERSION: u32 = 1;

#[cfg(test)]
mod key_tests {
    #[test]
    fn keys_travel_as_hex_and_nothing_else_decodes() {
        let key = b"\x00\xffkey";
        assert_eq!(
            super::key_from_hex(&super::key_to_hex(key)).as_deref(),
            Some(&key[..])
        );
        for bad in ["", "abc", "zz", "0g", "é0"] {
            assert_eq!(super::key_from_hex(bad), None, "{bad:?}");
        }
    }
}
