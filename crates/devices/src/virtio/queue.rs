//! The one loop every device runs over a queue: take the chains the driver made available,
//! hand each to the device, publish what was used, and interrupt the driver when it asked to
//! be. With `VIRTIO_RING_F_EVENT_IDX` the driver only notifies past the avail index the device
//! published, so the loop drains, re-enables notifications, and drains again if more arrived.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{DeviceStats, INT_VRING, Interrupt};

/// The queue's rings cannot be used any more (an index past the ring, a used ring outside
/// guest memory). The device stops serving it until the driver resets the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the guest's virtqueue rings are broken; the device needs a reset")]
pub struct QueueBroken;

/// Serves every available chain of `q` with `handle`, which returns the number of bytes it
/// wrote into the chain's device-writable buffers. Returns how many chains were served.
///
/// On [`QueueBroken`] the caller should stop using the queue and report the device failed.
pub fn serve_queue<F>(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    mut handle: F,
) -> Result<u64, QueueBroken>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    serve_queue_batches(q, mem, irq, |chains| {
        chains
            .into_iter()
            .map(|c| (c.head_index(), handle(c)))
            .collect()
    })
}

/// [`serve_queue`] for a device that serves the chains available at one look together:
/// `handle` gets them all and returns, for each, its head index and the bytes it wrote.
pub fn serve_queue_batches<F>(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    mut handle: F,
) -> Result<u64, QueueBroken>
where
    F: FnMut(Vec<DescriptorChain<&GuestMemoryMmap>>) -> Vec<(u16, u32)>,
{
    let mut served = 0u64;
    let result = loop {
        if q.disable_notification(mem).is_err() {
            break Err(QueueBroken);
        }
        // At most a ring's worth per pass: a driver that keeps publishing while the device
        // takes chains gets served in several passes, not into an ever-growing batch.
        let size = q.size();
        let mut chains: Vec<_> = std::iter::from_fn(|| q.pop_descriptor_chain(mem))
            .take(usize::from(size))
            .collect();
        // A head index past the ring cannot be published, which breaks the queue: nothing
        // after it is served (as when chains are served one at a time).
        if let Some(bad) = chains.iter().position(|c| c.head_index() >= size) {
            chains.truncate(bad + 1);
        }
        let popped = chains.len() as u64;
        let used = if chains.is_empty() {
            Vec::new()
        } else {
            handle(chains)
        };
        served += popped;
        if used
            .iter()
            .any(|&(head, n)| q.add_used(mem, head, n).is_err())
        {
            break Err(QueueBroken);
        }
        match q.enable_notification(mem) {
            // More is pending. If this pass could not take any of it, the avail ring holds an
            // index no chain can be read for: stop rather than spin.
            Ok(true) if popped == 0 => break Err(QueueBroken),
            Ok(true) => continue,
            Ok(false) => break Ok(served),
            Err(_) => break Err(QueueBroken),
        }
    };
    if served > 0 {
        interrupt_if_wanted(q, mem, irq);
    }
    result
}

/// After the device published used entries outside [`serve_queue`]: raise the queue's
/// interrupt unless the driver suppressed it (flags, or its used event with EVENT_IDX).
pub fn interrupt_if_wanted(q: &mut Queue, mem: &GuestMemoryMmap, irq: &Interrupt) {
    if q.needs_notification(mem).unwrap_or(true) {
        irq.signal(INT_VRING);
    }
}

/// [`serve_queue`] for a device: a broken queue is counted and reported (`NEEDS_RESET`).
/// Returns `false` when the queue broke; the device then stops using it until a reset.
pub fn serve_device_queue<F>(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    stats: &DeviceStats,
    mut handle: F,
) -> bool
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    serve_device_queue_batches(q, mem, irq, stats, |chains| {
        chains
            .into_iter()
            .map(|c| (c.head_index(), handle(c)))
            .collect()
    })
}

/// [`serve_device_queue`] with [`serve_queue_batches`]' handler.
pub fn serve_device_queue_batches<F>(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    stats: &DeviceStats,
    handle: F,
) -> bool
where
    F: FnMut(Vec<DescriptorChain<&GuestMemoryMmap>>) -> Vec<(u16, u32)>,
{
    if serve_queue_batches(q, mem, irq, handle).is_ok() {
        return true;
    }
    DeviceStats::add(&stats.broken_queues, 1);
    irq.device_failed();
    false
}
