//! virtio-net: under construction.
