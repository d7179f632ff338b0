//! Virtio devices and their MMIO transport (virtio 1.x, "modern" only).
//!
//! A device implements the narrow [`VirtioDevice`] trait and never knows its transport; the
//! transport ([`mmio::MmioTransport`]) owns the register state machine, the queues' guest
//! addresses, and the interrupt status. Every value here comes from the guest.

pub mod mmio;
pub mod rng;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the only kind of device bulwark offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

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

/// The interrupt status register shared by a transport and its device.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
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

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("the driver set up {got} queues but the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not usable: its rings lie outside guest memory or its size is invalid")]
    BadQueue(u16),
}

/// A virtio device behind some transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, 1 = network, 19 = vsock).
    fn device_type(&self) -> u32;
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
}
