//! virtio-block: under construction.
