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
use aes_gcm::aead::{Aead, KeyInit, Payload};
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

/// An authenticated, encrypted migration stream over `S` (a TCP connection).
pub struct Channel<S> {
    stream: S,
    send: Direction,
    recv: Direction,
    /// Frames and bytes sent and received (ciphertext), for the summary.
    pub sent_bytes: u64,
    pub received_bytes: u64,
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
        if plain.len() > MAX_FRAME {
            return Err(Error::FrameTooLarge(plain.len()));
        }
        let len =
            u32::try_from(plain.len() + TAG).map_err(|_| Error::FrameTooLarge(plain.len()))?;
        let aad = len.to_le_bytes();
        let nonce = self.send.nonce()?;
        let sealed = self
            .send
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Authentication)?;
        self.stream.write_all(&aad).map_err(Error::Io)?;
        self.stream.write_all(&sealed).map_err(Error::Io)?;
        self.sent_bytes += (aad.len() + sealed.len()) as u64;
        Ok(())
    }

    /// Receives one frame; [`Error::Closed`] if the peer closed the connection between frames.
    pub fn recv_frame(&mut self) -> Result<Vec<u8>> {
        let mut aad = [0u8; 4];
        read_full(&mut self.stream, &mut aad, true)?;
        let len = u32::from_le_bytes(aad) as usize;
        if len > MAX_FRAME + TAG {
            return Err(Error::FrameTooLarge(len));
        }
        if len < TAG {
            return Err(Error::Authentication);
        }
        let mut sealed = vec![0u8; len];
        read_full(&mut self.stream, &mut sealed, false)?;
        self.received_bytes += (4 + len) as u64;
        let nonce = self.recv.nonce()?;
        self.recv
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: &sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Authentication)
    }

    /// Sends `m`.
    pub fn send(&mut self, m: &crate::Message) -> Result<()> {
        let bytes = m.encode();
        self.send_frame(&bytes)
    }

    /// Receives the next message.
    pub fn recv(&mut self) -> Result<crate::Message> {
        let f = self.recv_frame()?;
        crate::Message::decode(&f)
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
