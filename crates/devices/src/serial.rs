//! The 16550A UART on a port bus, built on `vm-superio`'s register model.
//!
//! Output goes to the VM's [`ConsoleSink`]; input is queued by the event loop with
//! [`Serial16550::enqueue_input`]. The interrupt line is an `EventFd`, which the monitor binds to
//! an irqfd when the VM has an in-kernel irqchip.

use std::io;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleSink;

/// Base port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports a 16550 decodes.
pub const UART_PORTS: u64 = 8;

/// Raises the UART's interrupt by writing to an `EventFd`.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Adapts the sink to `io::Write` for `vm-superio`.
struct SinkWriter(Arc<ConsoleSink>);

impl io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct Serial16550 {
    inner: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, SinkWriter>>,
    /// Receive interrupts enabled by the guest: a driver is listening. Input offered before
    /// that would be lost when the driver resets the FIFO, so it waits.
    rx_enabled: std::sync::atomic::AtomicBool,
    /// Divisor-latch access bit of the line control register.
    dlab: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Serial16550 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serial16550")
    }
}

impl Serial16550 {
    pub fn new(irq: EventFd, sink: Arc<ConsoleSink>) -> Self {
        Self {
            inner: Mutex::new(Serial::new(IrqLine(irq), SinkWriter(sink))),
            rx_enabled: std::sync::atomic::AtomicBool::new(false),
            dlab: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Queues host input for the guest. Returns how many bytes fit in the receive FIFO (none
    /// until the guest enables receive interrupts); the caller keeps the rest and retries.
    pub fn enqueue_input(&self, input: &[u8]) -> usize {
        if !self.rx_enabled.load(std::sync::atomic::Ordering::Acquire) {
            return 0;
        }
        self.enqueue_now(input)
    }

    fn enqueue_now(&self, input: &[u8]) -> usize {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = s.fifo_capacity();
        let n = input.len().min(room);
        if n == 0 {
            return 0;
        }
        s.enqueue_raw_bytes(&input[..n]).unwrap_or(0)
    }
}

/// What a snapshot keeps of the UART: its registers and receive FIFO.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedSerial {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    regs: [u8; 9],
    in_buffer: Vec<u8>,
    rx_enabled: bool,
    dlab: bool,
}

/// Bytes the receive FIFO of vm-superio's UART holds.
const FIFO_SIZE: usize = 64;

impl crate::state::DeviceState for Serial16550 {
    fn save_state(&self) -> Vec<u8> {
        use std::sync::atomic::Ordering;
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner()).state();
        crate::state::encode(&SavedSerial {
            regs: [
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
            rx_enabled: self.rx_enabled.load(Ordering::Acquire),
            dlab: self.dlab.load(Ordering::Acquire),
        })
    }

    fn restore_state(&self, data: &[u8]) -> Result<(), crate::state::StateError> {
        use std::sync::atomic::Ordering;
        let saved: SavedSerial = crate::state::decode("serial", data)?;
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(crate::state::StateError::Malformed {
                device: "serial",
                why: format!("{} bytes in a {FIFO_SIZE}-byte FIFO", saved.in_buffer.len()),
            });
        }
        let r = saved.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: saved.in_buffer,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (irq, out) = (
            inner.interrupt_evt().0.try_clone(),
            inner.writer().0.clone(),
        );
        let irq = irq.map_err(|e| crate::state::StateError::Mismatch {
            device: "serial",
            why: format!("cannot share the interrupt eventfd: {e}"),
        })?;
        *inner = Serial::from_state(
            &state,
            IrqLine(irq),
            vm_superio::serial::NoEvents,
            SinkWriter(out),
        )
        .map_err(|e| crate::state::StateError::Malformed {
            device: "serial",
            why: format!("{e:?}"),
        })?;
        self.rx_enabled.store(saved.rx_enabled, Ordering::Release);
        self.dlab.store(saved.dlab, Ordering::Release);
        Ok(())
    }
}

impl crate::BusDevice for Serial16550 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) else {
            return;
        };
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *first = s.read(off);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        use std::sync::atomic::Ordering;
        let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        match off {
            3 => self.dlab.store(b & 0x80 != 0, Ordering::Release),
            1 if !self.dlab.load(Ordering::Acquire) => {
                self.rx_enabled.store(b & 1 != 0, Ordering::Release)
            }
            _ => {}
        }
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = s.write(off, b) {
            tracing::debug!(error = ?e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_transmits_and_receives() {
        let buf = Shared::default();
        let sink = Arc::new(ConsoleSink::new(Box::new(buf.clone()), 1 << 20));
        let uart = Serial16550::new(EventFd::new(0).unwrap(), sink);
        for b in b"ok" {
            uart.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"ok");
        assert_eq!(uart.enqueue_input(b"xy"), 0, "no driver listening yet");
        uart.write(3, &[0x80]); // DLAB on: offset 1 is the divisor, not IER
        uart.write(1, &[0x01]);
        assert_eq!(uart.enqueue_input(b"xy"), 0);
        uart.write(3, &[0x03]); // 8N1, DLAB off
        uart.write(1, &[0x01]); // receive interrupts on
        assert_eq!(uart.enqueue_input(b"xy"), 2);
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data-ready bit set");
        let mut rbr = [0u8];
        uart.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        // Out-of-range offsets are ignored by the register model, not a panic.
        uart.write(300, &[1]);
        uart.read(u64::MAX, &mut rbr);
    }
}
