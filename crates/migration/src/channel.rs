//! The channel: greeting, keys, frames.
//!
//! Each end sends a 48-byte greeting: `KEELMIG\0`, the version (u32 LE), its role (0 sender,
//! 1 receiver), three zero bytes and 32 random bytes. Both then derive two AES-256-GCM keys
//! with HKDF-SHA256 from the pre-shared key, salted with the sender's and the receiver's
//! random bytes, one per direction. The first frame each way is the SHA-256 of both
//! greetings: an end without the key fails to decrypt it, and a greeting changed on the way
//! makes the two transcripts differ. A frame is its ciphertext length (u32 LE, also the
//! AEAD's associated data) and the ciphertext with its 16-byte tag; the nonce is the frame's
//! number in its direction, so nothing can be dropped, repeated or moved without the next
//! frame failing.

use crate::{Error, Result, MAX_FRAME, VERSION};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"KEELMIG\0";
const GREETING: usize = 48;
const TAG: usize = 16;
/// The shortest pre-shared key accepted (bytes).
pub const KEY_MIN: usize = 16;

/// Which end of the stream this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Sender => 0,
            Role::Receiver => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }
}

struct Direction {
    cipher: Aes256Gcm,
    counter: u64,
}

impl Direction {
    fn nonce(&mut self) -> Result<Nonce<aes_gcm::aes::cipher::consts::U12>> {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_le_bytes());
        // 2^64 frames never happen; refuse rather than reuse a nonce.
        self.counter = self.counter.checked_add(1).ok_or(Error::Authentication)?;
        Ok(*Nonce::from_slice(&n))
    }
}

// The crypto is here, outside the generic `Channel`, so it is compiled (and optimised) in
// this crate whatever stream it is used with.
impl Direction {
    /// Encrypts `frame[4..]` in place, writes `len` (which counts the tag) into `frame[..4]`
    /// and appends the tag.
    fn seal(&mut self, frame: &mut Vec<u8>, len: u32) -> Result<()> {
        let aad = len.to_le_bytes();
        let nonce = self.nonce()?;
        let (head, body) = frame
            .split_at_mut_checked(4)
            .ok_or(Error::FrameTooLarge(0))?;
        head.copy_from_slice(&aad);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &aad, body)
            .map_err(|_| Error::Authentication)?;
        frame.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts `frame` (ciphertext and tag, its length `aad`) in place; the plaintext's
    /// length (at its start).
    fn open(&mut self, aad: [u8; 4], frame: &mut [u8]) -> Result<usize> {
        let body_len = frame.len().checked_sub(TAG).ok_or(Error::Authentication)?;
        let nonce = self.nonce()?;
        let (body, tag) = frame.split_at_mut(body_len);
        let tag = aes_gcm::Tag::clone_from_slice(tag);
        self.cipher
            .decrypt_in_place_detached(&nonce, &aad, body, &tag)
            .map_err(|_| Error::Authentication)?;
        Ok(body_len)
    }
}

/// An authenticated, encrypted migration stream over `S` (a TCP connection).
pub struct Channel<S> {
    stream: S,
    send: Direction,
    recv: Direction,
    /// Frames and bytes sent and received (ciphertext), for the summary.
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// The frame being sealed, and the last one opened: kept, so a stream of 1 MiB frames
    /// allocates (and faults in) its buffers once.
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
}

fn random(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or_default();
        // SAFETY: getrandom writes at most `rest.len()` bytes into the live slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Random(e));
        }
        done += n as usize;
    }
    Ok(())
}

fn read_full<S: Read>(s: &mut S, buf: &mut [u8], first: bool) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) if got == 0 && first => return Err(Error::Closed),
            Ok(0) => return Err(Error::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(())
}

impl<S: Read + Write> Channel<S> {
    /// Greets the peer and agrees on keys; fails unless the peer holds `key` and plays the
    /// other role.
    pub fn handshake(mut stream: S, role: Role, key: &[u8]) -> Result<Channel<S>> {
        if key.len() < KEY_MIN {
            return Err(Error::ShortKey);
        }
        let mut mine = [0u8; GREETING];
        mine[..8].copy_from_slice(MAGIC);
        mine[8..12].copy_from_slice(&VERSION.to_le_bytes());
        mine[12] = role.byte();
        random(&mut mine[16..])?;
        stream.write_all(&mine).map_err(Error::Io)?;
        stream.flush().map_err(Error::Io)?;
        let mut theirs = [0u8; GREETING];
        read_full(&mut stream, &mut theirs, true)?;
        if &theirs[..8] != MAGIC || theirs[13..16] != [0, 0, 0] {
            return Err(Error::NotKeel);
        }
        let version = u32::from_le_bytes([theirs[8], theirs[9], theirs[10], theirs[11]]);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        if theirs[12] == role.byte() {
            return Err(Error::SameRole(role.name()));
        }
        if theirs[12] > 1 {
            return Err(Error::NotKeel);
        }
        let (s_hello, r_hello) = match role {
            Role::Sender => (&mine, &theirs),
            Role::Receiver => (&theirs, &mine),
        };
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&s_hello[16..]);
        salt[32..].copy_from_slice(&r_hello[16..]);
        let hk = hkdf::Hkdf::<Sha256>::new(Some(&salt), key);
        let derive = |info: &[u8]| -> Result<Aes256Gcm> {
            let mut k = [0u8; 32];
            hk.expand(info, &mut k).map_err(|_| Error::Authentication)?;
            Aes256Gcm::new_from_slice(&k).map_err(|_| Error::Authentication)
        };
        let s_to_r = derive(b"keel migration v1 sender to receiver")?;
        let r_to_s = derive(b"keel migration v1 receiver to sender")?;
        let (send, recv) = match role {
            Role::Sender => (s_to_r, r_to_s),
            Role::Receiver => (r_to_s, s_to_r),
        };
        let mut ch = Channel {
            stream,
            send: Direction {
                cipher: send,
                counter: 0,
            },
            recv: Direction {
                cipher: recv,
                counter: 0,
            },
            sent_bytes: GREETING as u64,
            received_bytes: GREETING as u64,
            sbuf: Vec::new(),
            rbuf: Vec::new(),
        };
        let mut transcript = Sha256::new();
        transcript.update(s_hello);
        transcript.update(r_hello);
        let transcript = transcript.finalize();
        ch.send_frame(&transcript)?;
        let echo = match ch.recv_frame() {
            Ok(f) => f,
            // A peer that dropped the connection after our greeting most likely refused it.
            Err(Error::Closed) | Err(Error::Truncated) => return Err(Error::Authentication),
            Err(e) => return Err(e),
        };
        if echo.as_slice() != transcript.as_slice() {
            return Err(Error::Authentication);
        }
        Ok(ch)
    }

    /// Sends one frame of at most [`MAX_FRAME`] bytes.
    pub fn send_frame(&mut self, plain: &[u8]) -> Result<()> {
        self.begin_frame();
        self.sbuf.extend_from_slice(plain);
        self.seal_and_send()
    }

    /// Starts the next frame in `sbuf`: room for its length, then the plaintext is appended.
    fn begin_frame(&mut self) {
        self.sbuf.clear();
        self.sbuf.extend_from_slice(&[0; 4]);
    }

    /// Encrypts the plaintext in `sbuf` in place, puts the length in front and the tag
    /// behind, and writes the frame (one write).
    fn seal_and_send(&mut self) -> Result<()> {
        let plain = self.sbuf.len().saturating_sub(4);
        if plain > MAX_FRAME {
            return Err(Error::FrameTooLarge(plain));
        }
        let len = u32::try_from(plain + TAG).map_err(|_| Error::FrameTooLarge(plain))?;
        self.send.seal(&mut self.sbuf, len)?;
        self.stream.write_all(&self.sbuf).map_err(Error::Io)?;
        self.sent_bytes += self.sbuf.len() as u64;
        Ok(())
    }

    /// Receives one frame; [`Error::Closed`] if the peer closed the connection between frames.
    pub fn recv_frame(&mut self) -> Result<Vec<u8>> {
        let n = self.open_next()?;
        Ok(self.rbuf.get(..n).unwrap_or_default().to_vec())
    }

    /// Reads the next frame into `rbuf` and decrypts it there; the plaintext's length.
    fn open_next(&mut self) -> Result<usize> {
        let mut aad = [0u8; 4];
        read_full(&mut self.stream, &mut aad, true)?;
        let len = u32::from_le_bytes(aad) as usize;
        if len > MAX_FRAME + TAG {
            return Err(Error::FrameTooLarge(len));
        }
        if len < TAG {
            return Err(Error::Authentication);
        }
        self.rbuf.resize(len, 0);
        read_full(&mut self.stream, &mut self.rbuf, false)?;
        self.received_bytes += (4 + len) as u64;
        self.recv.open(aad, &mut self.rbuf)
    }

    /// Sends `m`.
    pub fn send(&mut self, m: &crate::Message) -> Result<()> {
        self.begin_frame();
        m.encode_into(&mut self.sbuf);
        self.seal_and_send()
    }

    /// Sends guest pages from `first_page` on (what [`crate::Message::Pages`] carries),
    /// without a copy of them in a message first.
    pub fn send_pages(&mut self, first_page: u64, data: &[u8]) -> Result<()> {
        self.begin_frame();
        crate::message::encode_pages(&mut self.sbuf, first_page, data);
        self.seal_and_send()
    }

    /// Receives the next message.
    pub fn recv(&mut self) -> Result<crate::Message> {
        let n = self.open_next()?;
        crate::Message::decode(self.rbuf.get(..n).unwrap_or_default())
    }

    /// Receives the next message, guest pages left where they were decrypted: valid until
    /// the next call.
    pub fn recv_incoming(&mut self) -> Result<crate::Incoming<'_>> {
        let n = self.open_next()?;
        crate::Incoming::decode(self.rbuf.get(..n).unwrap_or_default())
    }

    /// Flushes what was written.
    pub fn flush(&mut self) -> Result<()> {
        self.stream.flush().map_err(Error::Io)
    }

    /// The stream underneath (e.g. to set a timeout or shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
