//! Swapping a paused block device's image (a snapshot freezes the current image and the VM
//! carries on on an overlay above it).

use crate::state::StateError;
use keel_block::DiskImage;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the device and its [`BlockControl`] share.
pub(crate) struct Backing {
    pub(crate) image: Arc<dyn DiskImage>,
    /// The data path runs (on `image`): the image cannot be swapped.
    pub(crate) running: bool,
}

/// Control of a block device from the VMM: swapping its image while it is paused (a
/// snapshot freezes the current image and carries on on an overlay above it).
#[derive(Clone)]
pub struct BlockControl {
    pub(crate) backing: Arc<Mutex<Backing>>,
    pub(crate) name: String,
}

pub(crate) fn lock(b: &Mutex<Backing>) -> MutexGuard<'_, Backing> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockControl {
    /// Makes `image` the device's disk from the next start (`resume`). Only while the data
    /// path is stopped (paused, or not started yet); the new image must have the same size
    /// and mode (read-only or not), which the driver negotiated with.
    pub fn replace_image(&self, image: Arc<dyn DiskImage>) -> Result<(), StateError> {
        let mut b = lock(&self.backing);
        let device = || format!("block {}", self.name);
        if b.running {
            return Err(StateError::NotPaused { device: device() });
        }
        let (old, new) = (b.image.size(), image.size());
        if old != new {
            return Err(StateError::ImageSize {
                device: device(),
                old,
                new,
            });
        }
        if b.image.read_only() != image.read_only() {
            return Err(StateError::ImageMode {
                device: device(),
                old_read_only: b.image.read_only(),
                new_read_only: image.read_only(),
            });
        }
        b.image = image;
        Ok(())
    }

    /// The image the device runs on (or will, from the next start).
    pub fn image(&self) -> Arc<dyn DiskImage> {
        lock(&self.backing).image.clone()
    }
}
