//! The seccomp filter of each VMM thread kind (`keel-seccomp`), applied first thing on every
//! thread the VMM and its devices start when the VM's config asks for it.
//!
//! A thread that cannot install its filter must not run unconfined: it reports the error and
//! does no work (the device is marked broken; a vCPU or the event loop stops the VM).

use keel_seccomp::ThreadKind;

fn hook(kind: ThreadKind) -> Result<(), String> {
    keel_seccomp::apply(kind).map_err(|e| e.to_string())
}

fn device_thread() -> Result<(), String> {
    hook(ThreadKind::Device)
}

fn block_io_thread() -> Result<(), String> {
    hook(ThreadKind::BlockIo)
}

/// What device threads run first: their filter, or nothing when seccomp is off.
pub(crate) fn device_hooks(enabled: bool) -> keel_virtio::ThreadHooks {
    if !enabled {
        return keel_virtio::ThreadHooks::default();
    }
    keel_virtio::ThreadHooks {
        device: Some(device_thread),
        block_io: Some(block_io_thread),
    }
}

/// Applies the filter of `kind` to the calling thread if `enabled`.
pub(crate) fn apply(enabled: bool, kind: ThreadKind) -> Result<(), String> {
    if enabled {
        hook(kind)
    } else {
        Ok(())
    }
}
