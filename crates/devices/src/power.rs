//! Guest power events (poweroff, reset, panic) and the devices that raise them: the ACPI
//! sleep/reset registers of a hardware-reduced ACPI platform, and the pvpanic device.
//!
//! Devices do not know the VM: they call a [`PowerSignal`] the monitor gives them, which stops
//! the VM with the matching reason.

use std::sync::Arc;

/// Something the guest asked of the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// ACPI S5 (the guest ran `poweroff`).
    PowerOff,
    /// Platform reset (the guest ran `reboot`).
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
}

/// How a device reports a power event to the monitor.
pub type PowerSignal = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// I/O port of the sleep control register (FADT `SLEEP_CONTROL_REG`); the sleep status register
/// (`SLEEP_STATUS_REG`) is the next port, and the reset register (`RESET_REG`) the one after.
pub const ACPI_PM_BASE: u64 = 0x600;
pub const ACPI_PM_PORTS: u64 = 3;
/// Value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// Sleep type the DSDT's `_S5_` object gives for soft-off.
pub const ACPI_S5_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;

/// Sleep control, sleep status and reset registers of a hardware-reduced ACPI platform.
pub struct AcpiPm {
    signal: PowerSignal,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AcpiPm")
    }
}

impl AcpiPm {
    pub fn new(signal: PowerSignal) -> Self {
        Self { signal }
    }
}

impl crate::BusDevice for AcpiPm {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // No wake events, nothing pending.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == ACPI_S5_TYPE => {
                (self.signal)(PowerEvent::PowerOff)
            }
            2 if v == ACPI_RESET_VALUE => (self.signal)(PowerEvent::Reset),
            _ => {}
        }
    }
}

/// Guest-physical address of the pvpanic MMIO register (ACPI id `QEMU0001`).
pub const PVPANIC_ADDR: u64 = 0xd000_1000;
pub const PVPANIC_LEN: u64 = 2;
const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic device: the guest kernel writes PANICKED from its panic notifier.
pub struct PvPanic {
    signal: PowerSignal,
}

impl std::fmt::Debug for PvPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PvPanic")
    }
}

impl PvPanic {
    pub fn new(signal: PowerSignal) -> Self {
        Self { signal }
    }
}

impl crate::BusDevice for PvPanic {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Reading tells the guest which events the device supports.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            (self.signal)(PowerEvent::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::Mutex;

    fn recorder() -> (PowerSignal, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    #[test]
    fn acpi_pm_s5_powers_off_and_reset_register_resets() {
        let (sig, seen) = recorder();
        let pm = AcpiPm::new(sig);
        pm.write(0, &[ACPI_S5_TYPE << 2]); // no SLP_EN: nothing
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        pm.write(0, &[(ACPI_S5_TYPE << 2) | SLP_EN]);
        pm.write(2, &[0x2]);
        pm.write(2, &[ACPI_RESET_VALUE]);
        pm.write(9, &[0xff]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerEvent::PowerOff, PowerEvent::Reset]
        );
    }

    #[test]
    fn pvpanic_reports_panic_and_features() {
        let (sig, seen) = recorder();
        let p = PvPanic::new(sig);
        let mut d = [0u8; 1];
        p.read(0, &mut d);
        assert_eq!(d[0], 3);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Panic]);
    }
}
