//! Function micro-VMs: payloads with no OS, entered in 64-bit mode with their page tables,
//! descriptor tables and stacks already built by the monitor.

pub mod cpuid;
pub mod descriptors;
pub mod image;
pub mod layout;
pub mod paging;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi::info;
use descriptors::{KERNEL_CS, KERNEL_DS, TSS_SELECTOR_BASE, USER_CS, USER_DS};
use image::PayloadImage;
use layout::*;
use paging::{Access, PageTables, PagingError};

pub use image::ImageError;
pub use layout::{Layout, LayoutError};

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Paging(#[from] PagingError),
    #[error("argument string is {0} bytes; the limit is {MAX_ARG_LEN}")]
    ArgTooLong(usize),
    #[error("argument string contains a NUL byte; pass text without NULs")]
    ArgHasNul,
    #[error(transparent)]
    Drive(#[from] bulwark_devices::virtio::block::DriveError),
    #[error("{0} drives given; a function micro-VM takes at most {max}", max = crate::vm::MAX_PAYLOAD_DRIVES)]
    TooManyDrives(usize),
    #[error("writing the payload into guest memory at {addr:#x} failed")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What the guest is started with: the image and how to run it.
#[derive(Clone, Debug)]
pub struct PayloadSpec<'a> {
    pub file: &'a [u8],
    pub arg: &'a str,
    /// Run at CPL0 instead of CPL3 (slow on software-virtualization hosts).
    pub cpl0: bool,
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Identity page tables for `layout`; see the map in [`layout`].
pub fn page_tables(layout: &Layout) -> Result<PageTables, PagingError> {
    let mut pt = PageTables::new(PAGE_TABLES_ADDR, (PAGE_TABLES_SIZE / PAGE) as usize);
    // First 2 MiB in small pages: null page and holes stay unmapped.
    pt.map_small(GDT_ADDR, 4 * PAGE, Access::SUPERVISOR_RO)?; // GDT, IDT, TSS x2
    pt.map_small(STUBS_ADDR, PAGE, Access::SUPERVISOR_RX)?;
    pt.map_small(INFO_ADDR, PAGE, Access::USER_RO)?;
    let bitmap_pages = IO_BITMAP_LEN.div_ceil(PAGE) * PAGE;
    pt.map_small(IO_BITMAP_ADDR, bitmap_pages, Access::SUPERVISOR_RO)?;
    pt.map_small(PAGE_TABLES_ADDR, PAGE_TABLES_SIZE, Access::SUPERVISOR_RO)?;
    let exc = u64::from(layout.vcpus) * EXC_STACK_SIZE;
    pt.map_small(EXC_STACKS_ADDR, exc, Access::SUPERVISOR_RW)?;
    pt.map_small(PAYLOAD_ADDR, LARGE_PAGE - PAYLOAD_ADDR, Access::USER_RWX)?;
    // Heap in large pages up to the stack region.
    if layout.stack_region > LARGE_PAGE {
        pt.map_large(
            LARGE_PAGE,
            layout.stack_region - LARGE_PAGE,
            Access::USER_RWX,
        )?;
    }
    // Stack region in small pages, with a guard page below every stack.
    let lowest_guard = layout.guard_page(layout.vcpus - 1);
    pt.map_small(
        layout.stack_region,
        lowest_guard - layout.stack_region,
        Access::USER_RWX,
    )?;
    for i in (0..layout.vcpus).rev() {
        pt.map_small(
            layout.stack_top(i) - USER_STACK_SIZE,
            USER_STACK_SIZE,
            Access::USER_RW,
        )?;
    }
    pt.map_small(MMIO_BASE, PAGE, Access::USER_RW.uncached())?;
    pt.map_small(
        MMIO_BASE + PAGE,
        MMIO_SIZE - PAGE,
        Access::USER_RW.uncached(),
    )?;
    Ok(pt)
}

/// The info page for `layout`.
fn info_page(layout: &Layout, image: &PayloadImage, spec: &PayloadSpec<'_>) -> Vec<u8> {
    let mut p = vec![0u8; PAGE as usize];
    let mut put = |off: usize, v: &[u8]| p[off..off + v.len()].copy_from_slice(v);
    put(info::OFF_MAGIC, &info::MAGIC.to_le_bytes());
    put(info::OFF_VERSION, &crate::abi::ABI_VERSION.to_le_bytes());
    put(info::OFF_VCPUS, &layout.vcpus.to_le_bytes());
    let flags = if spec.cpl0 { info::FLAG_CPL0 } else { 0 };
    put(info::OFF_FLAGS, &flags.to_le_bytes());
    put(info::OFF_MEM_SIZE, &layout.mem_size.to_le_bytes());
    put(info::OFF_HEAP_START, &image.end().to_le_bytes());
    put(info::OFF_HEAP_END, &layout.stack_region.to_le_bytes());
    put(info::OFF_ARG_LEN, &(spec.arg.len() as u64).to_le_bytes());
    put(info::OFF_MMIO_BASE, &MMIO_BASE.to_le_bytes());
    put(info::OFF_ARG, spec.arg.as_bytes());
    p
}

/// Checks `spec` against `layout` and parses the image.
pub fn prepare(layout: &Layout, spec: &PayloadSpec<'_>) -> Result<PayloadImage, PayloadError> {
    if spec.arg.len() > MAX_ARG_LEN {
        return Err(PayloadError::ArgTooLong(spec.arg.len()));
    }
    if spec.arg.contains('\0') {
        return Err(PayloadError::ArgHasNul);
    }
    Ok(image::parse(spec.file, layout.payload_limit())?)
}

/// Writes the system area and the payload into (zeroed) guest memory.
pub fn install(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    image: &PayloadImage,
    spec: &PayloadSpec<'_>,
) -> Result<(), PayloadError> {
    let write = |addr: u64, data: &[u8]| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|source| PayloadError::GuestMemory { addr, source })
    };
    write(GDT_ADDR, &descriptors::gdt(layout.vcpus))?;
    write(IDT_ADDR, &descriptors::idt())?;
    for i in 0..layout.vcpus {
        write(Layout::tss_addr(i), &descriptors::tss(i))?;
    }
    write(IO_BITMAP_ADDR, &descriptors::io_bitmap())?;
    write(STUBS_ADDR, &descriptors::stubs())?;
    write(INFO_ADDR, &info_page(layout, image, spec))?;
    write(PAGE_TABLES_ADDR, &page_tables(layout)?.to_bytes())?;
    for seg in &image.segments {
        write(seg.addr, &spec.file[seg.data.clone()])?;
    }
    Ok(())
}

fn seg(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Register state of vCPU `index` at entry. `sregs` comes from `KVM_GET_SREGS` (so fields this
/// function does not set keep KVM's defaults) and is updated in place.
pub fn entry_state(
    layout: &Layout,
    entry: u64,
    index: u32,
    cpl0: bool,
    sregs: &mut kvm_sregs,
) -> kvm_regs {
    let (cs, ds) = if cpl0 {
        (KERNEL_CS, KERNEL_DS)
    } else {
        (USER_CS, USER_DS)
    };
    sregs.cs = seg(cs, true);
    let data = seg(ds, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: Layout::tss_addr(index),
        limit: descriptors::tss_limit(index),
        selector: TSS_SELECTOR_BASE + 16 * index as u16,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = descriptors::gdt_limit(layout.vcpus);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PAGE_TABLES_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    kvm_regs {
        rip: entry,
        rsp: layout.stack_top(index),
        rflags: RFLAGS_RESERVED | if cpl0 { 0 } else { RFLAGS_IOPL3 },
        rdi: u64::from(index),
        rsi: u64::from(layout.vcpus),
        rdx: INFO_ADDR,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_protect_system_area_and_guard_stacks() {
        let l = Layout::new(16 << 20, 2).unwrap();
        let pt = page_tables(&l).unwrap();
        assert_eq!(pt.translate(0), None, "null page unmapped");
        for sys in [
            GDT_ADDR,
            IDT_ADDR,
            TSS_ADDR,
            IO_BITMAP_ADDR,
            PAGE_TABLES_ADDR,
            EXC_STACKS_ADDR,
        ] {
            let (_, a) = pt.translate(sys).unwrap();
            assert!(!a.user, "{sys:#x} is supervisor-only");
            assert!(!a.exec, "{sys:#x} is not executable");
        }
        assert!(!pt.translate(PAGE_TABLES_ADDR).unwrap().1.write);
        let (_, stubs) = pt.translate(STUBS_ADDR).unwrap();
        assert!(stubs.exec && !stubs.user && !stubs.write);
        assert_eq!(pt.translate(INFO_ADDR).unwrap().1, Access::USER_RO);
        assert_eq!(pt.translate(PAYLOAD_ADDR).unwrap().1, Access::USER_RWX);
        assert_eq!(pt.translate(0x80_0000).unwrap().1, Access::USER_RWX);
        for i in 0..2 {
            assert_eq!(pt.translate(l.guard_page(i)), None, "guard of vCPU {i}");
            assert_eq!(pt.translate(l.stack_top(i) - 8).unwrap().1, Access::USER_RW);
        }
        assert_eq!(pt.translate(l.mem_size), None, "nothing above RAM");
        assert!(pt.translate(MMIO_BASE + 0x10).unwrap().1.uncached);
        assert_eq!(pt.translate(MMIO_BASE + MMIO_SIZE), None);
    }

    #[test]
    fn page_tables_fit_for_extreme_layouts() {
        for (mem, vcpus) in [
            (MIN_MEMORY, 1),
            (8 << 20, MAX_VCPUS),
            (MAX_MEMORY, MAX_VCPUS),
        ] {
            let l = Layout::new(mem, vcpus).unwrap();
            let pt = page_tables(&l).unwrap();
            assert!(pt.to_bytes().len() as u64 <= PAGE_TABLES_SIZE);
            assert!(pt.translate(mem - 1).is_some());
        }
    }

    #[test]
    fn entry_state_user_mode_has_iopl3_and_user_selectors() {
        let l = Layout::new(16 << 20, 2).unwrap();
        let mut s = kvm_sregs::default();
        let r = entry_state(&l, 0x10_0000, 1, false, &mut s);
        assert_eq!(s.cs.selector, USER_CS);
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(r.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!((r.rdi, r.rsi, r.rsp), (1, 2, l.stack_top(1)));
        assert_eq!(s.tr.base, Layout::tss_addr(1));
        let r0 = entry_state(&l, 0x10_0000, 0, true, &mut s);
        assert_eq!(s.cs.dpl, 0);
        assert_eq!(r0.rflags & RFLAGS_IOPL3, 0);
    }
}
