//! The driver's side of a split virtqueue, written into guest memory exactly as a guest driver
//! would lay it out. Device tests and fuzz harnesses use it to offer real rings to the real
//! device code; it can also write what no honest driver would (loops, wild addresses).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// A split ring at fixed guest addresses.
#[derive(Clone, Debug)]
pub struct SplitRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

/// One buffer of a chain: guest address, length, device-writable.
pub type Buf = (u64, u32, bool);

impl SplitRing {
    /// A ring of `size` entries with its three parts at the given addresses.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's view: a ready queue over this ring.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power-of-two ring size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index % self.size));
        let _ = mem.write_obj(addr, at);
        let _ = mem.write_obj(len, at.unchecked_add(8));
        let _ = mem.write_obj(flags, at.unchecked_add(12));
        let _ = mem.write_obj(next, at.unchecked_add(14));
    }

    /// Makes descriptor `head` available (without writing any descriptor).
    pub fn offer(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        let _ = mem.write_obj(head, slot);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Sets the avail index to any value (a hostile driver's jump).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// Writes `bufs` as one chain in fresh descriptors and offers it; returns its head.
    pub fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = index.wrapping_add(1) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, next);
            self.next_desc = next;
        }
        self.offer(mem, head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// Used-ring entry `n`: (descriptor id, bytes written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(n % self.size));
        let id = mem.read_obj(at).unwrap_or(u32::MAX);
        let len = mem.read_obj(at.unchecked_add(4)).unwrap_or(u32::MAX);
        (id, len)
    }
}
