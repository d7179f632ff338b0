//! virtio-rng: the guest's `/dev/hwrng`, fed from the host's getrandom. Every buffer the guest
//! offers is filled completely with random bytes; read-only buffers are skipped.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{ActivateError, INT_VRING, Interrupt, VirtioDevice};

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
    /// Requests served and bytes given, for tests and metrics.
    pub requests: u64,
    pub bytes: u64,
    /// Chains the queue walker rejected (bad descriptors); the queue stays usable.
    pub bad_chains: u64,
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
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 1,
            });
        }
        let mut q = queues.remove(0);
        q.set_event_idx(acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0);
        self.active = Active {
            mem: Some(mem),
            queue: Some(q),
            interrupt: Some(interrupt),
        };
        Ok(())
    }

    fn process_queue(&mut self, _index: u16) {
        let Active {
            mem: Some(mem),
            queue: Some(q),
            interrupt: Some(irq),
            ..
        } = &mut self.active
        else {
            return;
        };
        let mut used_any = false;
        let mut buf = Vec::new();
        // With EVENT_IDX the driver only notifies past the avail index we publish, so drain,
        // re-enable notifications, and drain again if more arrived meanwhile.
        loop {
            if q.disable_notification(&*mem).is_err() {
                self.bad_chains += 1;
                break;
            }
            let mut popped = 0usize;
            while let Some(chain) = q.pop_descriptor_chain(&*mem) {
                popped += 1;
                let head = chain.head_index();
                let mut written = 0u32;
                for desc in chain.writable() {
                    let len = desc.len().min(MAX_REQUEST - written);
                    buf.resize(len as usize, 0);
                    if getrandom::fill(&mut buf).is_err()
                        || mem.write_slice(&buf, desc.addr()).is_err()
                    {
                        self.bad_chains += 1;
                        break;
                    }
                    written += len;
                    if written >= MAX_REQUEST {
                        break;
                    }
                }
                if q.add_used(&*mem, head, written).is_err() {
                    self.bad_chains += 1;
                    return;
                }
                self.requests += 1;
                self.bytes += u64::from(written);
                used_any = true;
            }
            match q.enable_notification(&*mem) {
                // More is pending. If this pass could not take any of it, the guest's avail
                // ring is broken (an index no chain can be read for): stop rather than spin.
                Ok(true) if popped == 0 => {
                    self.bad_chains += 1;
                    break;
                }
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => {
                    self.bad_chains += 1;
                    break;
                }
            }
        }
        if used_any && q.needs_notification(&*mem).unwrap_or(true) {
            irq.signal(INT_VRING);
        }
    }

    fn reset(&mut self) {
        self.active = Active::default();
    }
}
