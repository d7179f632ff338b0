//! Virtio devices and their MMIO transport (virtio 1.x, "modern" only).
//!
//! A device implements the narrow [`VirtioDevice`] trait and never knows its transport; the
//! transport ([`mmio::MmioTransport`]) owns the register state machine, the queues' guest
//! addresses, and the interrupt status. Every value here comes from the guest.

pub mod block;
pub mod chain;
pub mod driver;
pub mod mmio;
pub mod net;
mod queue;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use queue::{
    QueueBroken, interrupt_if_wanted, serve_device_queue, serve_device_queue_batches, serve_queue,
    serve_queue_batches,
};

/// `VIRTIO_F_VERSION_1`: the only kind of device bulwark offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC`: a chain may live in a table of its own, taking one ring slot.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Raises the device's interrupt line (an irqfd in a VM).
pub trait InterruptLine: Send + Sync {
    fn trigger(&self);
}

/// The interrupt status register shared by a transport and its device, and the device's way
/// to say it cannot go on (the transport then shows `NEEDS_RESET`).
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    failed: Arc<AtomicBool>,
    line: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interrupt({:#x})", self.status())
    }
}

impl Interrupt {
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            failed: Arc::new(AtomicBool::new(false)),
            line,
        }
    }

    /// Sets `bits` in the status and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        self.line.trigger();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The device met a state it cannot continue from (a broken queue): the transport reports
    /// `NEEDS_RESET` and the driver gets a configuration interrupt. Only a reset clears it.
    pub fn device_failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.signal(INT_CONFIG);
    }

    /// Whether [`Self::device_failed`] was called since the last reset.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.failed.store(false, Ordering::Release);
    }
}

/// What a device did, for `--stats`, metrics and tests. Every device keeps one.
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Requests (chains) served, successful or not.
    pub requests: AtomicU64,
    /// Bytes the device read from guest buffers (written to its back-end).
    pub bytes_out: AtomicU64,
    /// Bytes the device wrote into guest buffers.
    pub bytes_in: AtomicU64,
    /// Requests refused as malformed (bad descriptors, directions, lengths, addresses).
    pub bad_requests: AtomicU64,
    /// Well-formed requests the back-end failed (I/O errors).
    pub io_errors: AtomicU64,
    /// Queues found broken (the device then needs a reset).
    pub broken_queues: AtomicU64,
    /// Back-end processes started again after one died (devices with a back-end).
    pub restarts: AtomicU64,
    /// Back-end processes stopped by their seccomp policy (each also counts a restart).
    pub violations: AtomicU64,
    /// How long the last back-end restart took, from noticing the death to the new back-end's
    /// hello, in µs (a gauge).
    pub last_restart_us: AtomicU64,
    /// Most requests the device had sent its back-end and not yet had answered, at any time.
    pub backend_peak_in_flight: AtomicU64,
}

/// A snapshot of [`DeviceStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub requests: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub bad_requests: u64,
    pub io_errors: u64,
    pub broken_queues: u64,
    pub restarts: u64,
    pub violations: u64,
    pub last_restart_us: u64,
    pub backend_peak_in_flight: u64,
}

impl DeviceCounters {
    /// Every counter by name, in a fixed order (reports, the control channel, metrics).
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        [
            ("requests", self.requests),
            ("bytes_out", self.bytes_out),
            ("bytes_in", self.bytes_in),
            ("bad_requests", self.bad_requests),
            ("io_errors", self.io_errors),
            ("broken_queues", self.broken_queues),
            ("restarts", self.restarts),
            ("violations", self.violations),
            ("last_restart_us", self.last_restart_us),
            ("backend_peak_in_flight", self.backend_peak_in_flight),
        ]
    }
}

impl std::fmt::Display for DeviceCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, v)) in self.fields().iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={v}")?;
        }
        Ok(())
    }
}

impl DeviceStats {
    pub fn snapshot(&self) -> DeviceCounters {
        DeviceCounters {
            requests: Self::get(&self.requests),
            bytes_out: Self::get(&self.bytes_out),
            bytes_in: Self::get(&self.bytes_in),
            bad_requests: Self::get(&self.bad_requests),
            io_errors: Self::get(&self.io_errors),
            broken_queues: Self::get(&self.broken_queues),
            restarts: Self::get(&self.restarts),
            violations: Self::get(&self.violations),
            last_restart_us: Self::get(&self.last_restart_us),
            backend_peak_in_flight: Self::get(&self.backend_peak_in_flight),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    /// Copies a device back-end's restart counters into these (a device without one has
    /// nothing to copy).
    pub fn copy_backend(&self, b: Option<&bulwark_backends::client::BackEndStats>) {
        let Some(b) = b else { return };
        Self::set(&self.restarts, Self::get(&b.restarts));
        Self::set(&self.violations, Self::get(&b.violations));
        Self::set(&self.last_restart_us, Self::get(&b.last_restart_us));
        Self::set(&self.backend_peak_in_flight, Self::get(&b.peak_in_flight));
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Where a device's host side runs (a drive's file I/O, a tap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// In a jailed back-end process that never sees guest memory (the default).
    #[default]
    Process,
    /// On the device's thread in the monitor, straight into guest memory.
    Inline,
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the driver set up {got} queues but the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not usable: its rings lie outside guest memory or its size is invalid")]
    BadQueue(u16),
}

/// Copies the part of a device's configuration space `config` at `offset` into `data`; bytes
/// past its end read as zero (a driver may read any offset at any width).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(start) = usize::try_from(offset)
        && start < config.len()
    {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

/// Checks that the driver set up the `want` queues a device needs, and turns on
/// `VIRTIO_RING_F_EVENT_IDX` handling in each when the driver accepted it.
pub fn take_queues(
    queues: Vec<Queue>,
    want: usize,
    acked_features: u64,
) -> Result<Vec<Queue>, ActivateError> {
    if queues.len() != want {
        return Err(ActivateError::QueueCount {
            got: queues.len(),
            want,
        });
    }
    let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
    Ok(queues
        .into_iter()
        .map(|mut q| {
            virtio_queue::QueueT::set_event_idx(&mut q, event_idx);
            q
        })
        .collect())
}

/// A virtio device behind some transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, 1 = network, 19 = vsock).
    fn device_type(&self) -> u32;
    /// The device's counters.
    fn stats(&self) -> Arc<DeviceStats>;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up and the features it accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// The driver notified queue `index`. Only called on an active device.
    fn process_queue(&mut self, index: u16);
    /// Back to the state before activation.
    fn reset(&mut self);
    /// A host file descriptor the device registered with its [`DeviceEvents`] is ready. Called
    /// whether or not the driver has started the device.
    fn host_event(&mut self, _token: u64, _events: EventSet) {}
    /// The device was started again from a snapshot, on the guest's live rings, in a new
    /// monitor process: host resources it had (connections) are gone, and the device tells
    /// the guest so if its protocol can.
    fn resumed(&mut self) {}
}

/// First token a device may use for its own host file descriptors; the tokens below it are the
/// queues' notifications.
pub const HOST_TOKEN_BASE: u64 = 1 << 32;

/// The event set of a device's worker thread, through which the device watches host file
/// descriptors of its own (a tap, a listening socket, connections) with tokens from
/// [`HOST_TOKEN_BASE`] up. Level-triggered: a device must consume what it is woken for, or
/// stop watching it.
#[derive(Clone, Debug)]
pub struct DeviceEvents {
    epoll: Arc<Epoll>,
}

impl DeviceEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            epoll: Arc::new(Epoll::new()?),
        })
    }

    /// Starts watching `fd` for `events`; the device hears of it as `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops watching `fd` (before closing it).
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Waits up to `timeout_ms` for watched descriptors, as a device's thread does (tests drive
    /// a device with it).
    pub fn wait(&self, timeout_ms: i32, ready: &mut [EpollEvent]) -> std::io::Result<usize> {
        self.epoll.wait(timeout_ms, ready)
    }
}
