//! The platform information device: a small read-mostly MMIO register page that tells a guest
//! about its VM, and a scratch register a guest (or a test) can write and read back.
//!
//! Register map (little endian; any width, any alignment inside the 64-byte window):
//!
//! | offset | width | name      | access | value                        |
//! |--------|-------|-----------|--------|------------------------------|
//! | 0x00   | 4     | MAGIC     | RO     | `0x4b574c42` (`"BLWK"`)      |
//! | 0x04   | 4     | VERSION   | RO     | 1                            |
//! | 0x08   | 4     | VCPUS     | RO     | number of vCPUs              |
//! | 0x10   | 8     | MEM_SIZE  | RO     | guest RAM in bytes           |
//! | 0x18   | 8     | SCRATCH   | RW     | whatever was last written    |
//!
//! Everything else in the window reads as zero and ignores writes.

use std::sync::Mutex;

/// Size of the register window.
pub const INFO_WINDOW: u64 = 0x40;
pub const INFO_MAGIC: u32 = 0x4b57_4c42;
const SCRATCH: std::ops::Range<usize> = 0x18..0x20;

#[derive(Debug)]
pub struct PlatformInfo {
    regs: Mutex<[u8; INFO_WINDOW as usize]>,
}

impl PlatformInfo {
    pub fn new(vcpus: u32, mem_size: u64) -> Self {
        let mut regs = [0u8; INFO_WINDOW as usize];
        regs[0..4].copy_from_slice(&INFO_MAGIC.to_le_bytes());
        regs[4..8].copy_from_slice(&1u32.to_le_bytes());
        regs[8..12].copy_from_slice(&vcpus.to_le_bytes());
        regs[0x10..0x18].copy_from_slice(&mem_size.to_le_bytes());
        Self {
            regs: Mutex::new(regs),
        }
    }

    /// The scratch register's value.
    pub fn scratch(&self) -> u64 {
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = [0u8; 8];
        v.copy_from_slice(&regs[SCRATCH]);
        u64::from_le_bytes(v)
    }
}

impl crate::BusDevice for PlatformInfo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| regs.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter().enumerate() {
            if let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                && SCRATCH.contains(&o)
            {
                regs[o] = *b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn info_reports_config_and_keeps_scratch() {
        let d = PlatformInfo::new(3, 16 << 20);
        let mut w = [0u8; 4];
        d.read(0, &mut w);
        assert_eq!(u32::from_le_bytes(w), INFO_MAGIC);
        d.read(8, &mut w);
        assert_eq!(u32::from_le_bytes(w), 3);
        let mut q = [0u8; 8];
        d.read(0x10, &mut q);
        assert_eq!(u64::from_le_bytes(q), 16 << 20);
        d.write(0x18, &0xdead_beef_u32.to_le_bytes());
        d.write(0x1e, &[0x77, 0x88, 0x99]); // straddles the end of SCRATCH
        assert_eq!(d.scratch(), 0x8877_0000_dead_beef);
        d.write(0, &[0; 8]); // read-only: ignored
        d.read(0, &mut w);
        assert_eq!(u32::from_le_bytes(w), INFO_MAGIC);
    }

    #[test]
    fn info_out_of_window_reads_zero() {
        let d = PlatformInfo::new(1, 1);
        let mut q = [0xaau8; 8];
        d.read(0x3c, &mut q);
        assert_eq!(&q[4..], &[0; 4]);
        d.read(u64::MAX, &mut q);
        assert_eq!(q, [0; 8]);
    }
}
