//! The host side of the bridge: the listening Unix socket, connections to
//! `<uds_path>_<port>`, and the `CONNECT <port>\n` handshake.

use super::VsockError;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest handshake line accepted, newline included (`CONNECT 4294967295\n` is 19).
pub const MAX_HANDSHAKE_LINE: usize = 32;

/// The listening socket and the identity of the file it created, so that dropping the
/// device removes its own socket file and never one that replaced it.
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    dev_ino: (u64, u64),
}

impl BoundSocket {
    /// Binds a non-blocking listener at `path`. An existing socket file nobody listens on
    /// (left by a dead process) is replaced; a live socket or any other file is an error.
    pub fn bind(path: &Path) -> Result<BoundSocket, VsockError> {
        let err = |source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(VsockError::NotASocket(path.to_path_buf()))
            }
            // Non-blocking: a live listener with a full backlog answers WouldBlock.
            Ok(_) => match connect_nonblocking(path) {
                Ok(_) => return Err(VsockError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(VsockError::InUse(path.to_path_buf()))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!("vsock: removing stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            dev_ino: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// `<uds_path>_<port>`: where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the Unix socket at `path` without ever blocking: a listener with a full
/// backlog fails with `WouldBlock` instead of stalling the device thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // Keep room for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid, initialised sockaddr_un that outlives the call, and `len`
    // does not exceed its size (checked above).
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Writes to a host stream without raising SIGPIPE when the host closed it (EPIPE instead).
pub fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes for the duration of the
    // call, and `stream` owns an open socket.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// Where a host client's handshake stands after the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// No newline yet: read more.
    Incomplete,
    /// `CONNECT <port>\n` read; `rest` is what followed the newline (stream data).
    Connect { port: u32, rest: Vec<u8> },
    /// Not a valid handshake: close the client.
    Invalid,
}

/// Parses `CONNECT <port>\n` (decimal port, an optional `\r` before the newline).
pub fn parse_handshake(buf: &[u8]) -> Handshake {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_HANDSHAKE_LINE {
            Handshake::Invalid
        } else {
            Handshake::Incomplete
        };
    };
    if nl >= MAX_HANDSHAKE_LINE {
        return Handshake::Invalid;
    }
    let line = &buf[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let port = std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok());
    match port {
        Some(port) => Handshake::Connect {
            port,
            rest: buf[nl + 1..].to_vec(),
        },
        None => Handshake::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines() {
        assert_eq!(parse_handshake(b""), Handshake::Incomplete);
        assert_eq!(parse_handshake(b"CONNECT 52"), Handshake::Incomplete);
        assert_eq!(
            parse_handshake(b"CONNECT 52\n"),
            Handshake::Connect {
                port: 52,
                rest: vec![]
            }
        );
        assert_eq!(
            parse_handshake(b"CONNECT 4294967295\r\nhi"),
            Handshake::Connect {
                port: u32::MAX,
                rest: b"hi".to_vec()
            }
        );
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"connect 1\n",
            b"CONNECT 1 2\n",
            b"CONNECT  1\n",
            b"\xff\xfe\n",
            &[b'7'; MAX_HANDSHAKE_LINE],
        ] {
            assert_eq!(parse_handshake(bad), Handshake::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
        assert!(connect_nonblocking(&PathBuf::from("x".repeat(200))).is_err());
    }
}
