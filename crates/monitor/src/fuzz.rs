//! Fuzz harnesses for the monitor's guest-facing and user-facing parsers.
//!
//! Each function decodes raw fuzzer bytes into calls of one parser and asserts that parser's
//! invariants against a small model written independently of the code under test; any panic is
//! a finding. `fuzz/fuzz_targets/` runs them under libFuzzer, and the `fuzz_corpus` test replays
//! the committed corpora (`fuzz/corpus/<target>/`) through them in ordinary `cargo test`.
//!
//! Not part of the monitor's API: the decoding of fuzzer bytes may change at any time, which
//! only costs corpus coverage, never correctness.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bulwark_devices::console::{ConsoleSink, DebugPort};
use bulwark_devices::info::{INFO_WINDOW, PlatformInfo};
use bulwark_devices::postcode::PostCode;
use bulwark_devices::serial::{COM1_BASE, Serial16550, UART_PORTS};
use bulwark_devices::{BusRange, BusStats};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod control;
mod virtio;

pub use control::{control_channel, snapshot_stream, snapshot_stream_seeds};
pub use virtio::{virtio_blk, virtio_net, virtio_vsock, virtqueue};

use crate::abi::{
    ABI_VERSION, DEBUG_CONSOLE_PORT, FAULT_PORT, HOSTCALL_PORT, POSTCODE_PORT, call, errno,
};
use crate::exit::{Buses, Exit, ExitAction, StopKind, dispatch};
use crate::hostcall::{HostCallResult, HostCalls, InputSource};
use crate::input::ConsoleInput;
use crate::payload::Layout;
use crate::payload::image::{self, PayloadImage};
use crate::payload::layout::{
    EXC_STACKS_ADDR, INFO_ADDR, INFO_DEVICE_ADDR, MAX_MEMORY, MMIO_BASE, MMIO_SIZE, PAGE,
    PAGE_TABLES_ADDR, PAYLOAD_ADDR,
};

/// Reads fuzzer bytes front to back; every getter returns `None` once the input runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// Up to `n` bytes: whatever is left if fewer.
    fn take_up_to(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn i16(&mut self) -> Option<i16> {
        self.array().map(i16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

/// `data` zero-extended (or truncated) to `N` bytes.
fn zero_extended<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut v = [0u8; N];
    let n = data.len().min(N);
    v[..n].copy_from_slice(&data[..n]);
    v
}

// ---------------------------------------------------------------------------------------------
// exit_dispatch

/// Ports the decoder aims at (plus a signed offset): every device, the ABI ports, and edges.
const PIO_TARGETS: [u16; 8] = [
    POSTCODE_PORT,
    DEBUG_CONSOLE_PORT,
    COM1_BASE as u16,
    HOSTCALL_PORT,
    FAULT_PORT,
    0x2f8, // COM2: not present
    0,
    u16::MAX,
];

/// MMIO addresses the decoder aims at (plus a signed offset).
const MMIO_TARGETS: [u64; 6] = [
    INFO_DEVICE_ADDR,
    INFO_DEVICE_ADDR + INFO_WINDOW,
    MMIO_BASE + MMIO_SIZE,
    PAYLOAD_ADDR,
    0,
    u64::MAX,
];

/// Limit of the harness's console sink, small so the drop path is reached too.
const EXIT_CONSOLE_LIMIT: u64 = 256;
/// Largest string-I/O transfer KVM hands to user space: one page of the `kvm_run` mapping.
const PIO_PAGE: usize = 4096;

/// The devices `vm::build_devices` puts on the buses, with handles the harness checks.
struct ExitRig {
    buses: Buses,
    sink: Arc<ConsoleSink>,
    postcode: Arc<PostCode>,
    info: Arc<PlatformInfo>,
    serial: Arc<Serial16550>,
}

impl ExitRig {
    /// Mirrors `vm::build_devices` (which is private to the VM builder) device for device.
    fn new() -> Self {
        let sink = Arc::new(ConsoleSink::new(Box::new(io::sink()), EXIT_CONSOLE_LIMIT));
        let postcode = Arc::new(PostCode::new());
        let info = Arc::new(PlatformInfo::new(1, 16 << 20));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd for the serial irq");
        let serial = Arc::new(Serial16550::new(irq, sink.clone()));
        let mut buses = Buses {
            payload_abi: true,
            ..Default::default()
        };
        let debug = Arc::new(DebugPort::new(sink.clone()));
        let inserts = [
            buses
                .pio
                .insert(BusRange::new(POSTCODE_PORT.into(), 1), postcode.clone()),
            buses
                .pio
                .insert(BusRange::new(DEBUG_CONSOLE_PORT.into(), 1), debug),
            buses
                .pio
                .insert(BusRange::new(COM1_BASE, UART_PORTS), serial.clone()),
            buses
                .mmio
                .insert(BusRange::new(INFO_DEVICE_ADDR, INFO_WINDOW), info.clone()),
        ];
        for r in inserts {
            r.expect("the monitor's device map has no overlaps");
        }
        Self {
            buses,
            sink,
            postcode,
            info,
            serial,
        }
    }
}

/// What the harness expects of those devices, written without looking at their code paths.
struct ExitModel {
    pio: BusStats,
    mmio: BusStats,
    postcode: [u8; 8],
    postcode_writes: u64,
    info: [u8; INFO_WINDOW as usize],
    /// Bytes written to the debug port: each reaches the sink.
    debug_bytes: u64,
    /// Writes to the UART: each may put at most one byte into the sink.
    serial_writes: u64,
}

const INFO_SCRATCH: std::ops::Range<u64> = 0x18..0x20;

impl ExitModel {
    fn new() -> Self {
        let mut info = [0u8; INFO_WINDOW as usize];
        info[0..4].copy_from_slice(&0x4b57_4c42u32.to_le_bytes()); // "BLWK"
        info[4..8].copy_from_slice(&1u32.to_le_bytes());
        info[8..12].copy_from_slice(&1u32.to_le_bytes());
        info[0x10..0x18].copy_from_slice(&(16u64 << 20).to_le_bytes());
        Self {
            pio: BusStats::default(),
            mmio: BusStats::default(),
            postcode: [0; 8],
            postcode_writes: 0,
            info,
            debug_bytes: 0,
            serial_writes: 0,
        }
    }

    fn port_read(&mut self, port: u16, data: &[u8]) {
        let what = format!("in {port:#x}, {} bytes -> {data:02x?}", data.len());
        let head = &data[..data.len().min(8)];
        match port {
            HOSTCALL_PORT => {
                let version = zero_extended::<8>(&ABI_VERSION.to_le_bytes());
                assert_eq!(head, &version[..head.len()], "{what}");
                assert!(data.iter().skip(4).all(|&b| b == 0), "{what}");
                return;
            }
            POSTCODE_PORT => assert_eq!(head, &self.postcode[..head.len()], "{what}"),
            DEBUG_CONSOLE_PORT => {
                assert_eq!(data[0], 0xe9, "{what}");
                assert!(head[1..].iter().all(|&b| b == 0), "{what}");
            }
            p if is_uart(p) => assert!(head[1..].iter().all(|&b| b == 0), "{what}"),
            _ => {
                assert!(data.iter().all(|&b| b == 0xff), "unmapped {what}");
                self.pio.unhandled_reads += 1;
                return;
            }
        }
        self.pio.reads += 1;
    }

    fn port_write(&mut self, port: u16, data: &[u8], action: ExitAction) {
        let what = format!("out {port:#x}, {data:02x?} -> {action:?}");
        let word = u32::from_le_bytes(zero_extended(data));
        let want = match port {
            HOSTCALL_PORT => ExitAction::HostCall(word),
            FAULT_PORT => ExitAction::FaultReport(word),
            _ => ExitAction::Resume,
        };
        assert_eq!(action, want, "{what}");
        if want != ExitAction::Resume {
            return; // the ABI ports never reach the bus
        }
        match port {
            POSTCODE_PORT => {
                self.postcode = zero_extended(data);
                self.postcode_writes += 1;
            }
            DEBUG_CONSOLE_PORT => self.debug_bytes += 1,
            p if is_uart(p) => self.serial_writes += 1,
            _ => {
                self.pio.unhandled_writes += 1;
                return;
            }
        }
        self.pio.writes += 1;
    }

    fn mmio_read(&mut self, addr: u64, data: &[u8]) {
        let what = format!("read {addr:#x}, {} bytes -> {data:02x?}", data.len());
        let Some(off) = info_offset(addr) else {
            assert!(data.iter().all(|&b| b == 0xff), "unmapped {what}");
            self.mmio.unhandled_reads += 1;
            return;
        };
        for (i, &b) in data.iter().enumerate() {
            let want = usize::try_from(off + i as u64)
                .ok()
                .and_then(|o| self.info.get(o).copied())
                .unwrap_or(0);
            assert_eq!(b, want, "byte {i} of {what}");
        }
        self.mmio.reads += 1;
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let Some(off) = info_offset(addr) else {
            self.mmio.unhandled_writes += 1;
            return;
        };
        for (i, &b) in data.iter().enumerate() {
            let o = off + i as u64;
            if INFO_SCRATCH.contains(&o) {
                self.info[o as usize] = b;
            }
        }
        self.mmio.writes += 1;
    }

    fn check(&self, rig: &ExitRig) {
        assert_eq!(rig.buses.pio.stats(), self.pio, "port bus counters");
        assert_eq!(rig.buses.mmio.stats(), self.mmio, "MMIO bus counters");
        assert_eq!(
            rig.postcode.last(),
            (u64::from_le_bytes(self.postcode), self.postcode_writes),
            "POST code"
        );
        let scratch: [u8; 8] = zero_extended(&self.info[0x18..0x20]);
        assert_eq!(rig.info.scratch(), u64::from_le_bytes(scratch), "scratch");
        let written = rig.sink.written();
        assert!(
            (self.debug_bytes..=self.debug_bytes + self.serial_writes).contains(&written),
            "console got {written} bytes from {} debug-port and {} UART writes",
            self.debug_bytes,
            self.serial_writes
        );
        assert_eq!(
            rig.sink.dropped(),
            written.saturating_sub(EXIT_CONSOLE_LIMIT),
            "console drops exactly what exceeds its limit"
        );
    }
}

fn is_uart(port: u16) -> bool {
    (COM1_BASE..COM1_BASE + UART_PORTS).contains(&u64::from(port))
}

fn info_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(INFO_DEVICE_ADDR)
        .filter(|&o| o < INFO_WINDOW)
}

/// A port (`is_port`) or MMIO address: near a known target, or raw.
fn exit_address(input: &mut Cursor<'_>, is_port: bool, raw: bool) -> Option<u64> {
    Some(match (is_port, raw) {
        (true, true) => u64::from(input.u16()?),
        (false, true) => input.u64()?,
        (true, false) => {
            let base = PIO_TARGETS[usize::from(input.u8()?) % PIO_TARGETS.len()];
            u64::from(base.wrapping_add_signed(i16::from(input.u8()? as i8)))
        }
        (false, false) => {
            let base = MMIO_TARGETS[usize::from(input.u8()?) % MMIO_TARGETS.len()];
            base.wrapping_add_signed(i64::from(input.u8()? as i8))
        }
    })
}

/// Non-I/O exits: each must map to its fixed action.
fn other_exit(input: &mut Cursor<'_>, buses: &Buses) -> Option<()> {
    let (exit, want) = match input.u8()? % 7 {
        0 => (Exit::Hlt, ExitAction::Stop(StopKind::Halt)),
        1 => (Exit::Shutdown, ExitAction::Stop(StopKind::TripleFault)),
        2 => (
            Exit::InternalError,
            ExitAction::Stop(StopKind::InternalError),
        ),
        3 => {
            let reason = input.u64()?;
            let want = ExitAction::Stop(StopKind::FailEntry(reason));
            (Exit::FailEntry { reason }, want)
        }
        4 => {
            let kind = input.u32()?;
            let want = ExitAction::Stop(StopKind::SystemEvent(kind));
            (Exit::SystemEvent { kind }, want)
        }
        5 => (Exit::Interrupted, ExitAction::Resume),
        _ => (
            Exit::Other("fuzz"),
            ExitAction::Stop(StopKind::Unexpected("fuzz")),
        ),
    };
    assert_eq!(dispatch(exit, buses), want);
    Some(())
}

/// Sequences of vCPU exits through [`dispatch`] to the monitor's real devices.
///
/// Each op starts with a byte: bits 0-2 pick the exit (0 port in, 1 port out, 2 MMIO read,
/// 3 MMIO write, 4 string port in, 5 string port out, 6 host input to the UART, 7 a non-I/O
/// exit); bits 3-5 the width 1..=8 (for string I/O, bits 3-4 the element size 1, 2 or 4, and a
/// u16 count follows); bit 7 a raw address instead of a known target plus a signed offset.
/// Written data follows, zero-padded if the input runs out.
/// String I/O is there because KVM may hand user space a whole `rep ins` as one exit of
/// `size * count` bytes (its read-ahead; `rep insb` of 8 bytes from 0xe9 is one exit on the
/// project's hosts); `dispatch` splits it into `count` accesses of `size` bytes, and the model
/// checks every element.
pub fn exit_dispatch(data: &[u8]) {
    exit_ops(data);
}

/// The exit harness; returns how many exits it dispatched and checked.
fn exit_ops(data: &[u8]) -> usize {
    let rig = ExitRig::new();
    let mut model = ExitModel::new();
    let mut input = Cursor(data);
    let mut ops = 0;
    while exit_op(&mut input, &rig, &mut model).is_some() {
        model.check(&rig);
        ops += 1;
    }
    model.check(&rig);
    ops
}

fn exit_op(input: &mut Cursor<'_>, rig: &ExitRig, model: &mut ExitModel) -> Option<()> {
    let op = input.u8()?;
    let kind = op & 7;
    let raw = op & 0x80 != 0;
    let (len, size) = match kind {
        0..=3 => {
            let len = usize::from((op >> 3) & 7) + 1;
            (len, len)
        }
        4 | 5 => {
            let size = [1, 2, 4, 4][usize::from((op >> 3) & 3)];
            (
                size * (usize::from(input.u16()?) % (PIO_PAGE / size) + 1),
                size,
            )
        }
        6 => {
            let n = input.u8()?;
            let bytes = input.take_up_to(usize::from(n));
            let queued = rig.serial.enqueue_input(bytes);
            assert!(queued <= bytes.len(), "queued {queued} of {}", bytes.len());
            return Some(());
        }
        _ => return other_exit(input, &rig.buses),
    };
    let is_port = !matches!(kind, 2 | 3);
    let addr = exit_address(input, is_port, raw)?;
    let is_read = kind % 2 == 0;
    let mut buf = vec![0u8; len];
    if is_read {
        // Poison: a device must overwrite what it answers.
        buf.fill(0x5a);
    } else {
        let given = input.take_up_to(len);
        buf[..given.len()].copy_from_slice(given);
    }
    let port = addr as u16;
    let action = match (is_port, is_read) {
        (true, true) => dispatch(
            Exit::IoIn {
                port,
                size,
                data: &mut buf,
            },
            &rig.buses,
        ),
        (true, false) => dispatch(
            Exit::IoOut {
                port,
                size,
                data: &buf,
            },
            &rig.buses,
        ),
        (false, true) => dispatch(
            Exit::MmioRead {
                addr,
                data: &mut buf,
            },
            &rig.buses,
        ),
        (false, false) => dispatch(Exit::MmioWrite { addr, data: &buf }, &rig.buses),
    };
    if is_read || !is_port {
        assert_eq!(action, ExitAction::Resume, "access at {addr:#x}");
    }
    // Port I/O reaches the device once per element; the ABI ports take a string access as one.
    let abi_port = matches!(port, HOSTCALL_PORT | FAULT_PORT);
    match (is_port, is_read) {
        (true, true) => buf.chunks(size).for_each(|e| model.port_read(port, e)),
        (true, false) if abi_port => model.port_write(port, &buf[..size], action),
        (true, false) => buf
            .chunks(size)
            .for_each(|e| model.port_write(port, e, action)),
        (false, true) => model.mmio_read(addr, &buf),
        (false, false) => model.mmio_write(addr, &buf),
    }
    Some(())
}

// ---------------------------------------------------------------------------------------------
// hostcall

const HC_MEMORY: u64 = 4 << 20;
/// Most host calls per input: each may move up to 1 MiB.
const HC_MAX_CALLS: usize = 32;
/// Plausible lengths are masked below 1 MiB so a run stays fast; larger ones are kept only when
/// they exceed guest memory, where they must be refused.
const HC_LEN_MASK: u64 = (1 << 20) - 1;

/// What the system area below the payload holds while the calls run.
fn system_area_pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..PAYLOAD_ADDR)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8 | 1)
            .collect()
    })
}

thread_local! {
    /// Guest memory for the host-call harness, built once per thread: a fresh 4 MiB mapping
    /// and its 1 MiB pattern per input would cost more than the calls. What runs leave above
    /// `PAYLOAD_ADDR` steers nothing (the checks read back only what the call just wrote), and
    /// the system area is restored whenever a check finds it changed.
    static HC_GUEST: GuestMemoryMmap = {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HC_MEMORY as usize)])
            .expect("anonymous guest memory");
        mem.write_slice(system_area_pattern(), GuestAddress(0))
            .expect("system area is inside guest memory");
        mem
    };
}

/// The first address below `PAYLOAD_ADDR` that no longer holds the pattern, if any.
fn system_area_change(mem: &GuestMemoryMmap) -> Option<u64> {
    let mut chunk = [0u8; 4096];
    system_area_pattern()
        .chunks(chunk.len())
        .zip((0..).step_by(chunk.len()))
        .find_map(|(want, addr)| {
            let got = &mut chunk[..want.len()];
            mem.read_slice(got, GuestAddress(addr))
                .expect("system area is inside guest memory");
            if got == want {
                return None;
            }
            let at = got.iter().zip(want).position(|(a, b)| a != b)?;
            Some(addr + at as u64)
        })
}

/// A guest register value: small, near an edge of payload memory, in the system area, or raw.
fn guest_word(input: &mut Cursor<'_>) -> Option<u64> {
    let sel = input.u8()?;
    Some(match sel & 7 {
        0 => u64::from(sel >> 3),
        1 => PAYLOAD_ADDR.wrapping_add_signed(input.i16()?.into()),
        2 => HC_MEMORY.wrapping_add_signed(input.i16()?.into()),
        3 => input.u64()?,
        4 => input.u32()?.into(),
        5 => {
            let base =
                [INFO_ADDR, PAGE_TABLES_ADDR, EXC_STACKS_ADDR, PAYLOAD_ADDR][usize::from(sel >> 6)];
            base.wrapping_add_signed(input.i16()?.into())
        }
        6 => u64::MAX - u64::from(input.u16()?),
        _ => PAYLOAD_ADDR + u64::from(input.u32()?),
    })
}

fn cap_len(len: u64) -> u64 {
    if len <= HC_MEMORY {
        len & HC_LEN_MASK
    } else {
        len
    }
}

/// The rule for buffers the host writes, restated independently of `Layout`: payload memory.
fn in_payload_memory(ptr: u64, len: u64) -> bool {
    ptr >= PAYLOAD_ADDR && u128::from(ptr) + u128::from(len) <= u128::from(HC_MEMORY)
}

/// The rule for buffers the host reads: payload memory or the read-only info page.
fn host_readable(ptr: u64, len: u64) -> bool {
    let in_info =
        ptr >= INFO_ADDR && u128::from(ptr) + u128::from(len) <= u128::from(INFO_ADDR + PAGE);
    in_info || in_payload_memory(ptr, len)
}

fn ret_err(e: i64) -> HostCallResult {
    HostCallResult::Return(e.wrapping_neg() as u64)
}

/// Sequences of host calls with guest-controlled numbers, pointers and lengths.
///
/// Input: a console-limit byte, a console-input length byte and that many input bytes (queued
/// and closed, as for `--input`), then calls: a byte whose bits 0-2 pick the call number (0-4
/// the ABI's, 5 the first unknown one, 6-7 a raw u32 follows) and bit 3 sets the VM's stop flag,
/// then three argument words (see `guest_word`). Each result is checked against the ABI; at
/// the end, memory below `PAYLOAD_ADDR` must be exactly as it was.
pub fn hostcall(data: &[u8]) {
    hostcall_calls(data);
}

/// The host-call harness; returns how many calls it made and checked.
fn hostcall_calls(data: &[u8]) -> usize {
    HC_GUEST.with(|mem| hostcall_calls_in(mem, data))
}

fn hostcall_calls_in(mem: &GuestMemoryMmap, data: &[u8]) -> usize {
    let mut input = Cursor(data);
    let (Some(limit_sel), Some(input_len)) = (input.u8(), input.u8()) else {
        return 0;
    };
    let console = input.take_up_to(usize::from(input_len));
    let console_limit = u64::from(limit_sel) << 12;

    let layout = Layout::new(HC_MEMORY, 1).expect("4 MiB and 1 vCPU is a valid layout");
    let queue = Arc::new(ConsoleInput::new());
    queue.push(console);
    queue.close();
    let mut pending: VecDeque<u8> = console.iter().copied().collect();
    let sink = || Arc::new(ConsoleSink::new(Box::new(io::sink()), console_limit));
    let hc = HostCalls {
        layout,
        stdout: sink(),
        stderr: sink(),
        input: InputSource::Queue(queue),
        start: Instant::now(),
    };
    let running = AtomicBool::new(false);
    let stopping = AtomicBool::new(true);
    let mut sent = [0u64; 2];
    let mut last_clock = 0;
    let mut calls = 0;

    while calls < HC_MAX_CALLS {
        let Some(op) = input.u8() else { break };
        let nr = match op & 7 {
            k @ 0..=5 => u32::from(k),
            _ => match input.u32() {
                Some(nr) => nr,
                None => break,
            },
        };
        let stop = if op & 8 != 0 { &stopping } else { &running };
        let (Some(a0), Some(a1), Some(a2)) = (
            guest_word(&mut input),
            guest_word(&mut input),
            guest_word(&mut input),
        ) else {
            break;
        };
        let args = match nr {
            call::WRITE => [a0, a1, cap_len(a2)],
            call::READ | call::RANDOM => [a0, cap_len(a1), a2],
            _ => [a0, a1, a2],
        };
        let got = hc.handle(mem, nr, args, stop);
        let what = format!("call {nr} {args:#x?} stop={} -> {got:?}", op & 8 != 0);
        match nr {
            call::EXIT => assert_eq!(got, HostCallResult::Exit((a0 & 0xff) as u32), "{what}"),
            call::WRITE => {
                let [fd, ptr, len] = args;
                let want = match fd {
                    1 | 2 if host_readable(ptr, len) => {
                        sent[fd as usize - 1] += len;
                        HostCallResult::Return(len)
                    }
                    1 | 2 => ret_err(errno::EFAULT),
                    _ => ret_err(errno::EBADF),
                };
                assert_eq!(got, want, "{what}");
            }
            call::READ => check_read(mem, &mut pending, args, op & 8 != 0, got, &what),
            call::CLOCK => {
                let HostCallResult::Return(t) = got else {
                    panic!("{what}");
                };
                assert!(t >= last_clock, "clock went back: {what}");
                last_clock = t;
            }
            call::RANDOM => {
                let want = if in_payload_memory(args[0], args[1]) {
                    HostCallResult::Return(args[1])
                } else {
                    ret_err(errno::EFAULT)
                };
                assert_eq!(got, want, "{what}");
            }
            _ => assert_eq!(got, ret_err(errno::ENOSYS), "{what}"),
        }
        calls += 1;
    }

    for (sink, sent) in [(&hc.stdout, sent[0]), (&hc.stderr, sent[1])] {
        assert_eq!(sink.written(), sent, "console bytes accounted");
        assert_eq!(sink.dropped(), sent.saturating_sub(console_limit));
    }
    if let Some(at) = system_area_change(mem) {
        // Restore it first, so a replay of the next input starts clean.
        mem.write_slice(system_area_pattern(), GuestAddress(0))
            .expect("system area is inside guest memory");
        panic!("a host call changed the system area at {at:#x}");
    }
    calls
}

fn check_read(
    mem: &GuestMemoryMmap,
    pending: &mut VecDeque<u8>,
    [ptr, len, _]: [u64; 3],
    stopping: bool,
    got: HostCallResult,
    what: &str,
) {
    if !in_payload_memory(ptr, len) {
        assert_eq!(got, ret_err(errno::EFAULT), "{what}");
        return;
    }
    if stopping {
        assert_eq!(got, HostCallResult::Stopped, "{what}");
        return;
    }
    let HostCallResult::Return(n) = got else {
        panic!("{what}");
    };
    assert!(n <= len && n <= pending.len() as u64, "{what}");
    assert!(
        n > 0 || len == 0 || pending.is_empty(),
        "read returned nothing while input was waiting: {what}"
    );
    let want: Vec<u8> = pending.drain(..n as usize).collect();
    let mut landed = vec![0u8; want.len()];
    mem.read_slice(&mut landed, GuestAddress(ptr))
        .expect("checked in bounds");
    assert_eq!(landed, want, "input bytes land at the buffer: {what}");
}

// ---------------------------------------------------------------------------------------------
// payload_image

/// RAM sizes and vCPU counts the decoder picks a realistic layout from.
const IMAGE_MEMORY: [u64; 8] = [
    4 << 20,
    6 << 20,
    8 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
    MAX_MEMORY,
];
const IMAGE_VCPUS: [u32; 8] = [1, 2, 3, 4, 8, 16, 31, 32];

/// The payload parser on arbitrary files.
///
/// Input: one byte, then the file. If its bit 7 is clear, bits 0-2 and 3-5 pick RAM size and
/// vCPU count and the limit is that layout's payload limit (what `payload::prepare` passes);
/// if set, a raw little-endian u64 limit comes first. The parser must not panic; when it
/// accepts, every segment lies in `[PAYLOAD_ADDR, limit)` with its bytes inside the file, the
/// segments are disjoint and the entry point is in an executable one.
pub fn payload_image(data: &[u8]) {
    let mut input = Cursor(data);
    let Some(sel) = input.u8() else { return };
    let realistic = sel & 0x80 == 0;
    let limit = if realistic {
        let mem = IMAGE_MEMORY[usize::from(sel & 7)];
        let vcpus = IMAGE_VCPUS[usize::from((sel >> 3) & 7)];
        match Layout::new(mem, vcpus) {
            Ok(l) => l.payload_limit(),
            Err(_) => return,
        }
    } else {
        match input.u64() {
            Some(l) => l,
            None => return,
        }
    };
    let file = input.0;
    let is_elf = file.starts_with(b"\x7fELF");
    match image::parse(file, limit) {
        Ok(img) => {
            check_image(file, limit, &img);
            if realistic {
                assert!(img.end() <= limit, "heap starts above the payload limit");
            }
        }
        Err(e) => {
            assert!(
                is_elf || file.len() as u64 > limit.saturating_sub(PAYLOAD_ADDR) || file.is_empty(),
                "a flat payload that fits was refused: {e}"
            );
            assert_eq!(file.is_empty(), e == image::ImageError::Empty, "{e}");
        }
    }
}

fn check_image(file: &[u8], limit: u64, img: &PayloadImage) {
    let what = format!("limit {limit:#x}: {img:x?}");
    assert_eq!(img.is_elf, file.starts_with(b"\x7fELF"), "{what}");
    assert!(!img.segments.is_empty(), "{what}");
    for s in &img.segments {
        let end = u128::from(s.addr) + u128::from(s.mem_size);
        assert!(s.addr >= PAYLOAD_ADDR && end <= u128::from(limit), "{what}");
        assert!(s.mem_size > 0, "{what}");
        assert!(
            s.data.start <= s.data.end && s.data.end <= file.len(),
            "segment data outside the file: {what}"
        );
        assert!(s.data.len() as u64 <= s.mem_size, "{what}");
    }
    for (i, a) in img.segments.iter().enumerate() {
        for b in &img.segments[i + 1..] {
            let disjoint = u128::from(a.addr) + u128::from(a.mem_size) <= u128::from(b.addr)
                || u128::from(b.addr) + u128::from(b.mem_size) <= u128::from(a.addr);
            assert!(disjoint, "segments overlap: {what}");
        }
    }
    assert!(
        img.segments.iter().any(|s| s.exec
            && img.entry >= s.addr
            && u128::from(img.entry) < u128::from(s.addr) + u128::from(s.mem_size)),
        "entry outside executable segments: {what}"
    );
    if !img.is_elf {
        assert_eq!(img.entry, PAYLOAD_ADDR, "{what}");
        assert_eq!(img.segments.len(), 1, "{what}");
        assert_eq!(img.segments[0].data, 0..file.len(), "{what}");
    }
}

// ---------------------------------------------------------------------------------------------
// linux_platform

/// Port and MMIO exits of a Linux guest to the Linux platform's devices (16550, i8042, CMOS,
/// ACPI power registers, POST code, pvpanic), with host input offered to the UART between them.
///
/// Each op: a byte (bit 0: port or MMIO; bit 1: read or write; bits 2-4: width 1..=8, ports
/// capped at 4), an address (a port from a list of the platform's ports plus a raw u16, or an
/// MMIO offset around the pvpanic register), and data. Invariants: every access resumes the
/// vCPU; a power event happens exactly when the model says the guest asked for one; nothing
/// panics.
pub fn linux_platform(data: &[u8]) {
    use crate::linux::vm::platform_buses;
    use bulwark_devices::console::ConsoleSink;
    use bulwark_devices::power::{PVPANIC_ADDR, PowerEvent};
    use std::sync::{Arc, Mutex};

    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    // The marker watch parses guest console output too (the job-status line).
    let stdout = Arc::new(
        ConsoleSink::new(Box::new(std::io::sink()), 1 << 16)
            .with_marker("bulwark-guest: exit status "),
    );
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let platform = platform_buses(
        stdout,
        Arc::new(move |e| s2.lock().unwrap_or_else(|p| p.into_inner()).push(e)),
        irq,
    )
    .expect("platform buses");
    let mut expected: Vec<PowerEvent> = Vec::new();
    let mut input = Cursor(data);
    const PORTS: [u16; 12] = [
        0x3f8, 0x3f9, 0x3fb, 0x3fd, 0x60, 0x64, 0x70, 0x71, 0x600, 0x601, 0x602, 0x80,
    ];
    while let Some(op) = input.u8() {
        let is_port = op & 1 == 0;
        let is_read = op & 2 == 0;
        let width = usize::from((op >> 2) & 7) + 1;
        if op & 0xe0 == 0xe0 {
            let n = usize::from(input.u8().unwrap_or(0));
            platform.serial.enqueue_input(input.take_up_to(n));
            continue;
        }
        let Some(sel) = input.u16() else { break };
        let mut buf = vec![0u8; if is_port { width.min(4) } else { width }];
        if !is_read {
            let given = input.take_up_to(buf.len());
            buf[..given.len()].copy_from_slice(given);
        }
        let action = if is_port {
            let port = if sel & 0x8000 == 0 {
                PORTS[usize::from(sel) % PORTS.len()]
            } else {
                sel
            };
            let size = buf.len();
            if !is_read {
                match (port, buf[0]) {
                    (0x600, v) if v & 0x20 != 0 && (v >> 2) & 7 == 5 => {
                        expected.push(PowerEvent::PowerOff)
                    }
                    (0x602, 1) | (0x64, 0xfe) => expected.push(PowerEvent::Reset),
                    _ => {}
                }
            }
            if is_read {
                dispatch(
                    Exit::IoIn {
                        port,
                        size,
                        data: &mut buf,
                    },
                    &platform.buses,
                )
            } else {
                dispatch(
                    Exit::IoOut {
                        port,
                        size,
                        data: &buf,
                    },
                    &platform.buses,
                )
            }
        } else {
            let addr = PVPANIC_ADDR
                .wrapping_add(u64::from(sel & 0xf))
                .wrapping_sub(4);
            if !is_read && (PVPANIC_ADDR..PVPANIC_ADDR + 2).contains(&addr) && buf[0] & 1 != 0 {
                expected.push(PowerEvent::Panic);
            }
            if is_read {
                dispatch(
                    Exit::MmioRead {
                        addr,
                        data: &mut buf,
                    },
                    &platform.buses,
                )
            } else {
                dispatch(Exit::MmioWrite { addr, data: &buf }, &platform.buses)
            }
        };
        assert_eq!(action, ExitAction::Resume, "op {op:#x} sel {sel:#x}");
    }
    let got = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(got, expected, "power events");
    if let Some(m) = platform.stdout.marker() {
        assert!(m.len() <= 256, "marker longer than a watched line");
    }
}

// ---------------------------------------------------------------------------------------------
// virtio_mmio

/// A guest driving a virtio-mmio transport (with the virtio-rng device) through its registers,
/// with descriptor tables and rings it wrote itself. The first 3 KiB of input become guest
/// memory at 0x1000 (where well-behaved inputs put the rings), then each op is a register
/// access: `[kind][offset u16][value u32]`. Invariants: nothing panics; the interrupt status
/// only ever holds the two defined bits; the device never writes outside guest memory (the
/// memory is exactly 1 MiB, so any escape would fault); status reads back only bits that the
/// driver wrote plus NEEDS_RESET.
pub fn virtio_mmio(data: &[u8]) {
    use bulwark_devices::BusDevice;
    use bulwark_devices::virtio::mmio::MmioTransport;
    use bulwark_devices::virtio::rng::Rng;
    use bulwark_devices::virtio::{INT_CONFIG, INT_VRING, Interrupt, InterruptLine, status};

    struct Nop;
    impl InterruptLine for Nop {
        fn trigger(&self) {}
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let mut input = Cursor(data);
    let seed = input.take_up_to(3 * 1024);
    mem.write_slice(seed, GuestAddress(0x1000)).expect("seed");
    let t = MmioTransport::new(Box::new(Rng::new()), mem, Interrupt::new(Arc::new(Nop)));
    let mut written_status = 0u32;
    let mut ops = 0;
    while let (Some(kind), Some(off), Some(v)) = (input.u8(), input.u16(), input.u32()) {
        ops += 1;
        if ops > 256 {
            break;
        }
        let offset = u64::from(off) % 0x200;
        let width = [1usize, 2, 4, 8][usize::from(kind >> 1) & 3];
        if kind & 1 == 0 {
            let mut d = vec![0u8; width];
            t.read(offset, &mut d);
            if offset == 0x060 && width == 4 {
                let isr = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                assert_eq!(
                    isr & !(INT_VRING | INT_CONFIG),
                    0,
                    "interrupt status {isr:#x}"
                );
            }
        } else {
            let bytes = v.to_le_bytes();
            let mut d = vec![0u8; width];
            for (i, b) in d.iter_mut().enumerate() {
                *b = bytes[i % 4];
            }
            t.write(offset, &d);
            if offset == 0x070 && width == 4 {
                written_status = if v == 0 { 0 } else { written_status | v };
            }
        }
        let st = t.status();
        assert_eq!(
            st & !(written_status | status::NEEDS_RESET),
            0,
            "status {st:#x} has bits the driver never wrote ({written_status:#x})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_harnesses_empty_and_short_inputs_pass() {
        for data in [&[][..], &[0], &[0xff; 3], &[7, 3]] {
            exit_dispatch(data);
            hostcall(data);
            payload_image(data);
            virtqueue(data);
            virtio_blk(data);
            virtio_net(data);
            virtio_vsock(data);
        }
    }

    #[test]
    fn fuzz_exit_ops_known_sequence_dispatches_each_op() {
        // out 0x80 <- 0x42; in 0x80; MMIO write of the scratch register at a raw address;
        // rep outsb of 3 bytes to 0xe9; hlt.
        let mut d = vec![0x01, 0, 0, 0x42, 0x00, 0, 0];
        d.push(0x80 | (7 << 3) | 3);
        d.extend_from_slice(&(INFO_DEVICE_ADDR + 0x18).to_le_bytes());
        d.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        d.extend_from_slice(&[0x05, 2, 0, 1, 0, b'a', b'b', b'c']);
        d.extend_from_slice(&[0x07, 0]);
        assert_eq!(exit_ops(&d), 5);
    }

    #[test]
    fn fuzz_hostcall_calls_read_then_write_both_checked() {
        // Input "abc"; read(PAYLOAD_ADDR, 2); write(1, PAYLOAD_ADDR, 2).
        let mut d = vec![1, 3, b'a', b'b', b'c'];
        d.extend_from_slice(&[2, 1, 0, 0, 2 << 3, 0]);
        d.extend_from_slice(&[1, 1 << 3, 1, 0, 0, 2 << 3]);
        assert_eq!(hostcall_calls(&d), 2);
    }

    #[test]
    fn fuzz_payload_image_flat_payload_passes() {
        payload_image(&[0x03, 0x90, 0xf4]);
    }
}
