//! Unit and interoperability tests (temp files; `qemu-img`/`qemu-io` when installed).

mod corrupt;
mod engine;
mod qcow2;
mod qemu;
mod raw;
mod util;
