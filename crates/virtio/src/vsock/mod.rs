//! virtio-vsock: under construction.
