//! Hardware-reduced ACPI tables: RSDP, XSDT, FADT, DSDT, MADT.
//!
//! Debian's cloud kernel has no virtio-mmio command-line devices and no MP-table parser: it
//! learns the CPUs and interrupt controllers from the MADT and the platform devices from the
//! DSDT. Devices are described by [`AcpiDevice`] values, so the virtio-mmio devices of a later
//! stage are one more entry in the same list (`LNRO0005`).

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use zerocopy::{Immutable, IntoBytes};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};
use bulwark_devices::power::{ACPI_PM_BASE, ACPI_RESET_VALUE, ACPI_S5_TYPE};

const OEM_ID: [u8; 6] = *b"BLWARK";
const OEM_TABLE: [u8; 8] = *b"BULWARK ";

/// A platform device to declare in the DSDT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiDevice {
    /// A 16550 UART (`PNP0501`) at an I/O port range with an ISA IRQ.
    Uart { uid: u8, port: u16, irq: u32 },
    /// The CMOS real-time clock (`PNP0B00`) at ports 0x70-0x71, IRQ 8.
    Rtc,
    /// The pvpanic device (`QEMU0001`) at an MMIO address.
    PvPanic { addr: u32, len: u32 },
    /// The power button (`PNP0C0C`), pressed through a Generic Event Device (`ACPI0013`)
    /// whose interrupt is `irq`: hardware-reduced ACPI has no fixed power button.
    PowerButton { irq: u32 },
    /// A virtio-mmio device (`LNRO0005`) with its register window and interrupt.
    VirtioMmio {
        uid: u8,
        addr: u32,
        len: u32,
        irq: u32,
    },
}

/// MADT interrupt source override: ISA IRQ `source` arrives on GSI `gsi`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in self.as_bytes() {
            sink.byte(*b);
        }
    }
}

fn device_aml(dev: &AcpiDevice) -> Vec<u8> {
    let mut out = Vec::new();
    match dev {
        AcpiDevice::Uart { uid, port, irq } => {
            let name = format!("COM{}", uid + 1);
            aml::Device::new(
                name.as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                    &aml::Name::new("_UID".into(), uid),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![
                            &aml::IO::new(*port, *port, 1, 8),
                            &aml::Interrupt::new(true, true, false, false, *irq),
                        ]),
                    ),
                ],
            )
            .to_aml_bytes(&mut out);
        }
        AcpiDevice::Rtc => {
            aml::Device::new(
                "RTC_".into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![
                            &aml::IO::new(0x70, 0x70, 1, 2),
                            &aml::Interrupt::new(true, true, false, false, 8),
                        ]),
                    ),
                ],
            )
            .to_aml_bytes(&mut out);
        }
        AcpiDevice::PvPanic { addr, len } => {
            aml::Device::new(
                "PEVT".into(),
                vec![
                    &aml::Name::new("_HID".into(), &"QEMU0001"),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                            true, *addr, *len,
                        )]),
                    ),
                ],
            )
            .to_aml_bytes(&mut out);
        }
        AcpiDevice::PowerButton { irq } => {
            aml::Device::new(
                "PWRB".into(),
                vec![
                    &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                    &aml::Name::new("_UID".into(), &0u8),
                ],
            )
            .to_aml_bytes(&mut out);
            // The GED's only event is the button: _EVT notifies it (0x80: pressed).
            let button = aml::Path::new("PWRB");
            let pressed = 0x80u8;
            let notify = aml::Notify::new(&button, &pressed);
            aml::Device::new(
                "GED0".into(),
                vec![
                    &aml::Name::new("_HID".into(), &"ACPI0013"),
                    &aml::Name::new("_UID".into(), &0u8),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                            true, true, false, false, *irq,
                        )]),
                    ),
                    &aml::Method::new("_EVT".into(), 1, true, vec![&notify]),
                ],
            )
            .to_aml_bytes(&mut out);
        }
        AcpiDevice::VirtioMmio {
            uid,
            addr,
            len,
            irq,
        } => {
            let name = format!("V{uid:03}");
            aml::Device::new(
                name.as_str().into(),
                vec![
                    &aml::Name::new("_HID".into(), &"LNRO0005"),
                    &aml::Name::new("_UID".into(), uid),
                    &aml::Name::new(
                        "_CRS".into(),
                        &aml::ResourceTemplate::new(vec![
                            &aml::Memory32Fixed::new(true, *addr, *len),
                            &aml::Interrupt::new(true, true, false, false, *irq),
                        ]),
                    ),
                ],
            )
            .to_aml_bytes(&mut out);
        }
    }
    out
}

/// The DSDT: the devices, and `_S5_` so the guest can power off through the sleep register.
pub fn dsdt(devices: &[AcpiDevice]) -> Sdt {
    let mut body = Vec::new();
    let s5 = ACPI_S5_TYPE;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5, &s5, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let mut sb = Vec::new();
    for d in devices {
        sb.extend(device_aml(d));
    }
    // Scope(\_SB) { devices }
    let raw = RawAml(sb);
    aml::Scope::new("_SB_".into(), vec![&raw]).to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&body);
    t
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// A one-byte register in I/O port space.
fn io_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// All tables, laid out from `base`: returns the bytes to write at `base` and the RSDP
/// address (which is `base`).
pub fn build(base: u64, vcpus: u32, devices: &[AcpiDevice]) -> Vec<u8> {
    let align = |x: u64| x.div_ceil(16) * 16;
    let rsdp_len = 36u64;
    let xsdt_addr = align(base + rsdp_len);

    let dsdt = dsdt(devices);
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus.min(255) {
        madt.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    // The PIT's IRQ 0 is wired to IOAPIC pin 2, as on every PC.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);

    // XSDT with two entries: 36-byte header + 16.
    let xsdt_len = 36 + 16;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align(fadt_addr + fadt_len);
    let madt_addr = align(dsdt_addr + dsdt.as_slice().len() as u64);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = io_byte(ACPI_PM_BASE as u16);
    fadt.sleep_status_reg = io_byte(ACPI_PM_BASE as u16 + 1);
    fadt.reset_reg = io_byte(ACPI_PM_BASE as u16 + 2);
    fadt.reset_value = ACPI_RESET_VALUE;
    let fadt = fadt.finalize();
    let mut fadt_bytes = Vec::new();
    fadt.to_aml_bytes(&mut fadt_bytes);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);

    let mut out = vec![0u8; (madt_addr + madt_bytes.len() as u64 - base) as usize];
    let mut put = |addr: u64, data: &[u8]| {
        let off = (addr - base) as usize;
        out[off..off + data.len()].copy_from_slice(data);
    };
    put(base, &rsdp_bytes);
    put(xsdt_addr, &xsdt_bytes);
    put(fadt_addr, &fadt_bytes);
    put(dsdt_addr, dsdt.as_slice());
    put(madt_addr, &madt_bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(all: &[u8], base: u64, addr: u64) -> &[u8] {
        let off = (addr - base) as usize;
        let len = u32::from_le_bytes(all[off + 4..off + 8].try_into().unwrap()) as usize;
        &all[off..off + len]
    }

    #[test]
    fn acpi_tables_link_and_checksum() {
        let base = 0xe0000;
        let devs = [
            AcpiDevice::Uart {
                uid: 0,
                port: 0x3f8,
                irq: 4,
            },
            AcpiDevice::PvPanic {
                addr: 0xd000_1000,
                len: 2,
            },
        ];
        let all = build(base, 2, &devs);
        assert_eq!(&all[..8], b"RSD PTR ");
        assert!(checksum_ok(&all[..20]), "RSDP v1 checksum");
        assert!(checksum_ok(&all[..36]), "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(all[24..32].try_into().unwrap());
        let xsdt = table_at(&all, base, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(xsdt));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = table_at(&all, base, fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&all, base, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(dsdt));
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(dsdt, b"_S5_") && find(dsdt, b"QEMU0001") && find(dsdt, b"COM1"));
        let madt = table_at(&all, base, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(madt));
        // Header 44 bytes, 2 local APICs (8 each), an IOAPIC (12), an override (10).
        assert_eq!(madt.len(), 44 + 16 + 12 + 10);
        assert!(all.len() as u64 <= super::super::layout::ACPI_END - base);
    }

    #[test]
    fn acpi_dsdt_declares_virtio_mmio_devices() {
        let d = dsdt(&[AcpiDevice::VirtioMmio {
            uid: 3,
            addr: 0xd000_2000,
            len: 0x200,
            irq: 5,
        }]);
        let s = d.as_slice();
        assert!(s.windows(8).any(|w| w == b"LNRO0005"));
        assert!(s.windows(4).any(|w| w == b"V003"));
    }
}
