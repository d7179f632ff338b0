//! Address-range buses for port I/O and MMIO.
//!
//! A [`Bus`] is built once, before the vCPUs start, and is immutable afterwards: lookups on the
//! exit path take no lock. Accesses that hit no device are not errors — a guest may probe
//! anything — they read as all-ones, writes are dropped, and both are counted.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
///
/// Implementations use interior mutability: several vCPU threads may call them at once.
pub trait BusDevice: Send + Sync {
    /// Fills `data` with the value at `offset`. `data` is 1..=8 bytes long.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Stores `data` at `offset`. `data` is 1..=8 bytes long.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    pub fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {0:#x}+{1:#x} is empty; give every device at least one address")]
    EmptyRange(u64, u64),
    #[error(
        "bus range {new_base:#x}+{new_len:#x} overlaps {old_base:#x}+{old_len:#x}; move one of the devices"
    )]
    Overlap {
        new_base: u64,
        new_len: u64,
        old_base: u64,
        old_len: u64,
    },
}

/// Counters of a bus, readable while the VM runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Reads that hit a device.
    pub reads: u64,
    /// Writes that hit a device.
    pub writes: u64,
    /// Reads that hit no device (answered with all-ones).
    pub unhandled_reads: u64,
    /// Writes that hit no device (dropped).
    pub unhandled_writes: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    unhandled_reads: AtomicU64,
    unhandled_writes: AtomicU64,
}

/// A set of non-overlapping ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    /// Sorted by base address.
    entries: Vec<(BusRange, Arc<dyn BusDevice>)>,
    counters: Counters,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            )
            .field("stats", &self.stats())
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `range`. Fails if the range is empty or overlaps another device.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if range.len == 0 {
            return Err(BusError::EmptyRange(range.base, range.len));
        }
        if let Some((old, _)) = self.entries.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(BusError::Overlap {
                new_base: range.base,
                new_len: range.len,
                old_base: old.base,
                old_len: old.len,
            });
        }
        let at = self.entries.partition_point(|(r, _)| r.base < range.base);
        self.entries.insert(at, (range, device));
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn find(&self, addr: u64) -> Option<(&Arc<dyn BusDevice>, u64)> {
        let idx = self.entries.partition_point(|(r, _)| r.base <= addr);
        let (range, dev) = self.entries.get(idx.checked_sub(1)?)?;
        range.contains(addr).then(|| (dev, addr - range.base))
    }

    /// Routes a read. Returns false (and fills `data` with `0xff`) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                dev.read(offset, data);
                true
            }
            None => {
                self.counters
                    .unhandled_reads
                    .fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write. Returns false (and drops the data) if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, offset)) => {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                dev.write(offset, data);
                true
            }
            None => {
                self.counters
                    .unhandled_writes
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn stats(&self) -> BusStats {
        BusStats {
            reads: self.counters.reads.load(Ordering::Relaxed),
            writes: self.counters.writes.load(Ordering::Relaxed),
            unhandled_reads: self.counters.unhandled_reads.load(Ordering::Relaxed),
            unhandled_writes: self.counters.unhandled_writes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_to_device_with_relative_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(BusRange::new(0x3f8, 8), dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(*dev.0.lock().unwrap(), vec![(7, vec![9])]);
    }

    #[test]
    fn bus_miss_reads_all_ones_and_counts() {
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x10, 4), Arc::new(Recorder::default()))
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x14, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x0f, &mut b));
        assert!(!bus.write(0xffff_ffff_ffff_ffff, &[1]));
        let s = bus.stats();
        assert_eq!((s.unhandled_reads, s.unhandled_writes, s.reads), (2, 1, 0));
    }

    #[test]
    fn bus_insert_overlap_rejected() {
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x100, 0x10), Arc::new(Recorder::default()))
            .unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 4), (0x0, 0x1000)] {
            assert!(matches!(
                bus.insert(BusRange::new(base, len), Arc::new(Recorder::default())),
                Err(BusError::Overlap { .. })
            ));
        }
        bus.insert(BusRange::new(0x110, 1), Arc::new(Recorder::default()))
            .unwrap();
        bus.insert(BusRange::new(0xff, 1), Arc::new(Recorder::default()))
            .unwrap();
        assert_eq!(
            bus.insert(BusRange::new(5, 0), Arc::new(Recorder::default())),
            Err(BusError::EmptyRange(5, 0))
        );
    }

    #[test]
    fn bus_range_at_top_of_address_space_does_not_overflow() {
        let mut bus = Bus::new();
        bus.insert(
            BusRange::new(u64::MAX - 1, 8),
            Arc::new(Recorder::default()),
        )
        .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(u64::MAX - 1, &mut b));
        // The range saturates at u64::MAX, which is itself outside (half-open).
        assert!(!bus.read(u64::MAX, &mut b));
    }
}
