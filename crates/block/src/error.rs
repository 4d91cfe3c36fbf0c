//! The one error type of this crate.
//!
//! Every message names the image it is about (its path, or `<memory>` for in-memory images)
//! and says what the user can do where there is something to do.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout `keel-block`.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong with a disk image or a request on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file could not be opened or created.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Another process (another VM, `qemu-img`, ...) holds a conflicting lock on the image.
    #[error(
        "disk image {path} is in use: another process holds a {held} lock on it (open it \
         read-only, or stop the other user first)"
    )]
    Locked {
        /// The file.
        path: PathBuf,
        /// "shared" or "exclusive": the lock the other process must be holding.
        held: &'static str,
    },
    /// A host I/O call on the image failed.
    #[error("{image}: {op} at offset {offset} failed: {source}")]
    Io {
        /// Which image.
        image: String,
        /// What we were doing ("read", "write", "flush", ...).
        op: &'static str,
        /// Byte offset in the host file (or the virtual disk for request-level errors).
        offset: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A request reaches outside the virtual disk.
    #[error("{image}: request at offset {offset} of {len} bytes is outside the {size}-byte disk")]
    OutOfRange {
        /// Which image.
        image: String,
        /// Request start (bytes).
        offset: u64,
        /// Request length (bytes).
        len: u64,
        /// Virtual disk size (bytes).
        size: u64,
    },
    /// A write-type request on an image opened read-only.
    #[error("{image}: the disk is read-only")]
    ReadOnly {
        /// Which image.
        image: String,
    },
    /// The guest tried to write a known image-format signature into the first sector of a raw
    /// image whose format was guessed rather than given (see [`crate::open_image`]).
    #[error(
        "{image}: refused a write that would make this raw image look like {format} (the format \
         was autodetected; open it with format=raw explicitly to allow such writes)"
    )]
    ProbedRawSignature {
        /// Which image.
        image: String,
        /// The format the first sector would have matched.
        format: &'static str,
    },
    /// The image is not a valid image of its format (bad header, table pointing outside the
    /// file, ...). The file is damaged or was not written by a qcow2 implementation.
    #[error("{image}: corrupt qcow2 image: {reason} (`qemu-img check` may tell more)")]
    Corrupt {
        /// Which image.
        image: String,
        /// What exactly is wrong.
        reason: String,
    },
    /// The image uses a feature this implementation does not have.
    #[error("{image}: unsupported qcow2 feature: {feature}")]
    Unsupported {
        /// Which image.
        image: String,
        /// The feature and, where there is one, the way around it.
        feature: String,
    },
    /// Opening the image read-write is not allowed in its current state.
    #[error("{image}: cannot open read-write: {reason}")]
    NeedsReadOnly {
        /// Which image.
        image: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The backing file of a qcow2 image could not be opened.
    #[error("{image}: cannot open its backing file: {source}")]
    Backing {
        /// The overlay.
        image: String,
        /// Why the backing file did not open.
        #[source]
        source: Box<Error>,
    },
    /// The backing chain is longer than [`crate::MAX_BACKING_DEPTH`] (or loops).
    #[error("{image}: backing chain deeper than {max} images (a loop in the backing files?)")]
    BackingChainTooDeep {
        /// The image whose backing file would exceed the limit.
        image: String,
        /// The limit.
        max: usize,
    },
    /// An image has a backing file where none may be opened (in-memory images).
    #[error("{image}: has backing file {backing:?}, but backing files cannot be opened here")]
    BackingNotAllowed {
        /// Which image.
        image: String,
        /// The backing file name recorded in the image.
        backing: String,
    },
    /// The format was given but the file is not of that format.
    #[error("{image}: not a {expected} image ({reason})")]
    WrongFormat {
        /// Which image.
        image: String,
        /// The format asked for.
        expected: &'static str,
        /// What was found instead.
        reason: String,
    },
    /// A creation request that cannot be satisfied.
    #[error("cannot create {path}: {reason}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Invalid arguments to an API call.
    #[error("{0}")]
    InvalidArgument(String),
    /// The I/O engine has stopped and takes no more requests.
    #[error("the block I/O engine has stopped")]
    EngineStopped,
}

impl Error {
    pub(crate) fn io(image: &str, op: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            image: image.to_string(),
            op,
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(image: &str, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            image: image.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(image: &str, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            image: image.to_string(),
            feature: feature.into(),
        }
    }
}
