//! A snapshot's device state is untrusted: whatever it says, `VirtioPciDevice::restore_state`
//! on a freshly built device must refuse it with an error or restore it, and a restored
//! device must resume, pause and save again, without panicking or hanging.
//!
//! Input: byte 0 picks the device (even: rng, odd: balloon). Byte 1 bit 0 set: the rest is
//! JSON for a `VirtioPciState`. Otherwise the rest overwrites fields of the state a fresh
//! device saves (status, features, vectors, queue registers and positions, BAR), so most
//! inputs get past the parser.
#![no_main]

use keel_pci::{BarAllocator, MsiRouter};
use keel_virtio::balloon::Balloon;
use keel_virtio::rng::Rng;
use keel_virtio::{DeviceRuntime, IoEvents, VirtioDevice, VirtioPciDevice, VirtioPciState};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

struct Msi;
impl MsiRouter for Msi {
    fn allocate_vector(&self) -> Result<(u32, EventFd), String> {
        Ok((1, EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?))
    }
    fn set_route(&self, _: u32, _: Option<keel_hypervisor::MsiMessage>) -> Result<(), String> {
        Ok(())
    }
}
struct Io;
impl IoEvents for Io {
    fn register(&self, _: &EventFd, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn unregister(&self, _: &EventFd, _: u64) -> Result<(), String> {
        Ok(())
    }
}

fn device(balloon: bool) -> VirtioPciDevice {
    let mem = keel_virtio::GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
    let dev: Box<dyn VirtioDevice> = if balloon {
        Box::new(Balloon::new(false).0)
    } else {
        Box::new(Rng::new())
    };
    let mut bars = BarAllocator::new(0xc000_0000, 0x10_0000).unwrap();
    let (msi, io) = (std::sync::Arc::new(Msi), std::sync::Arc::new(Io));
    VirtioPciDevice::new(dev, mem, msi, io, &mut bars, DeviceRuntime::inline()).unwrap()
}

/// Overwrites fields of `s` from `b`.
fn mutate(s: &mut VirtioPciState, b: &[u8]) {
    let mut it = b.iter().copied();
    let u16_ = |it: &mut dyn Iterator<Item = u8>| {
        u16::from_le_bytes([it.next().unwrap_or(0), it.next().unwrap_or(0)])
    };
    s.status = it.next().unwrap_or(0);
    s.activated = it.next().unwrap_or(0) & 1 != 0;
    s.isr = it.next().unwrap_or(0) & 3;
    s.driver_features = u64::from(u16_(&mut it)) | 1 << 32 | u64::from(it.next().unwrap_or(0)) << 24;
    s.config_vector = u16_(&mut it);
    for i in 0..s.queues.len() {
        if let Some(v) = s.queue_vectors.get_mut(i) {
            *v = u16_(&mut it);
        }
        let q = &mut s.queues[i];
        q.size = u16_(&mut it);
        q.ready = it.next().unwrap_or(0) & 1 != 0;
        q.next_avail = u16_(&mut it);
        q.next_used = u16_(&mut it);
        q.desc_table = u64::from(u16_(&mut it));
        q.avail_ring = u64::from(u16_(&mut it));
        q.used_ring = u64::from(u16_(&mut it));
    }
    if let Some(r) = s.pci.regs.get_mut(4) {
        *r = u32::from(u16_(&mut it)) << 16;
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let balloon = data[0] & 1 != 0;
    let state = if data[1] & 1 != 0 {
        match serde_json::from_slice::<VirtioPciState>(&data[2..]) {
            Ok(s) => s,
            Err(_) => return,
        }
    } else {
        let mut s = device(balloon).save_state().unwrap();
        mutate(&mut s, &data[2..]);
        s
    };
    let mut dev = device(balloon);
    if dev.restore_state(&state).is_ok() {
        let _ = dev.resume();
        let _ = dev.pause();
        let _ = dev.save_state();
    }
});
