//! The i8042 keyboard controller, reduced to what guests use it for here: the CPU reset line
//! (command 0xfe on port 0x64), which is how Linux reboots with `reboot=k`.

use crate::{BusDevice, PlatformEvents, StopRequest};
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

struct ResetTrigger(Arc<dyn PlatformEvents>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_stop(StopRequest::Reset, "i8042 reset");
        Ok(())
    }
}

/// Occupies ports 0x60..0x65 (offset 0 = data port 0x60, offset 4 = command/status port 0x64).
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub const BASE: u16 = 0x60;
    pub const LEN: u16 = 5;

    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(events)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.dev.write(off, v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Events(pub Mutex<Vec<(StopRequest, &'static str)>>);
    impl PlatformEvents for Events {
        fn request_stop(&self, r: StopRequest, s: &'static str) {
            self.0.lock().unwrap().push((r, s));
        }
    }

    #[test]
    fn reset_command_requests_reset() {
        let ev = Arc::new(Events::default());
        let mut k = I8042::new(ev.clone());
        k.write(4, &[0xaa]);
        k.write(0, &[0xfe]);
        assert!(ev.0.lock().unwrap().is_empty());
        k.write(4, &[0xfe]);
        assert_eq!(
            ev.0.lock().unwrap().as_slice(),
            &[(StopRequest::Reset, "i8042 reset")]
        );
        let mut st = [0xffu8];
        k.read(4, &mut st);
        assert_eq!(st[0], 0);
    }
}
