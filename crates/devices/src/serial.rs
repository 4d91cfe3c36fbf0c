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

/// The UART's registers and receive FIFO, as plain data for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
}

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

    /// A port in the state `snap` recorded; a FIFO over 64 bytes is refused. Raises the
    /// interrupt the state has pending, as the port would have.
    pub fn from_snapshot(
        irq: EventFd,
        out: SerialOut,
        snap: &SerialSnapshot,
    ) -> Result<Self, String> {
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let uart =
            Uart::from_state(&st, IrqTrigger(irq), NoEvents, out).map_err(|e| format!("{e:?}"))?;
        Ok(Serial {
            uart,
            lost_output: 0,
        })
    }

    /// The port's state, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let st = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
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

    #[test]
    fn state_survives_a_snapshot_and_bad_state_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(std::io::sink()));
        s.write(1, &[0x01]); // received-data interrupt on
        s.write(7, &[0x5a]); // scratch
        s.enqueue_input(b"abc");
        let snap = s.save_state();
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r =
            Serial::from_snapshot(irq2.try_clone().unwrap(), Box::new(std::io::sink()), &back)
                .unwrap();
        // The pending received-data interrupt is raised again.
        assert!(irq2.read().unwrap() >= 1);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let too_much = SerialSnapshot {
            in_buffer: vec![0; 1000],
            ..back
        };
        let irq3 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(Serial::from_snapshot(irq3, Box::new(std::io::sink()), &too_much).is_err());
    }
}
