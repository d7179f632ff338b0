//! Guest-physical layout of a Linux VM, and its e820 map.
//!
//! ```text
//! 0x0000_0500  boot GDT / IDT
//! 0x0000_6000  PVH start info, module list, memory map
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack (grows down)
//! 0x0000_9000  boot page tables (identity map of the first GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB: reserved (ACPI tables at 0xe0000)
//! 0x0010_0000  kernel; RAM up to the MMIO gap
//! top of low RAM: initrd
//! 0xc000_0000  MMIO gap: platform MMIO devices (0xd000_0000), IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, if any
//! ```

pub const BOOT_GDT: u64 = 0x500;
pub const BOOT_IDT: u64 = 0x520;
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MODLIST: u64 = 0x6040;
pub const PVH_MEMMAP: u64 = 0x6100;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Identity-mapped TSS area KVM needs on Intel (unused RAM-less addresses in the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Smallest guest RAM a stock kernel with an initramfs boots in.
pub const MIN_MEMORY: u64 = 32 << 20;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Guest RAM regions (guest-physical start, size) for `mem` bytes: below the MMIO gap, then
/// above 4 GiB.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_GAP_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
    }
}

/// The e820 map: conventional memory, the EBDA/BIOS hole (which holds the ACPI tables), RAM
/// from 1 MiB up to the gap, and RAM above 4 GiB.
pub fn e820(mem: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem) {
        let (start, size) = if start == 0 {
            (HIMEM_START, size - HIMEM_START)
        } else {
            (start, size)
        };
        map.push(E820Entry {
            addr: start,
            size,
            kind: E820_RAM,
        });
    }
    map
}

/// Top of RAM below the MMIO gap (where the initrd goes).
pub fn low_ram_end(mem: u64) -> u64 {
    mem.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_vm_has_hole_below_1m() {
        let m = e820(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert!(m[1].addr <= ACPI_START && m[1].addr + m[1].size >= ACPI_END);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: (128 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_large_vm_skips_mmio_gap() {
        let mem = 4u64 << 30;
        let m = e820(mem);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].addr + m[2].size, MMIO_GAP_START);
        assert_eq!(m[3].addr, MMIO_GAP_END);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        assert_eq!(
            ram_regions(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
        assert_eq!(low_ram_end(mem), MMIO_GAP_START);
    }
}
