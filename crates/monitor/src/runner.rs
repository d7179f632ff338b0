//! What every VM kind shares once it is built: console input plumbing, the vCPU threads, the
//! event loop, stopping, and the final report.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulwark_devices::console::ConsoleSink;
use bulwark_devices::postcode::PostCode;
use bulwark_devices::serial::Serial16550;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::control::VmControl;
use crate::exit::Buses;
use crate::input::ConsoleInput;
use crate::managed::{LoopCtx, ManagedServer};
use crate::outcome::{RunReport, StopReason, VmStats};
use crate::vcpu::{Vcpu, VcpuCounters};
use crate::vm::{ConsoleIn, VmError, os};

/// Stack size of vCPU threads: the exit path is shallow and buffers live on the heap.
const VCPU_STACK: usize = 256 * 1024;
/// How long a stopping VM waits for its vCPU threads before giving up on joining them.
const JOIN_GRACE: Duration = Duration::from_secs(2);
const TOKEN_EXIT: u64 = 0;
const TOKEN_STDIN: u64 = 1;
/// Tokens from here on are device eventfds (`Console::watch`).
/// While input waits for room in the guest, stdin is not read and the loop polls this often.
const INPUT_RETRY: Duration = Duration::from_millis(5);

/// Where console input goes: the payload input queue or a UART's receive FIFO.
pub trait InputSink: Send + Sync {
    /// Takes what fits of `data`; returns how many bytes were taken.
    fn offer(&self, data: &[u8]) -> usize;
    /// No more input will come.
    fn close(&self);
}

impl InputSink for ConsoleInput {
    fn offer(&self, data: &[u8]) -> usize {
        if self.has_room() {
            self.push(data);
            data.len()
        } else {
            0
        }
    }
    fn close(&self) {
        ConsoleInput::close(self);
    }
}

/// A UART as an input sink; end of input is simply no more bytes.
#[derive(Debug)]
pub struct SerialInput(pub Arc<Serial16550>);

impl InputSink for SerialInput {
    fn offer(&self, data: &[u8]) -> usize {
        self.0.enqueue_input(data)
    }
    fn close(&self) {}
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal only interrupts `KVM_RUN` and blocking syscalls; its handler does nothing.
pub fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| os("installing the vCPU kick signal handler")(e.into()));
    });
    result
}

/// Other processes of the same user must not ptrace the monitor or read its memory.
pub fn make_undumpable() -> Result<(), VmError> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(os("prctl(PR_SET_DUMPABLE)")(io::Error::last_os_error()));
    }
    Ok(())
}

/// The event loop's view of console input.
pub struct Console {
    epoll: Epoll,
    sink: Arc<dyn InputSink>,
    watch_stdin: bool,
    pending: VecDeque<u8>,
    /// Close the sink once `pending` drains (input had an end).
    close_when_drained: bool,
    /// Watches for the quit sequence (interactive Linux consoles).
    escape: Option<crate::tty::EscapeFilter>,
}

impl Console {
    /// Sets up input from `input` into `sink`. Returns `None` as the second value when stdin
    /// cannot be watched (a regular file or /dev/null): the caller then reads it directly.
    pub fn new(
        control: &VmControl,
        input: &ConsoleIn,
        sink: Arc<dyn InputSink>,
    ) -> Result<(Self, bool), VmError> {
        let epoll = Epoll::new().map_err(os("epoll_create"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                control.exit_evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_EXIT),
            )
            .map_err(os("epoll_ctl"))?;
        let mut c = Self {
            epoll,
            sink,
            watch_stdin: false,
            pending: VecDeque::new(),
            close_when_drained: false,
            escape: None,
        };
        let watchable = match input {
            ConsoleIn::Bytes(b) => {
                c.pending.extend(b);
                c.close_when_drained = true;
                true
            }
            ConsoleIn::Managed => true,
            ConsoleIn::Stdin => {
                let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
                match c.epoll.ctl(ControlOperation::Add, libc::STDIN_FILENO, ev) {
                    Ok(()) => {
                        c.watch_stdin = true;
                        true
                    }
                    // epoll refuses regular files and /dev/null.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
                    Err(e) => return Err(os("watching stdin")(e)),
                }
            }
        };
        c.flush_pending();
        Ok((c, watchable))
    }

    /// Let `Ctrl-A x` on stdin end the VM.
    pub fn with_escape(mut self) -> Self {
        self.escape = Some(crate::tty::EscapeFilter::default());
        self
    }

    fn flush_pending(&mut self) {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            let n = self.sink.offer(a);
            if n == 0 {
                return;
            }
            self.pending.drain(..n);
        }
        if self.close_when_drained {
            self.sink.close();
            self.close_when_drained = false;
        }
    }

    fn set_stdin_watch(&mut self, on: bool) {
        let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let _ = self.epoll.ctl(op, libc::STDIN_FILENO, ev);
    }

    fn read_stdin(&mut self, buf: &mut [u8], control: &VmControl) {
        match io::stdin().lock().read(buf) {
            Ok(0) | Err(_) => {
                self.set_stdin_watch(false);
                self.watch_stdin = false;
                self.close_when_drained = true;
            }
            Ok(k) => match &mut self.escape {
                Some(f) => {
                    let (data, quit) = f.filter(&buf[..k]);
                    self.pending.extend(data);
                    if quit {
                        control.stop(StopReason::ConsoleQuit);
                    }
                }
                None => self.pending.extend(&buf[..k]),
            },
        }
        self.flush_pending();
        if !self.pending.is_empty() && self.watch_stdin {
            // The guest has no room: stop reading until it drains.
            self.set_stdin_watch(false);
        }
    }

    /// Waits for the VM to stop, feeding input, enforcing the timeout, and serving the managed
    /// sockets if there are any.
    pub fn run(
        &mut self,
        control: &VmControl,
        timeout: Option<Duration>,
        started: Instant,
        mut managed: Option<ManagedLoop<'_>>,
    ) {
        if let Some(m) = &managed
            && let Err(e) = m.server.register(&self.epoll)
        {
            control.stop(StopReason::Monitor(format!(
                "cannot watch the control sockets: {e}"
            )));
            return;
        }
        let deadline = timeout.map(|t| started + t);
        let mut events = [EpollEvent::default(); 16];
        let mut buf = vec![0u8; 16 * 1024];
        while !control.is_stopping() {
            let waiting = !self.pending.is_empty();
            let mut wait_ms: i32 = if waiting {
                INPUT_RETRY.as_millis() as i32
            } else {
                -1
            };
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    control.stop(StopReason::Timeout(timeout.unwrap_or_default()));
                    break;
                }
                let left_ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
                wait_ms = if wait_ms < 0 {
                    left_ms
                } else {
                    wait_ms.min(left_ms)
                };
            }
            let n = match self.epoll.wait(wait_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    control.stop(StopReason::Monitor(format!("epoll_wait failed: {e}")));
                    break;
                }
            };
            if waiting {
                self.flush_pending();
                if self.pending.is_empty() && self.watch_stdin {
                    self.set_stdin_watch(true);
                }
            }
            let stdin_ready = events[..n].iter().any(|e| e.data() == TOKEN_STDIN);
            if stdin_ready && self.watch_stdin && self.pending.is_empty() {
                self.read_stdin(&mut buf, control);
            }
            if let Some(m) = managed.as_mut() {
                let had = self.pending.len();
                let mut ctx = LoopCtx {
                    epoll: &self.epoll,
                    control,
                    vcpu: m.vcpu,
                    kick: m.kick,
                    input: &mut self.pending,
                };
                for e in &events[..n] {
                    if e.data() >= crate::managed::TOKEN_BASE {
                        m.server.handle(e.data(), &mut ctx);
                    }
                }
                if self.pending.len() != had {
                    self.flush_pending();
                }
            }
        }
    }
}

/// The managed sockets as the event loop drives them.
pub struct ManagedLoop<'a> {
    pub server: &'a mut ManagedServer,
    pub vcpu: &'a crate::vcpu::VcpuContext,
    pub kick: &'a dyn Fn(),
}

/// Runs a built VM to its end: one thread per vCPU fd, the event loop on this thread until the
/// VM stops, then the vCPUs are stopped and their counters summed.
pub fn run_to_end(
    fds: Vec<kvm_ioctls::VcpuFd>,
    ctx: &Arc<crate::vcpu::VcpuContext>,
    console: &mut Console,
    timeout: Option<Duration>,
    started: Instant,
    managed: Option<&mut ManagedServer>,
) -> Result<VcpuCounters, VmError> {
    let vcpus = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| Vcpu {
            exited: false,
            index: i as u32,
            fd,
            ctx: ctx.clone(),
        })
        .collect();
    let handles = spawn_vcpus(vcpus, &ctx.control)?;
    tracing::debug!(
        setup_us = started.elapsed().as_micros() as u64,
        "VM running"
    );
    let kick = || {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(SIGRTMIN());
        }
    };
    let managed = managed.map(|server| ManagedLoop {
        server,
        vcpu: ctx,
        kick: &kick,
    });
    // Every thread of the VM runs now: the event loop's filter is inherited by none of them.
    if let Err(e) = bulwark_sandbox::seccomp::confine_thread(bulwark_sandbox::seccomp::Role::Main) {
        ctx.control.stop(StopReason::Monitor(format!(
            "cannot install the event loop's seccomp filter: {e}"
        )));
    }
    console.run(&ctx.control, timeout, started, managed);
    Ok(stop_vcpus(handles))
}

/// Starts one thread per vCPU. A panic on a vCPU thread stops the VM with a message.
pub fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    control: &Arc<VmControl>,
) -> Result<Vec<JoinHandle<VcpuCounters>>, VmError> {
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let i = vcpu.index;
        let ctl = control.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .stack_size(VCPU_STACK)
            .spawn(move || {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run()))
                    .unwrap_or_else(|_| {
                        ctl.stop(StopReason::Monitor(format!("vCPU {i} thread panicked")));
                        VcpuCounters::default()
                    })
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                control.stop(StopReason::Monitor(format!(
                    "cannot start vCPU thread: {e}"
                )));
                stop_vcpus(handles);
                return Err(os("spawning a vCPU thread")(e));
            }
        }
    }
    Ok(handles)
}

/// Kicks every vCPU out of the guest until its thread ends, and sums their counters.
pub fn stop_vcpus(handles: Vec<JoinHandle<VcpuCounters>>) -> VcpuCounters {
    let give_up = Instant::now() + JOIN_GRACE;
    // The vCPU that stopped the VM is already on its way out; the others are in KVM_RUN or a
    // blocking call until a signal interrupts them. Re-kick until all are gone, backing off
    // from a few microseconds so the common case costs almost nothing.
    let mut pause = Duration::from_micros(5);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < give_up {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(SIGRTMIN());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
    let mut total = VcpuCounters::default();
    for h in handles {
        if !h.is_finished() {
            tracing::warn!("a vCPU thread did not stop in time; leaving it behind");
            continue;
        }
        match h.join() {
            Ok(c) => {
                total.exits += c.exits;
                total.io += c.io;
                total.mmio += c.mmio;
                total.hostcalls += c.hostcalls;
            }
            Err(_) => tracing::error!("a vCPU thread panicked"),
        }
    }
    total
}

/// What the report needs from the devices.
pub struct ReportSources<'a> {
    pub buses: &'a Buses,
    pub stdout: &'a ConsoleSink,
    pub stderr: Option<&'a ConsoleSink>,
    pub postcode: Option<&'a PostCode>,
}

/// The final report of a stopped VM.
pub fn report(
    control: &VmControl,
    counters: VcpuCounters,
    src: ReportSources<'_>,
    started: Instant,
) -> RunReport {
    let pio = src.buses.pio.stats();
    let mmio = src.buses.mmio.stats();
    let stats = VmStats {
        exits: counters.exits,
        io_exits: counters.io,
        mmio_exits: counters.mmio,
        hostcalls: counters.hostcalls,
        unhandled_pio: pio.unhandled_reads + pio.unhandled_writes,
        unhandled_mmio: mmio.unhandled_reads + mmio.unhandled_writes,
        console_bytes: src.stdout.written(),
        console_dropped: src.stdout.dropped() + src.stderr.map_or(0, |s| s.dropped()),
        postcode: src.postcode.map_or((0, 0), |p| p.last()),
    };
    let reason = control
        .reason()
        .unwrap_or_else(|| StopReason::Monitor("VM stopped without a reason".into()));
    RunReport {
        reason,
        console_marker: src.stdout.marker(),
        stats,
        devices: Vec::new(),
        rings: Vec::new(),
        elapsed: started.elapsed(),
    }
}

/// Puts the virtio devices' final counters and rings into `report` (after their threads
/// stopped, so both are final).
pub fn add_device_reports(
    report: &mut RunReport,
    virtio: &[(String, Arc<bulwark_devices::virtio::mmio::MmioTransport>)],
) {
    for (name, t) in virtio {
        report.devices.push((name.clone(), t.stats().snapshot()));
        report.rings.push((name.clone(), t.rings()));
    }
}
