//! Building and running a Linux VM: in-kernel irqchip and PIT, RAM around the MMIO gap, the
//! kernel, initrd and command line, ACPI tables, platform devices, and vCPUs set up the way
//! firmware would leave them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_devices::console::ConsoleSink;
use bulwark_devices::i8042::{I8042, I8042_DATA_PORT};
use bulwark_devices::postcode::PostCode;
use bulwark_devices::power::{
    ACPI_PM_BASE, ACPI_PM_PORTS, AcpiPm, PVPANIC_ADDR, PVPANIC_LEN, PowerEvent, PowerSignal,
    PvPanic,
};
use bulwark_devices::rtc::{CMOS_BASE, CMOS_PORTS, Cmos};
use bulwark_devices::serial::{COM1_BASE, Serial16550, UART_PORTS};
use bulwark_devices::virtio::block::{Block, DriveConfig, DriveError};
use bulwark_devices::virtio::mmio::{self, MmioTransport};
use bulwark_devices::virtio::net::{Net, NetConfig, NetError};
use bulwark_devices::virtio::rng::Rng;
use bulwark_devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
use bulwark_devices::virtio::worker::DeviceWorker;
use bulwark_devices::virtio::{DeviceEvents, Interrupt, InterruptLine, VirtioDevice};
use bulwark_devices::{BusDevice, BusRange};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, IoEventAddress, SyncReg};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{self, AcpiDevice};
use super::boot::{self, BootError, BootProtocol};
use super::cpu;
use super::layout::*;
use crate::control::VmControl;
use crate::exit::Buses;
use crate::input::ConsoleInput;
use crate::introspect::{Breakpoints, IntrospectionConfig, Introspector, SlotEditor, WriteTrap};
use crate::kvm::{self, KvmError};
use crate::managed::{ManagedServer, VmView};
use crate::memory::GuestRam;
use crate::outcome::{RunReport, StopReason};
use crate::runner::{
    Console, ReportSources, SerialInput, install_kick_handler, make_undumpable, report, run_to_end,
};
use crate::snapshot::cpu::VmState;
use crate::snapshot::{
    MemoryWriter, Restore, RestoredState, SnapshotBase, SnapshotError, SnapshotSource,
    SnapshotWriter, Tag,
};
use crate::vcpu::VcpuContext;
use crate::vm::{ConsoleIo, VmError, kvm_err, open_checked, os, register_memory};
use bulwark_devices::state::DeviceState;

/// The serial port's interrupt line (ISA IRQ 4, IOAPIC pin 4).
const COM1_IRQ: u32 = 4;
/// The power button's Generic Event Device interrupt: pin 3 (COM2's, which has no device).
const GED_IRQ: u32 = 3;
/// Where virtio-mmio devices sit: one 4 KiB page each from here up, in the MMIO gap.
const VIRTIO_MMIO_BASE: u64 = 0xd000_2000;
/// Interrupt lines (IOAPIC pins) free for virtio devices: not the PIT (0, 2), the i8042 (1, 12),
/// the COM ports (3, 4) or the RTC (8).
const VIRTIO_IRQS: [u32; 17] = [
    5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];

/// A virtio interrupt delivered through an irqfd.
struct IrqFd(EventFd);

impl InterruptLine for IrqFd {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::debug!(error = %e, "irqfd write failed");
        }
    }
}
/// Most vCPUs a Linux VM may have (8-bit APIC IDs in the MADT).
pub const MAX_LINUX_VCPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("memory size {0} bytes is too small for a Linux guest; use at least 32M")]
    TooLittleMemory(u64),
    #[error("{0} vCPUs requested; a Linux VM has 1 to {MAX_LINUX_VCPUS}")]
    BadVcpuCount(u32),
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB; declare fewer devices")]
    AcpiTooBig(usize),
    #[error(transparent)]
    Drive(#[from] DriveError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{0} virtio devices requested; a VM has at most {max}", max = VIRTIO_IRQS.len())]
    TooManyDevices(usize),
}

/// Everything needed to boot a Linux VM.
#[derive(Clone, Debug)]
pub struct LinuxVmConfig {
    /// bzImage or ELF vmlinux (with a PVH note), opened before the jail and read straight
    /// into guest memory.
    pub kernel: Arc<std::fs::File>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u32,
    pub timeout: Option<Duration>,
    pub console_limit: u64,
    /// A console line prefix to watch for; the rest of the last such line is reported in
    /// `RunReport::console_marker` (the guest image's job exit status).
    pub console_marker: Option<String>,
    /// virtio-blk drives, in order: the first is `/dev/vda`.
    pub drives: Vec<DriveConfig>,
    /// A virtio-vsock device with its host-side unix socket.
    pub vsock: Option<VsockConfig>,
    /// virtio-net interfaces on taps, in order: the first is `eth0`.
    pub nets: Vec<NetConfig>,
    /// The guest kernel's profile, when the VM's owner allows introspection.
    pub introspection: Option<IntrospectionConfig>,
}

fn power_signal(control: &Arc<VmControl>) -> PowerSignal {
    let control = control.clone();
    Arc::new(move |e| {
        control.stop(match e {
            PowerEvent::PowerOff => StopReason::PowerOff,
            PowerEvent::Reset => StopReason::Reboot,
            PowerEvent::Panic => StopReason::GuestPanic,
        })
    })
}

/// The platform devices of a Linux VM and the buses they sit on.
pub struct Platform {
    pub buses: Buses,
    pub serial: Arc<Serial16550>,
    pub stdout: Arc<ConsoleSink>,
    pub postcode: Arc<PostCode>,
    /// The virtio devices' threads (stopped and joined when dropped).
    pub workers: Vec<DeviceWorker>,
    /// Every virtio device by name, for statistics.
    pub virtio: Vec<(String, Arc<MmioTransport>)>,
    /// The power button's interrupt (ACPI GED): a write presses the button.
    pub power_button: Option<Arc<EventFd>>,
}

/// A virtio device to attach, with the event set it may already have registered fds in.
struct VirtioSpec {
    name: String,
    device: Box<dyn VirtioDevice>,
    events: DeviceEvents,
}

impl VirtioSpec {
    /// Makes the device's event set and the device (which may register host fds in it).
    fn build(
        name: String,
        make: impl FnOnce(&DeviceEvents) -> Result<Box<dyn VirtioDevice>, LinuxError>,
    ) -> Result<Self, VmError> {
        let events = DeviceEvents::new().map_err(os("creating a device's epoll set"))?;
        let device = make(&events)?;
        Ok(Self {
            name,
            device,
            events,
        })
    }
}

/// The virtio devices `cfg` asks for, in the order the guest will number them.
fn virtio_devices(cfg: &LinuxVmConfig) -> Result<Vec<VirtioSpec>, VmError> {
    let mut specs = Vec::new();
    for (i, d) in cfg.drives.iter().enumerate() {
        let name = format!("blk{i}");
        specs.push(VirtioSpec::build(name.clone(), |_| {
            Ok(Box::new(Block::open(d, &name)?))
        })?);
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let name = format!("net{i}");
        specs.push(VirtioSpec::build(name.clone(), |ev| {
            Ok(Box::new(Net::new(n, ev.clone(), &name)?))
        })?);
    }
    if let Some(v) = &cfg.vsock {
        specs.push(VirtioSpec::build("vsock".into(), |ev| {
            Ok(Box::new(Vsock::new(v, ev.clone())?))
        })?);
    }
    specs.push(VirtioSpec::build("rng".into(), |_| {
        Ok(Box::new(Rng::new()))
    })?);
    if specs.len() > VIRTIO_IRQS.len() {
        return Err(LinuxError::TooManyDevices(specs.len()).into());
    }
    Ok(specs)
}

/// Puts a virtio device at its slot: register window on the MMIO bus, interrupt through an
/// irqfd, queue notifications through ioeventfds (KVM completes the guest's write without an
/// exit to the monitor), and a thread that runs the device. Returns its DSDT entry.
fn attach_virtio(
    vm: &kvm_ioctls::VmFd,
    mem: &vm_memory::GuestMemoryMmap,
    platform: &mut Platform,
    slot: usize,
    spec: VirtioSpec,
) -> Result<AcpiDevice, VmError> {
    let addr = VIRTIO_MMIO_BASE + 0x1000 * slot as u64;
    let irq = VIRTIO_IRQS[slot];
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating a virtio irq eventfd"))?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(kvm_err("a virtio device's irqfd"))?;
    let transport = Arc::new(MmioTransport::new(
        spec.device,
        mem.clone(),
        Interrupt::new(Arc::new(IrqFd(irqfd))),
    ));
    platform
        .buses
        .mmio
        .insert(BusRange::new(addr, mmio::WINDOW), transport.clone())?;
    let mut notifiers = Vec::new();
    for q in 0..transport.queue_count() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating a queue ioeventfd"))?;
        vm.register_ioevent(
            &evt,
            &IoEventAddress::Mmio(addr + MmioTransport::NOTIFY_OFFSET),
            q as u32,
        )
        .map_err(kvm_err("a virtio queue ioeventfd"))?;
        notifiers.push(evt);
    }
    let worker = DeviceWorker::spawn(
        &format!("virtio-{}", spec.name),
        transport.clone(),
        notifiers,
        spec.events,
    )
    .map_err(os("starting a virtio device thread"))?;
    platform.workers.push(worker);
    platform.virtio.push((spec.name, transport));
    Ok(AcpiDevice::VirtioMmio {
        uid: slot as u8,
        addr: addr as u32,
        len: mmio::WINDOW as u32,
        irq,
    })
}

fn platform_devices(
    cfg: &LinuxVmConfig,
    out: Box<dyn std::io::Write + Send>,
    control: &Arc<VmControl>,
    vm: &kvm_ioctls::VmFd,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<(Platform, Vec<AcpiDevice>), VmError> {
    let mut stdout = ConsoleSink::new(out, cfg.console_limit);
    if let Some(m) = &cfg.console_marker {
        stdout = stdout.with_marker(m);
    }
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating the serial irq eventfd"))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("the serial port's irqfd"))?;
    let mut platform = platform_buses(Arc::new(stdout), power_signal(control), irq)?;
    let mut acpi_devices = vec![
        AcpiDevice::Uart {
            uid: 0,
            port: COM1_BASE as u16,
            irq: COM1_IRQ,
        },
        AcpiDevice::Rtc,
        AcpiDevice::PvPanic {
            addr: PVPANIC_ADDR as u32,
            len: PVPANIC_LEN as u32,
        },
        AcpiDevice::PowerButton { irq: GED_IRQ },
    ];
    let button = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating the GED eventfd"))?;
    vm.register_irqfd(&button, GED_IRQ)
        .map_err(kvm_err("the power button's irqfd"))?;
    platform.power_button = Some(Arc::new(button));
    for (slot, spec) in virtio_devices(cfg)?.into_iter().enumerate() {
        acpi_devices.push(attach_virtio(vm, mem, &mut platform, slot, spec)?);
    }
    Ok((platform, acpi_devices))
}

/// Builds the platform's buses (no KVM needed: the fuzz harness uses this too).
pub fn platform_buses(
    stdout: Arc<ConsoleSink>,
    signal: PowerSignal,
    serial_irq: EventFd,
) -> Result<Platform, VmError> {
    let serial = Arc::new(Serial16550::new(serial_irq, stdout.clone()));
    let postcode = Arc::new(PostCode::new());
    let i8042 = Arc::new(I8042::new(signal.clone()));
    let mut buses = Buses::default();
    // The i8042 decodes 0x60 (data) and 0x64 (command/status) as offsets 0 and 4 of one range;
    // 0x61 (PIT speaker gate) is served by KVM's in-kernel PIT before it would reach us.
    let pio: [(u64, u64, Arc<dyn BusDevice>); 5] = [
        (COM1_BASE, UART_PORTS, serial.clone()),
        (0x80, 1, postcode.clone()),
        (I8042_DATA_PORT, 5, i8042),
        (CMOS_BASE, CMOS_PORTS, Arc::new(Cmos::default())),
        (
            ACPI_PM_BASE,
            ACPI_PM_PORTS,
            Arc::new(AcpiPm::new(signal.clone())),
        ),
    ];
    for (base, len, dev) in pio {
        buses.pio.insert(BusRange::new(base, len), dev)?;
    }
    buses.mmio.insert(
        BusRange::new(PVPANIC_ADDR, PVPANIC_LEN),
        Arc::new(PvPanic::new(signal)),
    )?;
    Ok(Platform {
        buses,
        serial,
        stdout,
        postcode,
        workers: Vec::new(),
        virtio: Vec::new(),
        power_button: None,
    })
}

/// Boots a Linux guest and runs it until it powers off, resets, panics, crashes or times out.
pub fn run_linux(cfg: &LinuxVmConfig, io: ConsoleIo) -> Result<RunReport, VmError> {
    run_linux_from(cfg, io, None)
}

/// Resumes a Linux guest from a snapshot (already authenticated by [`Restore::open`]) and runs
/// it to its end. The configuration must describe the same VM (memory, vCPUs, devices).
pub fn restore_linux(
    cfg: &LinuxVmConfig,
    snapshot: Restore,
    io: ConsoleIo,
) -> Result<RunReport, VmError> {
    snapshot.check_fits("linux", cfg.vcpus)?;
    run_linux_from(cfg, io, Some(snapshot))
}

/// Snapshot record numbers of a Linux VM's devices: the UART, then virtio devices in slot
/// order from [`DEVICE_VIRTIO_BASE`].
const DEVICE_SERIAL: u32 = 0;
const DEVICE_VIRTIO_BASE: u32 = 16;

/// What a Linux VM saves beyond vCPUs and memory: the in-kernel irqchip, PIT and clock, the
/// UART, and every virtio transport with its queues.
struct LinuxSnapshot {
    base: SnapshotBase,
    vm: Arc<kvm_ioctls::VmFd>,
    serial: Arc<Serial16550>,
    virtio: Vec<(String, Arc<MmioTransport>)>,
}

impl SnapshotSource for LinuxSnapshot {
    fn base(&self) -> &SnapshotBase {
        &self.base
    }
    fn in_kernel_irqchip(&self) -> bool {
        true
    }
    fn write_state(
        &self,
        w: &mut SnapshotWriter<'_>,
        memory: &mut MemoryWriter<'_>,
    ) -> Result<(), SnapshotError> {
        // Device threads wait at their transports' locks until the guards drop, so nothing
        // writes guest memory or rings while they are copied.
        let frozen: Vec<_> = self.virtio.iter().map(|(_, t)| t.freeze()).collect();
        VmState::capture(&self.vm)?.write(w)?;
        w.record(Tag::Device, DEVICE_SERIAL, &self.serial.save_state())?;
        for (i, f) in frozen.iter().enumerate() {
            w.record(Tag::Device, DEVICE_VIRTIO_BASE + i as u32, &f.save_state())?;
        }
        memory(w)?;
        drop(frozen);
        Ok(())
    }
}

fn run_linux_from(
    cfg: &LinuxVmConfig,
    io: ConsoleIo,
    restore: Option<Restore>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    if cfg.memory < MIN_MEMORY {
        return Err(LinuxError::TooLittleMemory(cfg.memory).into());
    }
    if cfg.vcpus == 0 || cfg.vcpus > MAX_LINUX_VCPUS {
        return Err(LinuxError::BadVcpuCount(cfg.vcpus).into());
    }
    let kvm = open_checked(cfg.memory, cfg.vcpus)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name).into());
        }
    }
    make_undumpable()?;
    install_kick_handler()?;

    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("the in-kernel PIT"))?;

    let backing = GuestRam::huge_backing();
    tracing::debug!(?backing, "guest RAM backing");
    let ram = GuestRam::with_regions(&ram_regions(cfg.memory), backing)?;
    register_memory(&vm, &ram)?;
    let mem = ram.memory();
    let regions: Vec<(u64, u64)> = ram.regions().iter().map(|&(g, s, _)| (g, s)).collect();
    let restored = match restore {
        Some(snapshot) => Some(snapshot.read(mem, &regions)?),
        None => None,
    };

    let control = Arc::new(VmControl::new(Arc::new(ConsoleInput::new())).map_err(os("eventfd"))?);
    let ConsoleIo {
        stdout,
        input,
        managed: managed_setup,
        ..
    } = io;
    let (platform, devices) = platform_devices(cfg, stdout, &control, &vm, mem)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let sync_regs = kvm.check_extension(Cap::SyncRegs);
    let fds = match &restored {
        None => boot_fresh(cfg, &vm, mem, &devices, &supported, sync_regs)?,
        Some(state) => {
            let mut fds = Vec::new();
            for i in 0..cfg.vcpus {
                let fd = new_vcpu(&vm, i, cfg.vcpus, &supported, sync_regs)?;
                let st = state
                    .vcpus
                    .get(i as usize)
                    .ok_or_else(|| SnapshotError::Mismatch(format!("no state for vCPU {i}")))?;
                st.apply(&fd)?;
                fds.push(fd);
            }
            // The interrupt controllers first: a device that raises its line while it is
            // restored (pending status, the vsock reset event) must not be overwritten by the
            // saved IOAPIC state.
            state.vm.apply(&vm)?;
            restore_devices(state, &platform)?;
            fds
        }
    };
    let restored_hostcalls = restored
        .as_ref()
        .map(RestoredState::pending_hostcalls)
        .unwrap_or_default();
    // The VM fd must outlive the vCPUs: closing it deassigns every irqfd and ioeventfd.
    let vm = Arc::new(vm);
    let snapshot_source = LinuxSnapshot {
        base: SnapshotBase::new(&kvm, &ram, started).restored(restored.as_ref()),
        vm: vm.clone(),
        serial: platform.serial.clone(),
        virtio: platform.virtio.clone(),
    };
    run_platform(RunParts {
        cfg,
        vm,
        started,
        control,
        input,
        managed_setup,
        platform,
        mem,
        sync_regs,
        fds,
        restored_hostcalls,
        snapshot_source,
    })
}

/// Puts a snapshot's device state back into freshly built devices.
fn restore_devices(state: &RestoredState, platform: &Platform) -> Result<(), SnapshotError> {
    let bad = |e: bulwark_devices::state::StateError| SnapshotError::Mismatch(e.to_string());
    let serial = state
        .device(DEVICE_SERIAL)
        .ok_or_else(|| SnapshotError::Malformed("no serial port state".into()))?;
    platform.serial.restore_state(serial).map_err(bad)?;
    for (i, (name, t)) in platform.virtio.iter().enumerate() {
        let data = state
            .device(DEVICE_VIRTIO_BASE + i as u32)
            .ok_or_else(|| SnapshotError::Mismatch(format!("no state for virtio device {name}")))?;
        t.restore_state(data).map_err(bad)?;
    }
    let known = platform.virtio.len() as u32;
    if let Some((i, _)) = state.devices.iter().find(|(i, _)| {
        *i != DEVICE_SERIAL && !(DEVICE_VIRTIO_BASE..DEVICE_VIRTIO_BASE + known).contains(i)
    }) {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot has device {i}, which this VM's configuration lacks"
        )));
    }
    Ok(())
}

/// A vCPU with its CPUID set.
fn new_vcpu(
    vm: &kvm_ioctls::VmFd,
    i: u32,
    vcpus: u32,
    supported: &kvm_bindings::CpuId,
    sync_regs: bool,
) -> Result<kvm_ioctls::VcpuFd, VmError> {
    let mut fd = vm
        .create_vcpu(u64::from(i))
        .map_err(kvm_err("creating a vCPU"))?;
    if sync_regs {
        fd.set_sync_valid_reg(SyncReg::Register);
    }
    fd.set_cpuid2(&cpu::cpuid(supported, i, vcpus))
        .map_err(kvm_err("the vCPU's CPUID"))?;
    Ok(fd)
}

/// Loads the kernel, initrd, command line and ACPI tables into guest memory and sets the vCPUs
/// up the way firmware leaves them.
fn boot_fresh(
    cfg: &LinuxVmConfig,
    vm: &kvm_ioctls::VmFd,
    mem: &vm_memory::GuestMemoryMmap,
    devices: &[AcpiDevice],
    supported: &kvm_bindings::CpuId,
    sync_regs: bool,
) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
    let loaded = boot::load_kernel(mem, &mut &*cfg.kernel).map_err(LinuxError::from)?;
    let initrd = match &cfg.initrd {
        Some(rd) => {
            let max = loaded
                .result
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max) + 1)
                .filter(|&m| m > 1)
                .unwrap_or(MMIO_GAP_START);
            let addr = boot::load_initrd(mem, cfg.memory, loaded.result.kernel_end, rd, max)
                .map_err(LinuxError::from)?;
            Some((addr, rd.len() as u64))
        }
        None => None,
    };
    boot::write_cmdline(mem, &cfg.cmdline).map_err(LinuxError::from)?;
    let tables = acpi::build(ACPI_START, cfg.vcpus, devices);
    if tables.len() as u64 > ACPI_END - ACPI_START {
        return Err(LinuxError::AcpiTooBig(tables.len()).into());
    }
    mem.write_slice(&tables, GuestAddress(ACPI_START))
        .map_err(|_| LinuxError::Boot(BootError::GuestMemory(ACPI_START)))?;
    match loaded.protocol {
        BootProtocol::Linux64 { .. } => boot::write_zero_page(
            mem,
            &loaded,
            cfg.memory,
            cfg.cmdline.len(),
            initrd,
            ACPI_START,
        ),
        BootProtocol::Pvh { .. } => boot::write_pvh_start_info(mem, cfg.memory, initrd, ACPI_START),
    }
    .map_err(LinuxError::from)?;

    let msrs = cpu::boot_msr_list()
        .map_err(|e| os("building the MSR list")(std::io::Error::other(format!("{e:?}"))))?;
    let mut fds = Vec::new();
    for i in 0..cfg.vcpus {
        let fd = new_vcpu(vm, i, cfg.vcpus, supported, sync_regs)?;
        fd.set_msrs(&msrs).map_err(kvm_err("the boot MSRs"))?;
        fd.set_fpu(&cpu::boot_fpu())
            .map_err(kvm_err("the vCPU's FPU state"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        cpu::set_lint_pins(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("the local APIC"))?;
        if i == 0 {
            let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let regs =
                boot::boot_cpu_state(mem, loaded.protocol, &mut sregs).map_err(LinuxError::from)?;
            fd.set_sregs(&sregs)
                .map_err(kvm_err("the boot CPU's segment and control registers"))?;
            fd.set_regs(&regs)
                .map_err(kvm_err("the boot CPU's registers"))?;
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// A built Linux VM, ready to run.
struct RunParts<'a> {
    cfg: &'a LinuxVmConfig,
    /// Held until the vCPUs are joined (see `run_linux_from`).
    vm: Arc<kvm_ioctls::VmFd>,
    started: Instant,
    control: Arc<VmControl>,
    input: crate::vm::ConsoleIn,
    managed_setup: Option<crate::managed::ManagedSetup>,
    platform: Platform,
    mem: &'a vm_memory::GuestMemoryMmap,
    sync_regs: bool,
    fds: Vec<kvm_ioctls::VcpuFd>,
    restored_hostcalls: Vec<Option<u32>>,
    snapshot_source: LinuxSnapshot,
}

/// Runs the vCPUs and the event loop until the VM stops; the report.
fn run_platform(parts: RunParts<'_>) -> Result<RunReport, VmError> {
    let RunParts {
        cfg,
        vm,
        started,
        control,
        input,
        managed_setup,
        platform,
        mem,
        sync_regs,
        fds,
        restored_hostcalls,
        snapshot_source,
    } = parts;
    let (console, _) = Console::new(
        &control,
        &input,
        Arc::new(SerialInput(platform.serial.clone())),
    )?;
    // On a terminal, keystrokes go to the guest unprocessed while it runs (restored on
    // return), and Ctrl-A x leaves.
    let raw = match input {
        crate::vm::ConsoleIn::Stdin => crate::tty::RawTerminal::enable_if_tty()
            .map_err(os("putting the terminal in raw mode"))?,
        crate::vm::ConsoleIn::Bytes(_) | crate::vm::ConsoleIn::Managed => None,
    };
    let mut console = if raw.is_some() {
        console.with_escape()
    } else {
        console
    };
    let buses = Arc::new(platform.buses);
    // Introspection's write protection and breakpoints: the vCPUs report writes to guarded
    // memory and breakpoint hits here.
    let write_trap = cfg
        .introspection
        .as_ref()
        .map(|_| Arc::new(WriteTrap::default()));
    let breakpoints = cfg
        .introspection
        .as_ref()
        .map(|_| Arc::new(Breakpoints::default()));
    let introspector = cfg.introspection.clone().map(|c| {
        let slots = SlotEditor::new(vm.clone(), &snapshot_source.base.regions, mem);
        Arc::new(Introspector::new(
            c,
            write_trap.clone().map(|t| (slots, t)),
            breakpoints.clone(),
        ))
    });
    let ctx = Arc::new(VcpuContext {
        write_trap,
        breakpoints,
        buses: buses.clone(),
        hostcalls: None,
        mem: mem.clone(),
        control: control.clone(),
        software_virtualization: kvm::is_software_virtualization(),
        sync_regs,
        live: crate::vcpu::VcpuLive::for_vcpus(cfg.vcpus),
        jobs: crate::vcpu::VcpuJobs::new(cfg.vcpus),
        restored_hostcalls,
    });
    let mut managed = managed_setup
        .map(|setup| {
            ManagedServer::new(
                setup,
                VmView {
                    kind: "linux",
                    vcpus: cfg.vcpus,
                    memory: cfg.memory,
                    started,
                    console: platform.stdout.clone(),
                    devices: platform.virtio.clone(),
                    power_button: platform.power_button.clone().map(|evt| {
                        Box::new(move || {
                            let _ = evt.write(1);
                        }) as Box<dyn Fn() + Send>
                    }),
                    snapshot: Some(Box::new(snapshot_source)),
                    introspection: introspector,
                },
            )
        })
        .transpose()?;
    let counters = run_to_end(
        fds,
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
            stdout: &platform.stdout,
            stderr: None,
            postcode: Some(&platform.postcode),
        },
        started,
    );
    // Stop the device threads before reading their final counters; the VM goes after them.
    drop(platform.workers);
    drop(vm);
    crate::runner::add_device_reports(&mut report, &platform.virtio);
    Ok(report)
}
