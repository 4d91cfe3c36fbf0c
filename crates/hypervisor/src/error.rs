use std::path::PathBuf;

/// Errors from the KVM layer. Each names the operation that failed so a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {0}: {1} (is the kvm module loaded and are you allowed to use it?)")]
    OpenKvm(PathBuf, #[source] std::io::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] std::io::Error),
    #[error("the host's KVM lacks {0}, which Keel needs")]
    MissingCapability(&'static str),
    #[error("no free interrupt routes (GSIs) left in this VM")]
    OutOfGsis,
    #[error("guest memory slot at {guest_addr:#x} ({size:#x} bytes) rejected: {source}")]
    MemorySlot {
        guest_addr: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<kvm_ioctls::Error> for Error {
    fn from(e: kvm_ioctls::Error) -> Self {
        Error::Ioctl("KVM ioctl", e.into())
    }
}
