//! 16550A UART (COM port) on vm-superio, with its interrupt on an irqfd.

use crate::BusDevice;
use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt line by writing to an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port's output: anything that takes bytes (the console, a file, a test buffer).
pub type SerialOut = Box<dyn Write + Send>;

/// A COM port: 8 registers at (for COM1) I/O port 0x3f8, IRQ 4.
pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, SerialOut>,
    /// Bytes the guest wrote that the output refused (e.g. a closed pipe): counted, not fatal.
    lost_output: u64,
}

impl Serial {
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Serial {
            uart: Uart::new(IrqTrigger(irq), out),
            lost_output: 0,
        }
    }

    /// Queues console input for the guest. Returns how many bytes fit in the receive FIFO;
    /// the caller keeps the rest and retries once the guest has read some.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Output bytes lost to write errors so far.
    pub fn lost_output(&self) -> u64 {
        self.lost_output
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if self.uart.write(off, v).is_err() {
                self.lost_output += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_with_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then queue input.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8; 2];
        s.read(0, &mut rbr);
        assert_eq!(rbr, [b'o', 0]);
    }

    #[test]
    fn fifo_overflow_is_reported_not_lost() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        let big = vec![b'x'; 1000];
        let n = s.enqueue_input(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(&big[n..]), 0);
    }

    #[test]
    fn odd_offsets_and_widths_are_harmless() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        let mut d = [0xffu8; 4];
        s.read(300, &mut d);
        s.write(300, &[1, 2]);
        s.write(0, &[]);
        s.read(7, &mut []);
    }
}
