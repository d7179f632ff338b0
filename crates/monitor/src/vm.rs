//! Building and running one function micro-VM: KVM VM, memory, devices, vCPU threads, and the
//! event loop on the calling thread.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_devices::console::{ConsoleSink, DebugPort};
use bulwark_devices::info::{INFO_WINDOW, PlatformInfo};
use bulwark_devices::postcode::PostCode;
use bulwark_devices::serial::{COM1_BASE, Serial16550, UART_PORTS};
use bulwark_devices::virtio::block::{Block, DriveConfig};
use bulwark_devices::virtio::mmio::{self, MmioTransport};
use bulwark_devices::virtio::{Interrupt, InterruptLine};
use bulwark_devices::{BusError, BusRange};
use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, SyncReg, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::abi::{DEBUG_CONSOLE_PORT, POSTCODE_PORT};
use crate::control::VmControl;
use crate::exit::Buses;
use crate::hostcall::{HostCalls, InputSource};
use crate::input::ConsoleInput;
use crate::kvm::{self, KvmError};
use crate::managed::{HubWriter, ManagedServer, ManagedSetup, VmView};
use crate::memory::{GuestRam, MemoryError};
use crate::outcome::RunReport;
use crate::payload::layout::INFO_DEVICE_ADDR;
use crate::payload::{self, Layout, PayloadError, PayloadSpec};
use crate::runner::{
    Console, ReportSources, install_kick_handler, make_undumpable, report, run_to_end,
};
use crate::snapshot::cpu::VcpuState;
use crate::snapshot::{
    MemoryWriter, Restore, RestoredState, SnapshotBase, SnapshotError, SnapshotSource,
    SnapshotWriter, Tag,
};
use crate::vcpu::VcpuContext;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Linux(#[from] crate::linux::LinuxError),
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
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Managed(#[from] crate::managed::ManagedError),
    #[error("device setup failed")]
    Devices(#[from] BusError),
    #[error("monitor setup failed: {what}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { what, source }
}

/// Where console input comes from.
#[derive(Debug)]
pub enum ConsoleIn {
    /// The monitor's stdin.
    Stdin,
    /// Fixed bytes, then end of input.
    Bytes(Vec<u8>),
    /// Only what console-socket clients type (a monitor run by bulwarkd); input never ends.
    Managed,
}

/// Where console output goes.
pub struct ConsoleIo {
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    pub input: ConsoleIn,
    /// The control and console sockets of a monitor run by bulwarkd.
    pub managed: Option<ManagedSetup>,
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
            managed: None,
        }
    }

    /// A monitor run by bulwarkd: console output goes to the scroll-back ring that
    /// `console.sock` clients read, input comes from them, and `control.sock` takes requests.
    pub fn managed(dir: &std::path::Path) -> Result<Self, crate::managed::ManagedError> {
        let setup = ManagedSetup::new(dir)?;
        Ok(Self {
            stdout: Box::new(HubWriter(setup.hub.clone())),
            stderr: Box::new(HubWriter(setup.hub.clone())),
            input: ConsoleIn::Managed,
            managed: Some(setup),
        })
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
    /// virtio-blk drives, register windows one page apart from [`VIRTIO_PAYLOAD_BASE`]. A
    /// payload drives them itself (it polls the used ring; there is no interrupt controller).
    pub drives: Vec<DriveConfig>,
}

/// Where a function micro-VM's virtio devices start: the page after the platform device.
pub const VIRTIO_PAYLOAD_BASE: u64 = INFO_DEVICE_ADDR + 0x1000;
/// Most drives a function micro-VM takes (their windows fill the rest of the first 64 KiB).
pub const MAX_PAYLOAD_DRIVES: usize = 15;

/// Function micro-VMs have no interrupt controller: the status register is all there is.
struct NoInterruptLine;

impl InterruptLine for NoInterruptLine {
    fn trigger(&self) {}
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
            drives: Vec::new(),
        }
    }
}

/// Sets (or, with `size` 0, deletes) KVM memory slot `slot`: `size` bytes of guest-physical
/// memory at `gpa` backed by the host mapping at `host`, read-only to the guest if asked (its
/// writes then exit as MMIO writes).
pub(crate) fn set_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host: u64,
    read_only: bool,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: if read_only {
            kvm_bindings::KVM_MEM_READONLY
        } else {
            0
        },
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: callers pass a range of one of the VM's guest RAM mappings (a `GuestRam` region,
    // found through its `GuestMemoryMmap`), which outlives the VM; a deletion maps nothing.
    unsafe { vm.set_user_memory_region(region) }
}

pub(crate) fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, &(gpa, size, host)) in ram.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the region describes one of `ram`'s live mappings, which outlives the VM:
        // `ram` is kept until every vCPU thread has been joined (or the process exits).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("the guest memory region"))?;
    }
    Ok(())
}

struct Devices {
    buses: Buses,
    stdout: Arc<ConsoleSink>,
    stderr: Arc<ConsoleSink>,
    postcode: Arc<PostCode>,
    virtio: Vec<(String, Arc<MmioTransport>)>,
}

fn build_devices(
    cfg: &FunctionVmConfig,
    io: ConsoleIo,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<Devices, VmError> {
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
    if cfg.drives.len() > MAX_PAYLOAD_DRIVES {
        return Err(PayloadError::TooManyDrives(cfg.drives.len()).into());
    }
    let mut virtio = Vec::new();
    for (i, d) in cfg.drives.iter().enumerate() {
        let dev = Block::open(d, &format!("blk{i}")).map_err(PayloadError::from)?;
        let transport = Arc::new(MmioTransport::new(
            Box::new(dev),
            mem.clone(),
            Interrupt::new(Arc::new(NoInterruptLine)),
        ));
        let addr = VIRTIO_PAYLOAD_BASE + 0x1000 * i as u64;
        buses
            .mmio
            .insert(BusRange::new(addr, mmio::WINDOW), transport.clone())?;
        virtio.push((format!("blk{i}"), transport));
    }
    Ok(Devices {
        buses,
        stdout,
        stderr,
        postcode,
        virtio,
    })
}

/// How a function micro-VM's vCPUs begin: at the payload's entry, or where a snapshot left
/// them.
enum VcpuStart<'a> {
    Entry { entry: u64, cpl0: bool },
    Restored(&'a [VcpuState]),
}

fn create_vcpus(
    vm: &VmFd,
    layout: &Layout,
    start: &VcpuStart<'_>,
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
            let (entry, cpl0) = match start {
                VcpuStart::Entry { entry, cpl0 } => (*entry, *cpl0),
                VcpuStart::Restored(states) => {
                    let st = states
                        .get(i as usize)
                        .ok_or_else(|| SnapshotError::Mismatch(format!("no state for vCPU {i}")))?;
                    st.apply(&fd)?;
                    return Ok(fd);
                }
            };
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
    run_function_from(cfg, io, None)
}

/// Resumes a function micro-VM from a snapshot (already authenticated by
/// [`Restore::open`]) and runs it to its end.
pub fn restore_function(
    cfg: &FunctionVmConfig,
    snapshot: Restore,
    io: ConsoleIo,
) -> Result<RunReport, VmError> {
    snapshot.check_fits("function", cfg.vcpus)?;
    run_function_from(cfg, io, Some(snapshot))
}

/// Device numbers of a function micro-VM's snapshot records.
const DEVICE_CONSOLE_INPUT: u32 = 0;

/// What a function micro-VM saves beyond vCPUs and memory: console input not yet read, and
/// the host-call clock.
struct FunctionSnapshot {
    base: SnapshotBase,
    input: Arc<ConsoleInput>,
    drives: usize,
}

impl SnapshotSource for FunctionSnapshot {
    fn refuse(&self) -> Option<String> {
        (self.drives > 0).then(|| {
            "function micro-VMs with virtio drives cannot be snapshotted yet (their queue state is not saved)".to_string()
        })
    }
    fn base(&self) -> &SnapshotBase {
        &self.base
    }
    fn in_kernel_irqchip(&self) -> bool {
        false
    }
    fn write_state(
        &self,
        w: &mut SnapshotWriter<'_>,
        memory: &mut MemoryWriter<'_>,
    ) -> Result<(), SnapshotError> {
        w.record(Tag::Device, DEVICE_CONSOLE_INPUT, &self.input.pending())?;
        memory(w)
    }
}

fn run_function_from(
    cfg: &FunctionVmConfig,
    mut io: ConsoleIo,
    restore: Option<Restore>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    let layout = Layout::new(cfg.memory, cfg.vcpus).map_err(PayloadError::from)?;
    let spec = PayloadSpec {
        file: &cfg.payload,
        arg: &cfg.arg,
        cpl0: cfg.cpl0,
    };
    let image = match restore {
        None => Some(payload::prepare(&layout, &spec)?),
        Some(_) => None,
    };
    let kvm = open_checked(cfg.memory, cfg.vcpus)?;
    make_undumpable()?;
    install_kick_handler()?;

    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    let ram = GuestRam::new(cfg.memory)?;
    register_memory(&vm, &ram)?;
    let regions: Vec<(u64, u64)> = ram.regions().iter().map(|&(g, s, _)| (g, s)).collect();
    let sync_regs = kvm.check_extension(Cap::SyncRegs);
    let (vcpu_fds, restored, clock_start) = match (&image, restore) {
        (Some(image), _) => {
            payload::install(ram.memory(), &layout, image, &spec)?;
            let start = VcpuStart::Entry {
                entry: image.entry,
                cpl0: cfg.cpl0,
            };
            (
                create_vcpus(&vm, &layout, &start, sync_regs)?,
                None,
                started,
            )
        }
        (None, Some(snapshot)) => {
            let clock_ns = snapshot.header.clock_ns;
            let state = snapshot.read(ram.memory(), &regions)?;
            let fds = create_vcpus(&vm, &layout, &VcpuStart::Restored(&state.vcpus), sync_regs)?;
            let clock_start = started
                .checked_sub(Duration::from_nanos(clock_ns))
                .unwrap_or(started);
            (fds, Some(state), clock_start)
        }
        (None, None) => unreachable!("a VM is either fresh or restored"),
    };

    // Console input: a queue fed by the event loop, or direct reads for regular files.
    let queue = Arc::new(ConsoleInput::new());
    if let Some(saved) = restored
        .as_ref()
        .and_then(|r| r.device(DEVICE_CONSOLE_INPUT))
    {
        queue.push(saved);
    }
    let control = Arc::new(VmControl::new(queue.clone()).map_err(os("eventfd"))?);
    let (mut console, watchable) = Console::new(&control, &io.input, queue.clone())?;
    let input = if watchable {
        InputSource::Queue(queue.clone())
    } else {
        InputSource::DirectStdin
    };

    let managed_setup = io.managed.take();
    let devices = build_devices(cfg, io, ram.memory())?;
    let snapshot_source = FunctionSnapshot {
        base: SnapshotBase::new(&kvm, &ram, clock_start).restored(restored.as_ref()),
        input: queue.clone(),
        drives: cfg.drives.len(),
    };
    let mut managed = managed_setup
        .map(|setup| {
            ManagedServer::new(
                setup,
                VmView {
                    kind: "function",
                    vcpus: cfg.vcpus,
                    memory: cfg.memory,
                    started,
                    console: devices.stdout.clone(),
                    devices: devices.virtio.clone(),
                    power_button: None,
                    snapshot: Some(Box::new(snapshot_source)),
                    introspection: None,
                },
            )
        })
        .transpose()?;
    let buses = Arc::new(devices.buses);
    let ctx = Arc::new(VcpuContext {
        write_trap: None,
        breakpoints: None,
        buses: buses.clone(),
        hostcalls: Some(Arc::new(HostCalls {
            layout,
            stdout: devices.stdout.clone(),
            stderr: devices.stderr.clone(),
            input,
            start: clock_start,
        })),
        mem: ram.memory().clone(),
        control: control.clone(),
        software_virtualization: kvm::is_software_virtualization(),
        sync_regs,
        live: crate::vcpu::VcpuLive::for_vcpus(cfg.vcpus),
        jobs: crate::vcpu::VcpuJobs::new(cfg.vcpus),
        restored_hostcalls: restored
            .as_ref()
            .map(RestoredState::pending_hostcalls)
            .unwrap_or_default(),
    });
    let counters = run_to_end(
        vcpu_fds,
        &ctx,
        &mut console,
        cfg.timeout,
        started,
        managed.as_mut(),
    )?;
    let mut report = report(
        &control,
        counters,
        ReportSources {
            buses: &buses,
            stdout: &devices.stdout,
            stderr: Some(&devices.stderr),
            postcode: Some(&devices.postcode),
        },
        started,
    );
    crate::runner::add_device_reports(&mut report, &devices.virtio);
    Ok(report)
}

/// Opens KVM and checks the requested size against the host.
pub(crate) fn open_checked(memory: u64, vcpus: u32) -> Result<kvm_ioctls::Kvm, VmError> {
    let host = kvm::host_memory();
    if memory > host {
        return Err(VmError::HostMemory {
            requested: memory,
            host,
        });
    }
    let kvm = kvm::open()?;
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    Ok(kvm)
}
