//! virtio-rng: the guest's `/dev/hwrng`, fed from the host's getrandom. Every buffer the guest
//! offers is filled completely with random bytes; read-only buffers are skipped.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use std::sync::Arc;

use super::{ActivateError, DeviceStats, Interrupt, VirtioDevice, serve_device_queue};

/// Most bytes handed out per request (Linux asks for at most a page or so).
const MAX_REQUEST: u32 = 64 * 1024;

#[derive(Debug, Default)]
struct Active {
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    interrupt: Option<Interrupt>,
}

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    active: Active,
    stats: Arc<DeviceStats>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        4
    }

    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let q = super::take_queues(queues, 1, acked_features)?.pop();
        self.active = Active {
            mem: Some(mem),
            queue: q,
            interrupt: Some(interrupt),
        };
        Ok(())
    }

    fn process_queue(&mut self, _index: u16) {
        let Active {
            mem: Some(mem),
            queue: Some(q),
            interrupt: Some(irq),
        } = &mut self.active
        else {
            return;
        };
        let mut buf = Vec::new();
        let stats = &self.stats;
        let served = serve_device_queue(q, mem, irq, stats, |chain| {
            let mut written = 0u32;
            for desc in chain.writable() {
                let len = desc.len().min(MAX_REQUEST - written);
                buf.resize(len as usize, 0);
                if getrandom::fill(&mut buf).is_err() || mem.write_slice(&buf, desc.addr()).is_err()
                {
                    DeviceStats::add(&stats.bad_requests, 1);
                    break;
                }
                written += len;
                if written >= MAX_REQUEST {
                    break;
                }
            }
            DeviceStats::add(&stats.requests, 1);
            DeviceStats::add(&stats.bytes_in, u64::from(written));
            written
        });
        if !served {
            self.active.queue = None;
        }
    }

    fn reset(&mut self) {
        self.active = Active::default();
    }
}
