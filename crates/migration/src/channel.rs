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

/// One direction of a channel: its cipher and frame counter, the buffer its frames are
/// sealed or opened in (kept, so a stream of 1 MiB frames allocates and faults in its buffer
/// once), and the bytes that went through it (ciphertext).
struct Half {
    dir: Direction,
    buf: Vec<u8>,
    bytes: u64,
}

impl Half {
    fn new(cipher: Aes256Gcm) -> Half {
        Half {
            dir: Direction { cipher, counter: 0 },
            buf: Vec::new(),
            bytes: GREETING as u64,
        }
    }

    /// Starts the next frame in `buf`: room for its length, then the plaintext is appended.
    fn begin(&mut self) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        &mut self.buf
    }

    /// Seals the plaintext appended since [`Half::begin`] and writes the frame (one write).
    fn seal_to<W: Write>(&mut self, w: &mut W) -> Result<()> {
        let plain = self.buf.len().saturating_sub(4);
        if plain > MAX_FRAME {
            return Err(Error::FrameTooLarge(plain));
        }
        let len = u32::try_from(plain + TAG).map_err(|_| Error::FrameTooLarge(plain))?;
        self.dir.seal(&mut self.buf, len)?;
        w.write_all(&self.buf).map_err(Error::Io)?;
        self.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Reads the next frame into `buf` and decrypts it there; the plaintext's length.
    fn open_from<R: Read>(&mut self, r: &mut R) -> Result<usize> {
        let mut aad = [0u8; 4];
        read_full(r, &mut aad, true)?;
        let len = u32::from_le_bytes(aad) as usize;
        if len > MAX_FRAME + TAG {
            return Err(Error::FrameTooLarge(len));
        }
        if len < TAG {
            return Err(Error::Authentication);
        }
        self.buf.resize(len, 0);
        read_full(r, &mut self.buf, false)?;
        self.bytes += (4 + len) as u64;
        self.dir.open(aad, &mut self.buf)
    }

    fn plain(&self, n: usize) -> &[u8] {
        self.buf.get(..n).unwrap_or_default()
    }

    fn send<W: Write>(&mut self, w: &mut W, m: &crate::Message) -> Result<()> {
        m.encode_into(self.begin());
        self.seal_to(w)
    }

    fn send_pages<W: Write>(&mut self, w: &mut W, first_page: u64, data: &[u8]) -> Result<()> {
        crate::message::encode_pages(self.begin(), first_page, data);
        self.seal_to(w)
    }

    fn recv<R: Read>(&mut self, r: &mut R) -> Result<crate::Message> {
        let n = self.open_from(r)?;
        crate::Message::decode(self.plain(n))
    }

    fn recv_incoming<R: Read>(&mut self, r: &mut R) -> Result<crate::Incoming<'_>> {
        let n = self.open_from(r)?;
        crate::Incoming::decode(self.plain(n))
    }
}

/// An authenticated, encrypted migration stream over `S` (a TCP connection).
pub struct Channel<S> {
    stream: S,
    tx: Half,
    rx: Half,
}

/// A stream that can be cloned into a second handle, one per direction.
pub trait Duplex: Read + Write + Sized {
    fn try_clone(&self) -> std::io::Result<Self>;
}

impl Duplex for std::net::TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
}

impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
}

/// The sending direction of a [`Channel::split`] channel (one thread may send while another
/// receives).
pub struct ChannelTx<S> {
    stream: S,
    tx: Half,
}

/// The receiving direction of a [`Channel::split`] channel.
pub struct ChannelRx<S> {
    stream: S,
    rx: Half,
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
            tx: Half::new(send),
            rx: Half::new(recv),
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
        self.tx.begin().extend_from_slice(plain);
        self.tx.seal_to(&mut self.stream)
    }

    /// Receives one frame; [`Error::Closed`] if the peer closed the connection between frames.
    pub fn recv_frame(&mut self) -> Result<Vec<u8>> {
        let n = self.rx.open_from(&mut self.stream)?;
        Ok(self.rx.plain(n).to_vec())
    }

    /// Sends `m`.
    pub fn send(&mut self, m: &crate::Message) -> Result<()> {
        self.tx.send(&mut self.stream, m)
    }

    /// Sends guest pages from `first_page` on (what [`crate::Message::Pages`] carries),
    /// without a copy of them in a message first.
    pub fn send_pages(&mut self, first_page: u64, data: &[u8]) -> Result<()> {
        self.tx.send_pages(&mut self.stream, first_page, data)
    }

    /// Receives the next message.
    pub fn recv(&mut self) -> Result<crate::Message> {
        self.rx.recv(&mut self.stream)
    }

    /// Receives the next message, guest pages left where they were decrypted: valid until
    /// the next call.
    pub fn recv_incoming(&mut self) -> Result<crate::Incoming<'_>> {
        self.rx.recv_incoming(&mut self.stream)
    }

    /// Flushes what was written.
    pub fn flush(&mut self) -> Result<()> {
        self.stream.flush().map_err(Error::Io)
    }

    /// The stream underneath (e.g. to set a timeout or shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Bytes sent (ciphertext and greeting), for the summary.
    pub fn sent_bytes(&self) -> u64 {
        self.tx.bytes
    }

    /// Bytes received (ciphertext and greeting).
    pub fn received_bytes(&self) -> u64 {
        self.rx.bytes
    }
}

impl<S: Duplex> Channel<S> {
    /// Splits the channel into its two directions, each with a handle on the stream, for a
    /// sender and a receiver thread. Frame counters go on where they were.
    pub fn split(self) -> Result<(ChannelTx<S>, ChannelRx<S>)> {
        let other = self.stream.try_clone().map_err(Error::Io)?;
        Ok((
            ChannelTx {
                stream: other,
                tx: self.tx,
            },
            ChannelRx {
                stream: self.stream,
                rx: self.rx,
            },
        ))
    }
}

impl<S: Write> ChannelTx<S> {
    /// Sends `m`.
    pub fn send(&mut self, m: &crate::Message) -> Result<()> {
        self.tx.send(&mut self.stream, m)
    }

    /// Sends guest pages from `first_page` on.
    pub fn send_pages(&mut self, first_page: u64, data: &[u8]) -> Result<()> {
        self.tx.send_pages(&mut self.stream, first_page, data)
    }

    /// Flushes what was written.
    pub fn flush(&mut self) -> Result<()> {
        self.stream.flush().map_err(Error::Io)
    }

    pub fn sent_bytes(&self) -> u64 {
        self.tx.bytes
    }

    /// The stream underneath (e.g. to shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: Read> ChannelRx<S> {
    /// Receives the next message.
    pub fn recv(&mut self) -> Result<crate::Message> {
        self.rx.recv(&mut self.stream)
    }

    /// Receives the next message, guest pages left where they were decrypted.
    pub fn recv_incoming(&mut self) -> Result<crate::Incoming<'_>> {
        self.rx.recv_incoming(&mut self.stream)
    }

    pub fn received_bytes(&self) -> u64 {
        self.rx.bytes
    }

    /// The stream underneath (e.g. to shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
