//! virtio-balloon: under construction.
