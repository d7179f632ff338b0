//! The POST-code port (0x80): the guest writes progress codes, the monitor reports the last one
//! when the VM stops. Firmware and kernels also use it as a harmless delay port.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct PostCode {
    last: AtomicU64,
    count: AtomicU64,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last value written, zero-extended, and how many writes there were.
    pub fn last(&self) -> (u64, u64) {
        (
            self.last.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
        )
    }
}

impl crate::BusDevice for PostCode {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let v = self.last.load(Ordering::Relaxed).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        self.last.store(u64::from_le_bytes(v), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn postcode_keeps_last_value_of_any_width() {
        let p = PostCode::new();
        p.write(0, &[0x12]);
        p.write(0, &[0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(p.last(), (0x9a78_5634, 2));
        let mut d = [0u8; 2];
        p.read(0, &mut d);
        assert_eq!(d, [0x34, 0x56]);
    }
}
