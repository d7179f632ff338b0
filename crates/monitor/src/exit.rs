//! The exit path: one function takes a vCPU exit, routes it to the buses, and says what the
//! vCPU loop does next. It knows nothing about KVM file descriptors, so it is tested without KVM.

use bulwark_devices::Bus;
use kvm_ioctls::VcpuExit;

use crate::abi::{ABI_VERSION, FAULT_PORT, HOSTCALL_PORT};

/// The exits the monitor distinguishes, borrowed from the vCPU's `kvm_run` page.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port input. `size` is the access width (1, 2 or 4); `data` holds `size * count` bytes,
    /// as KVM hands a whole `rep ins` to user space in one exit.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// Port output, `size` bytes per element as for [`Exit::IoIn`].
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    Hlt,
    Shutdown,
    InternalError,
    FailEntry {
        reason: u64,
    },
    SystemEvent {
        kind: u32,
    },
    /// The signal-kick path: KVM returned to let the monitor look at its flags.
    Interrupted,
    /// A guest-debug exit (introspection's breakpoints): the exception vector (1 after a
    /// single step, 3 at a breakpoint) and the guest's linear RIP.
    Debug {
        exception: u32,
        pc: u64,
    },
    /// Anything else, by name.
    Other(&'static str),
}

impl<'a> Exit<'a> {
    /// Converts KVM's exit. `io_size` is `kvm_run.io.size`, which `VcpuExit` does not carry; it
    /// is only read for port exits.
    pub fn from_kvm(e: VcpuExit<'a>, io_size: impl FnOnce() -> usize) -> Self {
        match e {
            VcpuExit::IoIn(port, data) => Exit::IoIn {
                port,
                size: io_width(io_size(), data.len()),
                data,
            },
            VcpuExit::IoOut(port, data) => Exit::IoOut {
                port,
                size: io_width(io_size(), data.len()),
                data,
            },
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, _cpu) => Exit::FailEntry { reason },
            VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Exception => Exit::Other("exception"),
            VcpuExit::Debug(d) => Exit::Debug {
                exception: d.exception,
                pc: d.pc,
            },
            VcpuExit::Hypercall(_) => Exit::Other("hypercall"),
            VcpuExit::IrqWindowOpen => Exit::Other("irq window open"),
            VcpuExit::Nmi => Exit::Other("nmi"),
            VcpuExit::MemoryFault { .. } => Exit::Other("memory fault"),
            VcpuExit::X86Rdmsr(_) => Exit::Other("rdmsr"),
            VcpuExit::X86Wrmsr(_) => Exit::Other("wrmsr"),
            _ => Exit::Other("unsupported exit"),
        }
    }
}

/// A sane element width: 1, 2 or 4 bytes that divides the transfer, else the whole transfer.
fn io_width(size: usize, len: usize) -> usize {
    if matches!(size, 1 | 2 | 4) && len.is_multiple_of(size) {
        size
    } else {
        len.max(1)
    }
}

/// Why a vCPU stops the VM, before the vCPU loop adds register state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    Halt,
    TripleFault,
    InternalError,
    FailEntry(u64),
    SystemEvent(u32),
    Unexpected(&'static str),
}

/// What the vCPU loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Resume,
    /// The guest rang the host-call doorbell with this call number.
    HostCall(u32),
    /// A fault report (vector) arrived on the fault port; the loop checks it came from the stubs.
    FaultReport(u32),
    /// Stop the VM.
    Stop(StopKind),
}

/// The two buses a guest reaches through exits.
#[derive(Debug, Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
    /// Whether the function micro-VM ABI ports (host calls, fault reports) exist. Off for
    /// Linux guests, to whom those ports are ordinary unused ports.
    pub payload_abi: bool,
}

fn le_u32(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

/// Handles one exit. Device accesses complete here; everything else is returned to the loop.
/// String port I/O reaches the device once per element. The ABI ports exist only when the
/// buses say so (function micro-VMs); a string access to them counts as one, its first element.
pub fn dispatch(exit: Exit<'_>, buses: &Buses) -> ExitAction {
    let abi = buses.payload_abi;
    match exit {
        Exit::IoOut {
            port: HOSTCALL_PORT,
            size,
            data,
        } if abi => ExitAction::HostCall(le_u32(&data[..size.min(data.len())])),
        Exit::IoOut {
            port: FAULT_PORT,
            size,
            data,
        } if abi => ExitAction::FaultReport(le_u32(&data[..size.min(data.len())])),
        Exit::IoIn {
            port: HOSTCALL_PORT,
            size,
            data,
        } if abi => {
            let v = ABI_VERSION.to_le_bytes();
            for element in data.chunks_mut(size) {
                for (i, b) in element.iter_mut().enumerate() {
                    *b = v.get(i).copied().unwrap_or(0);
                }
            }
            ExitAction::Resume
        }
        Exit::IoIn { port, size, data } => {
            for element in data.chunks_mut(size) {
                buses.pio.read(u64::from(port), element);
            }
            ExitAction::Resume
        }
        Exit::IoOut { port, size, data } => {
            for element in data.chunks(size) {
                buses.pio.write(u64::from(port), element);
            }
            ExitAction::Resume
        }
        Exit::MmioRead { addr, data } => {
            buses.mmio.read(addr, data);
            ExitAction::Resume
        }
        Exit::MmioWrite { addr, data } => {
            buses.mmio.write(addr, data);
            ExitAction::Resume
        }
        Exit::Interrupted => ExitAction::Resume,
        Exit::Hlt => ExitAction::Stop(StopKind::Halt),
        Exit::Shutdown => ExitAction::Stop(StopKind::TripleFault),
        Exit::InternalError => ExitAction::Stop(StopKind::InternalError),
        Exit::FailEntry { reason } => ExitAction::Stop(StopKind::FailEntry(reason)),
        Exit::SystemEvent { kind } => ExitAction::Stop(StopKind::SystemEvent(kind)),
        // Only introspection enables guest debugging, and the vCPU serves those exits itself.
        Exit::Debug { .. } => ExitAction::Stop(StopKind::Unexpected("debug")),
        Exit::Other(what) => ExitAction::Stop(StopKind::Unexpected(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_devices::{BusDevice, BusRange};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Reg(Mutex<u8>);
    impl BusDevice for Reg {
        fn read(&self, _o: u64, d: &mut [u8]) {
            d.fill(*self.0.lock().unwrap());
        }
        fn write(&self, _o: u64, d: &[u8]) {
            *self.0.lock().unwrap() = d[0];
        }
    }

    fn buses() -> (Buses, Arc<Reg>) {
        let reg = Arc::new(Reg::default());
        let mut b = Buses {
            payload_abi: true,
            ..Default::default()
        };
        b.pio.insert(BusRange::new(0x70, 2), reg.clone()).unwrap();
        b.mmio
            .insert(BusRange::new(0xd000_0000, 0x1000), reg.clone())
            .unwrap();
        (b, reg)
    }

    #[test]
    fn dispatch_port_and_mmio_reach_device() {
        let (b, reg) = buses();
        let out = [0x5a];
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: 0x71,
                    size: 1,
                    data: &out
                },
                &b
            ),
            ExitAction::Resume
        );
        assert_eq!(*reg.0.lock().unwrap(), 0x5a);
        let mut d = [0u8; 4];
        dispatch(
            Exit::MmioRead {
                addr: 0xd000_0ffc,
                data: &mut d,
            },
            &b,
        );
        assert_eq!(d, [0x5a; 4]);
        dispatch(
            Exit::MmioWrite {
                addr: 0xd000_0000,
                data: &[7],
            },
            &b,
        );
        assert_eq!(*reg.0.lock().unwrap(), 7);
        assert_eq!((b.pio.stats().writes, b.mmio.stats().writes), (1, 1));
    }

    #[test]
    fn dispatch_unmapped_access_resumes_and_counts() {
        let (b, _) = buses();
        let mut d = [0u8; 2];
        assert_eq!(
            dispatch(
                Exit::IoIn {
                    port: 0x1234,
                    size: 2,
                    data: &mut d
                },
                &b
            ),
            ExitAction::Resume
        );
        assert_eq!(d, [0xff, 0xff]);
        dispatch(
            Exit::MmioWrite {
                addr: 0xd000_1000,
                data: &[1],
            },
            &b,
        );
        assert_eq!(b.pio.stats().unhandled_reads, 1);
        assert_eq!(b.mmio.stats().unhandled_writes, 1);
    }

    #[test]
    fn dispatch_abi_ports_return_actions() {
        let (b, _) = buses();
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: HOSTCALL_PORT,
                    size: 4,
                    data: &[3, 0, 0, 0]
                },
                &b
            ),
            ExitAction::HostCall(3)
        );
        // A one-byte write is zero-extended.
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: FAULT_PORT,
                    size: 1,
                    data: &[14]
                },
                &b
            ),
            ExitAction::FaultReport(14)
        );
        let mut v = [0u8; 4];
        dispatch(
            Exit::IoIn {
                port: HOSTCALL_PORT,
                size: 4,
                data: &mut v,
            },
            &b,
        );
        assert_eq!(u32::from_le_bytes(v), ABI_VERSION);
        assert_eq!(
            b.pio.stats(),
            Default::default(),
            "ABI ports bypass the bus"
        );
    }

    #[test]
    fn dispatch_string_io_reaches_device_per_element() {
        let (b, reg) = buses();
        // rep outsw of three words: the device sees three 2-byte writes.
        dispatch(
            Exit::IoOut {
                port: 0x70,
                size: 2,
                data: &[1, 0, 2, 0, 3, 0],
            },
            &b,
        );
        assert_eq!(*reg.0.lock().unwrap(), 3);
        assert_eq!(b.pio.stats().writes, 3);
        // rep insb of eight bytes: every element answered, none left stale.
        let mut d = [0u8; 8];
        dispatch(
            Exit::IoIn {
                port: 0x70,
                size: 1,
                data: &mut d,
            },
            &b,
        );
        assert_eq!(d, [3; 8]);
        assert_eq!(io_width(3, 6), 6, "odd widths: one access");
        assert_eq!(io_width(4, 8), 4);
    }

    #[test]
    fn dispatch_abi_ports_are_plain_ports_for_linux_guests() {
        let (mut b, _) = buses();
        b.payload_abi = false;
        assert_eq!(
            dispatch(
                Exit::IoOut {
                    port: HOSTCALL_PORT,
                    size: 4,
                    data: &[0, 0, 0, 0]
                },
                &b
            ),
            ExitAction::Resume
        );
        assert_eq!(b.pio.stats().unhandled_writes, 1);
    }

    #[test]
    fn dispatch_fatal_exits_stop() {
        let (b, _) = buses();
        assert_eq!(
            dispatch(Exit::Shutdown, &b),
            ExitAction::Stop(StopKind::TripleFault)
        );
        assert_eq!(dispatch(Exit::Hlt, &b), ExitAction::Stop(StopKind::Halt));
        assert_eq!(
            dispatch(Exit::FailEntry { reason: 7 }, &b),
            ExitAction::Stop(StopKind::FailEntry(7))
        );
        assert_eq!(
            dispatch(Exit::Other("debug"), &b),
            ExitAction::Stop(StopKind::Unexpected("debug"))
        );
        assert_eq!(dispatch(Exit::Interrupted, &b), ExitAction::Resume);
    }
}
