//! Harnesses for the virtio queue walker and the block and vsock devices: a hostile driver's
//! rings in real guest memory, the real device code behind them, and (for vsock) real unix
//! sockets on the host side. One file per target; the ring helpers they share are here. See
//! the parent module for the conventions.

mod blk;
mod net;
mod virtqueue;
mod vsock;

pub use blk::virtio_blk;
pub use net::virtio_net;
pub use virtqueue::virtqueue;
pub use vsock::virtio_vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bulwark_devices::virtio::chain::Segment;
use bulwark_devices::virtio::driver::VRING_DESC_F_NEXT;
use bulwark_devices::virtio::{Interrupt, InterruptLine};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// An interrupt line that counts how often it was raised.
struct CountingLine(AtomicU32);

impl InterruptLine for CountingLine {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn counting_interrupt() -> (Interrupt, Arc<CountingLine>) {
    let line = Arc::new(CountingLine(AtomicU32::new(0)));
    (Interrupt::new(line.clone()), line)
}

fn guest_memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("guest memory")
}

/// Whether bytes `[skip, skip + n)` of the stream `segs` lie in guest RAM of `ram` bytes, with
/// each segment's bytes at `addr + offset` computed without wrapping (a segment that runs past
/// the top of the address space does not continue at 0).
fn stream_in_ram(segs: &[Segment], mut skip: u64, mut n: u64, ram: u64) -> bool {
    for s in segs {
        if n == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(n);
        match s.addr.0.checked_add(skip).and_then(|a| a.checked_add(take)) {
            Some(end) if end <= ram => {}
            _ => return false,
        }
        n -= take;
        skip = 0;
    }
    n == 0
}

/// A descriptor as the driver wrote it.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_table(mem: &GuestMemoryMmap, desc: u64, size: u16) -> Vec<RawDesc> {
    (0..u64::from(size))
        .map(|i| {
            let at = desc + 16 * i;
            RawDesc {
                addr: mem.read_obj(GuestAddress(at)).unwrap_or(0),
                len: mem.read_obj(GuestAddress(at + 8)).unwrap_or(0),
                flags: mem.read_obj(GuestAddress(at + 12)).unwrap_or(0),
                next: mem.read_obj(GuestAddress(at + 14)).unwrap_or(0),
            }
        })
        .collect()
}

/// The descriptors of the chain at `head`, walked as the specification bounds a chain: at most
/// `size` descriptors, stopping at an index past the table or before the chain's length passes
/// `u32::MAX`. (No indirect tables: the harnesses that use this never set that flag.)
fn walk(table: &[RawDesc], head: u16) -> Vec<RawDesc> {
    let mut out = Vec::new();
    let mut i = head;
    let mut total = 0u32;
    for _ in 0..table.len() {
        let Some(&d) = table.get(usize::from(i)) else {
            break;
        };
        let Some(t) = total.checked_add(d.len) else {
            break;
        };
        total = t;
        out.push(d);
        if d.flags & VRING_DESC_F_NEXT == 0 {
            break;
        }
        i = d.next;
    }
    out
}

/// `[start, end)` of a descriptor's buffer, cut at the top of the address space.
fn buffer_range(d: &RawDesc) -> (u64, u64) {
    (d.addr, d.addr.saturating_add(u64::from(d.len)))
}
