//! Building and running one function micro-VM: KVM VM, memory, devices, vCPU threads, and the
//! event loop on the calling thread.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulwark_devices::console::{ConsoleSink, DebugPort};
use bulwark_devices::info::{INFO_WINDOW, PlatformInfo};
use bulwark_devices::postcode::PostCode;
use bulwark_devices::serial::{COM1_BASE, Serial16550, UART_PORTS};
use bulwark_devices::{BusError, BusRange};
use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, SyncReg, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::abi::{DEBUG_CONSOLE_PORT, POSTCODE_PORT};
use crate::control::VmControl;
use crate::exit::Buses;
use crate::hostcall::{HostCalls, InputSource};
use crate::input::ConsoleInput;
use crate::kvm::{self, KvmError};
use crate::memory::{GuestRam, MemoryError};
use crate::outcome::{RunReport, StopReason, VmStats};
use crate::payload::layout::INFO_DEVICE_ADDR;
use crate::payload::{self, Layout, PayloadError, PayloadSpec};
use crate::vcpu::{Vcpu, VcpuContext, VcpuCounters};

/// Stack size of vCPU threads: the exit path is shallow and buffers live on the heap.
const VCPU_STACK: usize = 256 * 1024;
/// How long a stopping VM waits for its vCPU threads before giving up on joining them.
const JOIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u32, max: usize },
    #[error("memory size {requested} bytes exceeds this host's RAM ({host} bytes); lower --memory")]
    HostMemory { requested: u64, host: u64 },
    #[error("KVM refused {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("device setup failed")]
    Devices(#[from] BusError),
    #[error("monitor setup failed: {what}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { what, source }
}

/// Where console input comes from.
#[derive(Debug)]
pub enum ConsoleIn {
    /// The monitor's stdin.
    Stdin,
    /// Fixed bytes, then end of input.
    Bytes(Vec<u8>),
}

/// Where console output goes.
pub struct ConsoleIo {
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    pub input: ConsoleIn,
}

impl std::fmt::Debug for ConsoleIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleIo")
            .field("input", &self.input)
            .finish()
    }
}

impl ConsoleIo {
    /// The process's own stdio.
    pub fn stdio() -> Self {
        Self {
            stdout: Box::new(io::stdout()),
            stderr: Box::new(io::stderr()),
            input: ConsoleIn::Stdin,
        }
    }
}

/// Everything needed to run a function micro-VM.
#[derive(Clone, Debug)]
pub struct FunctionVmConfig {
    pub payload: Vec<u8>,
    pub memory: u64,
    pub vcpus: u32,
    pub arg: String,
    pub cpl0: bool,
    pub timeout: Option<Duration>,
    /// Bytes of guest output passed through before the rest is dropped.
    pub console_limit: u64,
}

impl Default for FunctionVmConfig {
    fn default() -> Self {
        Self {
            payload: Vec::new(),
            memory: 16 << 20,
            vcpus: 1,
            arg: String::new(),
            cpl0: false,
            timeout: None,
            console_limit: 64 << 20,
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick signal only interrupts `KVM_RUN` and blocking syscalls; its handler does nothing.
fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| os("installing the vCPU kick signal handler")(e.into()));
    });
    result
}

/// Other processes of the same user must not ptrace the monitor or read its memory.
fn make_undumpable() -> Result<(), VmError> {
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(os("prctl(PR_SET_DUMPABLE)")(io::Error::last_os_error()));
    }
    Ok(())
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: the region describes `ram`'s live mapping, which outlives the VM: `ram` is kept
    // until every vCPU thread has been joined (or the process exits).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("the guest memory region"))
}

struct Devices {
    buses: Buses,
    stdout: Arc<ConsoleSink>,
    stderr: Arc<ConsoleSink>,
    postcode: Arc<PostCode>,
}

fn build_devices(cfg: &FunctionVmConfig, io: ConsoleIo) -> Result<Devices, VmError> {
    let stdout = Arc::new(ConsoleSink::new(io.stdout, cfg.console_limit));
    let stderr = Arc::new(ConsoleSink::new(io.stderr, cfg.console_limit));
    let postcode = Arc::new(PostCode::new());
    let mut buses = Buses {
        payload_abi: true,
        ..Default::default()
    };
    buses
        .pio
        .insert(BusRange::new(POSTCODE_PORT.into(), 1), postcode.clone())?;
    buses.pio.insert(
        BusRange::new(DEBUG_CONSOLE_PORT.into(), 1),
        Arc::new(DebugPort::new(stdout.clone())),
    )?;
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating the serial irq eventfd"))?;
    buses.pio.insert(
        BusRange::new(COM1_BASE, UART_PORTS),
        Arc::new(Serial16550::new(serial_irq, stdout.clone())),
    )?;
    buses.mmio.insert(
        BusRange::new(INFO_DEVICE_ADDR, INFO_WINDOW),
        Arc::new(PlatformInfo::new(cfg.vcpus, cfg.memory)),
    )?;
    Ok(Devices {
        buses,
        stdout,
        stderr,
        postcode,
    })
}

fn create_vcpus(
    vm: &VmFd,
    layout: &Layout,
    entry: u64,
    cpl0: bool,
    sync_regs: bool,
) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
    let host = payload::cpuid::HostCpu::read();
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    (0..layout.vcpus)
        .map(|i| {
            let mut fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("creating a vCPU"))?;
            if sync_regs {
                fd.set_sync_valid_reg(SyncReg::Register);
            }
            let cpuid = payload::cpuid::cpuid(&host, i, layout.vcpus)
                .map_err(|e| os("building the CPUID table")(io::Error::other(format!("{e:?}"))))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("the vCPU's CPUID"))?;
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let regs = payload::entry_state(layout, entry, i, cpl0, &mut sregs);
            fd.set_sregs(&sregs)
                .map_err(kvm_err("the vCPU's 64-bit segment and control registers"))?;
            fd.set_regs(&regs)
                .map_err(kvm_err("the vCPU's registers"))?;
            fd.set_fpu(&fpu).map_err(kvm_err("the vCPU's FPU state"))?;
            Ok(fd)
        })
        .collect()
}

/// Runs a function micro-VM to its end. Errors are set-up failures; how the guest ended —
/// including faults and timeouts — is in the report.
pub fn run_function(cfg: &FunctionVmConfig, io: ConsoleIo) -> Result<RunReport, VmError> {
    let started = Instant::now();
    let layout = Layout::new(cfg.memory, cfg.vcpus).map_err(PayloadError::from)?;
    let spec = PayloadSpec {
        file: &cfg.payload,
        arg: &cfg.arg,
        cpl0: cfg.cpl0,
    };
    let image = payload::prepare(&layout, &spec)?;
    let host = kvm::host_memory();
    if cfg.memory > host {
        return Err(VmError::HostMemory {
            requested: cfg.memory,
            host,
        });
    }
    let kvm = kvm::open()?;
    let max = kvm.get_max_vcpus();
    if cfg.vcpus as usize > max {
        return Err(VmError::TooManyVcpus {
            requested: cfg.vcpus,
            max,
        });
    }
    make_undumpable()?;
    install_kick_handler()?;

    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    let ram = GuestRam::new(cfg.memory)?;
    register_memory(&vm, &ram)?;
    payload::install(ram.memory(), &layout, &image, &spec)?;
    let sync_regs = kvm.check_extension(Cap::SyncRegs);
    let vcpu_fds = create_vcpus(&vm, &layout, image.entry, cfg.cpl0, sync_regs)?;

    // Console input: a queue fed by the event loop, or direct reads for regular files.
    let epoll = Epoll::new().map_err(os("epoll_create"))?;
    let queue = Arc::new(ConsoleInput::new());
    let control = Arc::new(VmControl::new(queue.clone()).map_err(os("eventfd"))?);
    epoll
        .ctl(
            ControlOperation::Add,
            control.exit_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_EXIT),
        )
        .map_err(os("epoll_ctl"))?;
    let mut watch_stdin = false;
    let input = match &io.input {
        ConsoleIn::Bytes(b) => {
            queue.push(b);
            queue.close();
            InputSource::Queue(queue.clone())
        }
        ConsoleIn::Stdin => {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
            match epoll.ctl(ControlOperation::Add, libc::STDIN_FILENO, ev) {
                Ok(()) => {
                    watch_stdin = true;
                    InputSource::Queue(queue.clone())
                }
                // epoll refuses regular files and /dev/null: those never block, read them directly.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => InputSource::DirectStdin,
                Err(e) => return Err(os("watching stdin")(e)),
            }
        }
    };

    let devices = build_devices(cfg, io)?;
    let buses = Arc::new(devices.buses);
    let ctx = Arc::new(VcpuContext {
        buses: buses.clone(),
        hostcalls: Arc::new(HostCalls {
            layout,
            stdout: devices.stdout.clone(),
            stderr: devices.stderr.clone(),
            input,
            start: started,
        }),
        mem: ram.memory().clone(),
        control: control.clone(),
        software_virtualization: kvm::is_software_virtualization(),
        sync_regs,
    });

    let mut handles = Vec::with_capacity(vcpu_fds.len());
    for (i, fd) in vcpu_fds.into_iter().enumerate() {
        let vcpu = Vcpu {
            index: i as u32,
            fd,
            ctx: ctx.clone(),
        };
        let ctl = control.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .stack_size(VCPU_STACK)
            .spawn(move || {
                // A bug on the exit path must stop this VM with a message, not hang it.
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
    tracing::debug!(
        setup_us = started.elapsed().as_micros() as u64,
        "VM running"
    );

    event_loop(&epoll, &control, &queue, watch_stdin, cfg.timeout, started);
    let counters = stop_vcpus(handles);

    let bus_pio = buses.pio.stats();
    let bus_mmio = buses.mmio.stats();
    let stats = VmStats {
        exits: counters.exits,
        io_exits: counters.io,
        mmio_exits: counters.mmio,
        hostcalls: counters.hostcalls,
        unhandled_pio: bus_pio.unhandled_reads + bus_pio.unhandled_writes,
        unhandled_mmio: bus_mmio.unhandled_reads + bus_mmio.unhandled_writes,
        console_bytes: devices.stdout.written(),
        console_dropped: devices.stdout.dropped() + devices.stderr.dropped(),
        postcode: devices.postcode.last(),
    };
    let reason = control
        .reason()
        .unwrap_or_else(|| StopReason::Monitor("VM stopped without a reason".into()));
    Ok(RunReport {
        reason,
        stats,
        elapsed: started.elapsed(),
    })
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_STDIN: u64 = 1;

/// Waits for the VM to stop, feeding stdin to the input queue and enforcing the timeout.
fn event_loop(
    epoll: &Epoll,
    control: &VmControl,
    queue: &ConsoleInput,
    mut watch_stdin: bool,
    timeout: Option<Duration>,
    started: Instant,
) {
    let deadline = timeout.map(|t| started + t);
    let mut events = [EpollEvent::default(); 4];
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_paused = false;
    while !control.is_stopping() {
        if stdin_paused && queue.has_room() {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
            stdin_paused = epoll
                .ctl(ControlOperation::Add, libc::STDIN_FILENO, ev)
                .is_err();
        }
        let mut wait_ms: i32 = if stdin_paused { 50 } else { -1 };
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
        let n = match epoll.wait(wait_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                control.stop(StopReason::Monitor(format!("epoll_wait failed: {e}")));
                break;
            }
        };
        for ev in &events[..n] {
            if ev.data() != TOKEN_STDIN || !watch_stdin {
                continue;
            }
            match io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => {
                    queue.close();
                    let _ = epoll.ctl(ControlOperation::Delete, libc::STDIN_FILENO, *ev);
                    watch_stdin = false;
                }
                Ok(k) => {
                    queue.push(&buf[..k]);
                    if !queue.has_room() {
                        let _ = epoll.ctl(ControlOperation::Delete, libc::STDIN_FILENO, *ev);
                        stdin_paused = true;
                    }
                }
            }
        }
    }
}

/// Kicks every vCPU out of the guest until its thread ends, and sums their counters.
fn stop_vcpus(handles: Vec<JoinHandle<VcpuCounters>>) -> VcpuCounters {
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
