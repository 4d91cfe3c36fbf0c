//! Raw mode for an interactive serial console, restored on drop.

use std::os::fd::AsRawFd;

pub struct RawMode {
    saved: libc::termios,
}

/// Stdin's terminal settings, when stdin is a terminal.
fn stdin_settings() -> Option<libc::termios> {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: isatty on a valid fd number has no memory effects.
    if unsafe { libc::isatty(fd) } != 1 {
        return None;
    }
    // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a valid termios to fill for a terminal fd.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return None;
    }
    Some(saved)
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal; `None` otherwise (pipes, files, CI).
    pub fn enable_on_stdin() -> Option<RawMode> {
        let saved = stdin_settings()?;
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: applying a termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read from the same terminal in `enable_on_stdin`.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}

/// The terminal's settings as they were, put back on drop: for the supervisor of a VMM that
/// may die (killed by the kernel) with the terminal still raw.
pub struct Saved {
    _restore: RawMode,
}

impl Saved {
    pub fn capture() -> Option<Saved> {
        Some(Saved {
            _restore: RawMode {
                saved: stdin_settings()?,
            },
        })
    }
}
