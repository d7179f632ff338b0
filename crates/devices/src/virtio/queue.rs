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
    // Whether this pass began because the last one saw more available: then it must find
    // something. A pass that began on a notification may find nothing (with EVENT_IDX the
    // driver notifies while the device is already draining, so the next pass is often empty),
    // and the driver may publish right after that empty look: look again, not give up.
    let mut more_was_seen = false;
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
            // More is pending. If this pass was looking for it and could not take any, the
            // avail ring holds an index no chain can be read for: stop rather than spin.
            Ok(true) if popped == 0 && more_was_seen => break Err(QueueBroken),
            Ok(true) => {
                more_was_seen = true;
                continue;
            }
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

/// A queue for unit tests: ready, EVENT_IDX, [`testing::SIZE`] entries with its rings at
/// [`testing::DESC`], [`testing::AVAIL`] and [`testing::USED`] in 64 KiB of memory.
#[cfg(test)]
pub(crate) mod testing {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const SIZE: u16 = 16;

    pub fn ring() -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        (mem, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    struct NoLine;
    impl super::super::InterruptLine for NoLine {
        fn trigger(&self) {}
    }

    use super::testing::{AVAIL, DESC, SIZE, USED};

    /// Found in the rig (a guest's transmit queue reported broken mid-stream): with EVENT_IDX
    /// the driver notifies while the device drains, so the pass that notification starts often
    /// finds nothing, and when the driver published between that empty look and the re-check
    /// the loop took the queue for broken. A driver publishing as fast as it can against a
    /// device called again and again (as its notifications would) must never break the queue.
    #[test]
    fn a_driver_publishing_during_an_empty_pass_does_not_break_the_queue() {
        const CHAINS: u16 = 60_000;
        let (mem, mut q) = super::testing::ring();
        for i in 0..u64::from(SIZE) {
            let d = DESC + 16 * i;
            mem.write_obj(0x8000u64 + 0x100 * i, GuestAddress(d))
                .unwrap();
            mem.write_obj(64u32, GuestAddress(d + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // device-writable
        }
        let done = Arc::new(AtomicBool::new(false));
        let driver = {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                let used_idx = || mem.load::<u16>(GuestAddress(USED + 2), Ordering::Acquire);
                for n in 0..CHAINS {
                    while n.wrapping_sub(used_idx().unwrap()) >= SIZE {
                        if done.load(Ordering::Relaxed) {
                            return n;
                        }
                        std::hint::spin_loop();
                    }
                    let slot = u64::from(n % SIZE);
                    mem.write_obj(n % SIZE, GuestAddress(AVAIL + 4 + 2 * slot))
                        .unwrap();
                    mem.store(
                        n.wrapping_add(1),
                        GuestAddress(AVAIL + 2),
                        Ordering::Release,
                    )
                    .unwrap();
                }
                CHAINS
            })
        };
        let irq = Interrupt::new(Arc::new(NoLine));
        let mut served = 0u64;
        let mut passes = 0u64;
        while served < u64::from(CHAINS) {
            match serve_queue(&mut q, &mem, &irq, |_| 64) {
                Ok(n) => served += n,
                Err(QueueBroken) => {
                    done.store(true, Ordering::Relaxed);
                    let published = driver.join().unwrap();
                    panic!(
                        "queue broken after {served} chains, {passes} passes ({published} published)"
                    );
                }
            }
            passes += 1;
        }
        assert_eq!(driver.join().unwrap(), CHAINS);
        assert_eq!(served, u64::from(CHAINS));
    }
}
