//! Guest-physical layout of a function micro-VM. Memory is identity-mapped, so every address
//! here is both guest-physical and guest-virtual.
//!
//! ```text
//! 0x0000_0000  null page                      not mapped (catches null pointers)
//! 0x0000_1000  GDT                            supervisor, read-only
//! 0x0000_2000  IDT                            supervisor, read-only
//! 0x0000_3000  TSS, 128 bytes per vCPU        supervisor, read-only (2 pages)
//! 0x0000_5000  exception stubs                supervisor, read-only, executable
//! 0x0000_6000  info page (ABI, config, arg)   user, read-only
//! 0x0000_7000  I/O permission bitmap (all 0)  supervisor, read-only (3 pages, shared by TSSs)
//! 0x0001_0000  page tables (64 KiB)           supervisor, read-only
//! 0x0008_0000  exception stacks, 4 KiB/vCPU   supervisor, read-write
//! 0x0010_0000  payload image, then heap       user, read-write-execute
//! top - N      user stacks, 64 KiB per vCPU   user, read-write, each with a guard page below
//! 0xd000_0000  MMIO window (2 MiB)            user, read-write, uncached
//! ```
//!
//! A payload at CPL3 can touch none of the system structures: writing its page tables, the IDT,
//! or the stacks the monitor's exception stubs run on faults instead of corrupting them.

/// Guest page size.
pub const PAGE: u64 = 0x1000;
/// Large page size used where a region needs no finer protection.
pub const LARGE_PAGE: u64 = 0x20_0000;

pub const GDT_ADDR: u64 = 0x1000;
pub const IDT_ADDR: u64 = 0x2000;
pub const TSS_ADDR: u64 = 0x3000;
pub const TSS_STRIDE: u64 = 128;
pub const STUBS_ADDR: u64 = 0x5000;
pub const INFO_ADDR: u64 = 0x6000;
/// One I/O permission bitmap (65536 bits, all clear = every port allowed, plus the 0xff end
/// byte) that every vCPU's TSS points at, so CPL3 port I/O reaches the monitor.
pub const IO_BITMAP_ADDR: u64 = 0x7000;
pub const IO_BITMAP_LEN: u64 = 8192 + 1;
pub const PAGE_TABLES_ADDR: u64 = 0x1_0000;
pub const PAGE_TABLES_SIZE: u64 = 0x1_0000;
pub const EXC_STACKS_ADDR: u64 = 0x8_0000;
pub const EXC_STACK_SIZE: u64 = PAGE;
/// Where payloads are loaded; flat binaries are entered here.
pub const PAYLOAD_ADDR: u64 = 0x10_0000;

pub const USER_STACK_SIZE: u64 = 0x1_0000;
pub const GUARD_SIZE: u64 = PAGE;

pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = LARGE_PAGE;
/// The platform-information device, first in the MMIO window.
pub const INFO_DEVICE_ADDR: u64 = MMIO_BASE;

/// Most vCPUs a function micro-VM may have (TSS area: 2 pages of 128-byte slots).
pub const MAX_VCPUS: u32 = 32;
/// Smallest and largest guest RAM for a function micro-VM.
pub const MIN_MEMORY: u64 = 4 << 20;
pub const MAX_MEMORY: u64 = 3 << 30;
/// Longest argument string: what fits in the info page after its header.
pub const MAX_ARG_LEN: usize = (PAGE as usize) - INFO_ARG_OFFSET - 1;
pub const INFO_ARG_OFFSET: usize = 0x40;

// The fixed regions must not overlap.
const _: () = assert!(IO_BITMAP_ADDR >= INFO_ADDR + PAGE);
const _: () = assert!(IO_BITMAP_ADDR + IO_BITMAP_LEN <= PAGE_TABLES_ADDR);
const _: () = assert!(PAGE_TABLES_ADDR + PAGE_TABLES_SIZE <= EXC_STACKS_ADDR);
const _: () = assert!(EXC_STACKS_ADDR + MAX_VCPUS as u64 * EXC_STACK_SIZE <= PAYLOAD_ADDR);
const _: () = assert!(TSS_ADDR + MAX_VCPUS as u64 * TSS_STRIDE <= STUBS_ADDR);

/// Errors in the requested shape of a function micro-VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("memory size {0} bytes is too small for a function micro-VM; use at least 4M (4 MiB)")]
    TooLittleMemory(u64),
    #[error(
        "memory size {0} bytes is too large for a function micro-VM; the limit is 3G (RAM ends below the MMIO window)"
    )]
    TooMuchMemory(u64),
    #[error("memory size {0} bytes is not a multiple of 2 MiB; round it, for example to 16M")]
    UnalignedMemory(u64),
    #[error("{0} vCPUs requested; a function micro-VM has 1 to {MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error(
        "{vcpus} vCPUs need {needed} bytes of stack but only {available} bytes of memory are free above the payload; raise --memory"
    )]
    NoRoomForStacks {
        vcpus: u32,
        needed: u64,
        available: u64,
    },
}

/// The computed layout for one memory size and vCPU count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub mem_size: u64,
    pub vcpus: u32,
    /// Start of the 4 KiB-mapped region at the top of RAM that holds the user stacks.
    pub stack_region: u64,
}

impl Layout {
    pub fn new(mem_size: u64, vcpus: u32) -> Result<Self, LayoutError> {
        if mem_size < MIN_MEMORY {
            return Err(LayoutError::TooLittleMemory(mem_size));
        }
        if mem_size > MAX_MEMORY {
            return Err(LayoutError::TooMuchMemory(mem_size));
        }
        if !mem_size.is_multiple_of(LARGE_PAGE) {
            return Err(LayoutError::UnalignedMemory(mem_size));
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(LayoutError::BadVcpuCount(vcpus));
        }
        let needed = u64::from(vcpus) * (USER_STACK_SIZE + GUARD_SIZE);
        let region = needed.div_ceil(LARGE_PAGE) * LARGE_PAGE;
        // The payload's first 1 MiB sits below the first large page; the stacks need the rest.
        let available = mem_size - LARGE_PAGE;
        if region > available {
            return Err(LayoutError::NoRoomForStacks {
                vcpus,
                needed,
                available,
            });
        }
        Ok(Self {
            mem_size,
            vcpus,
            stack_region: mem_size - region,
        })
    }

    /// Highest address (exclusive) a payload image may occupy.
    pub fn payload_limit(&self) -> u64 {
        self.stack_region
    }

    /// Initial stack pointer of vCPU `i` (16-byte aligned, as at a process entry).
    pub fn stack_top(&self, i: u32) -> u64 {
        self.mem_size - u64::from(i) * (USER_STACK_SIZE + GUARD_SIZE)
    }

    /// The guard page below vCPU `i`'s stack.
    pub fn guard_page(&self, i: u32) -> u64 {
        self.stack_top(i) - USER_STACK_SIZE - GUARD_SIZE
    }

    pub fn tss_addr(i: u32) -> u64 {
        TSS_ADDR + u64::from(i) * TSS_STRIDE
    }

    pub fn exception_stack_top(i: u32) -> u64 {
        EXC_STACKS_ADDR + (u64::from(i) + 1) * EXC_STACK_SIZE
    }

    /// Whether `[addr, addr + len)` lies in memory the payload owns (image, heap, stacks), the
    /// only memory a host call may read or write on the payload's behalf.
    pub fn is_payload_memory(&self, addr: u64, len: u64) -> bool {
        addr >= PAYLOAD_ADDR
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.mem_size)
    }

    /// Whether a host call may read `[addr, addr + len)`: payload memory or the info page
    /// (which the payload can read anyway, and which holds the argument string).
    pub fn is_host_readable(&self, addr: u64, len: u64) -> bool {
        let in_info = addr >= INFO_ADDR
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= INFO_ADDR + PAGE);
        in_info || self.is_payload_memory(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_bad_sizes_with_reasons() {
        assert_eq!(
            Layout::new(2 << 20, 1),
            Err(LayoutError::TooLittleMemory(2 << 20))
        );
        assert_eq!(
            Layout::new(4 << 30, 1),
            Err(LayoutError::TooMuchMemory(4 << 30))
        );
        assert_eq!(
            Layout::new((16 << 20) + 4096, 1),
            Err(LayoutError::UnalignedMemory((16 << 20) + 4096))
        );
        assert_eq!(Layout::new(16 << 20, 0), Err(LayoutError::BadVcpuCount(0)));
        assert_eq!(
            Layout::new(16 << 20, 33),
            Err(LayoutError::BadVcpuCount(33))
        );
    }

    #[test]
    fn layout_stacks_fit_below_top_with_guards() {
        let l = Layout::new(16 << 20, 4).unwrap();
        assert_eq!(l.stack_region, (16 << 20) - LARGE_PAGE);
        assert_eq!(l.stack_top(0), 16 << 20);
        assert_eq!(l.stack_top(1), (16 << 20) - 0x11000);
        assert!(l.guard_page(3) >= l.stack_region);
        assert!(matches!(
            Layout::new(MIN_MEMORY, MAX_VCPUS),
            Err(LayoutError::NoRoomForStacks { .. })
        ));
        let big = Layout::new(8 << 20, MAX_VCPUS).unwrap();
        assert!(big.guard_page(MAX_VCPUS - 1) >= big.stack_region);
        assert!(big.stack_region >= LARGE_PAGE);
    }

    #[test]
    fn layout_system_areas_do_not_overlap() {
        let tss_end = Layout::tss_addr(MAX_VCPUS);
        assert!(tss_end <= STUBS_ADDR);
        // Every TSS reaches the shared bitmap with a 16-bit offset.
        assert!(IO_BITMAP_ADDR - Layout::tss_addr(0) < 0xffff - IO_BITMAP_LEN);
        assert!(Layout::exception_stack_top(MAX_VCPUS - 1) <= PAYLOAD_ADDR);
    }

    #[test]
    fn layout_payload_memory_excludes_system_area_and_overflow() {
        let l = Layout::new(16 << 20, 1).unwrap();
        assert!(l.is_payload_memory(PAYLOAD_ADDR, 16));
        assert!(!l.is_payload_memory(PAGE_TABLES_ADDR, 8));
        assert!(!l.is_payload_memory(PAYLOAD_ADDR - 1, 2));
        assert!(!l.is_payload_memory((16 << 20) - 4, 8));
        assert!(!l.is_payload_memory(u64::MAX - 2, 8));
        assert!(l.is_payload_memory((16 << 20) - 8, 8));
        assert!(l.is_host_readable(INFO_ADDR + INFO_ARG_OFFSET as u64, 10));
        assert!(!l.is_host_readable(INFO_ADDR + PAGE - 4, 8));
        assert!(!l.is_payload_memory(INFO_ADDR, 8));
        assert!(!l.is_host_readable(PAGE_TABLES_ADDR, 8));
    }
}
