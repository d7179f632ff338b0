//! The CMOS real-time clock at ports 0x70/0x71: enough for Linux to read the time of day at
//! boot and for its `rtc_cmos` driver (BCD, as PC firmware leaves it and as some Linux paths
//! assume regardless of the mode bit; 24-hour clock; UTC from the host's clock). Writes to the clock are
//! ignored: the guest cannot set the host's time, and the next read shows the real time again.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub const CMOS_BASE: u64 = 0x70;
pub const CMOS_PORTS: u64 = 2;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status B: 24-hour mode, BCD values.
const REG_B_VALUE: u8 = 1 << 1;

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

#[derive(Debug, Default)]
pub struct Cmos {
    index: Mutex<u8>,
}

/// (year, month, day) of `days` since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The value of CMOS register `reg` at Unix time `secs`.
pub fn register_at(reg: u8, secs: u64) -> u8 {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    match reg {
        0x00 => bcd((rem % 60) as u8),
        0x02 => bcd(((rem / 60) % 60) as u8),
        0x04 => bcd((rem / 3600) as u8),
        0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u8), // 1970-01-01 was a Thursday; Sunday = 1
        0x07 => bcd(day as u8),
        0x08 => bcd(month as u8),
        0x09 => bcd(year.rem_euclid(100) as u8),
        CENTURY => bcd((year / 100).clamp(0, 99) as u8),
        REG_A => 0x26, // 32.768 kHz time base, 1024 Hz rate; update never in progress
        REG_B => REG_B_VALUE,
        REG_C => 0,
        REG_D => 0x80, // battery good
        _ => 0,
    }
}

impl crate::BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        let index = *self.index.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 1 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            *b = register_at(index, now);
        } else {
            *b = index;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0
            && let Some(&v) = data.first()
        {
            // Bit 7 is the NMI mask, not part of the index.
            *self.index.lock().unwrap_or_else(|e| e.into_inner()) = v & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn rtc_civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }

    #[test]
    fn rtc_registers_at_known_time() {
        // 2026-11-26 19:45:30 UTC, a Thursday.
        let t = 20_783 * 86_400 + 19 * 3600 + 45 * 60 + 30;
        let r = |reg| register_at(reg, t);
        assert_eq!((r(0), r(2), r(4)), (0x30, 0x45, 0x19));
        assert_eq!((r(7), r(8), r(9), r(CENTURY)), (0x26, 0x11, 0x26, 0x20));
        assert_eq!(r(6), 5);
        assert_eq!(r(REG_B), REG_B_VALUE);
    }

    #[test]
    fn rtc_index_masks_nmi_bit_and_reads_live_time() {
        let c = Cmos::default();
        c.write(0, &[0x80 | 0x09]);
        let mut d = [0u8];
        c.read(0, &mut d);
        assert_eq!(d[0], 0x09);
        c.read(1, &mut d);
        assert!(
            d[0] >= 0x26 && d[0] < 0xa0 && d[0] & 0xf < 10,
            "BCD year {:#x}",
            d[0]
        );
        c.write(1, &[0x55]); // ignored
    }
}
