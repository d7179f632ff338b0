//! Loading a Linux kernel: bzImage through the 64-bit boot protocol, or an ELF vmlinux through
//! PVH; the initrd, the command line, and the zero page or PVH start info that describe them.

use std::io::{Read, Seek, SeekFrom};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the load address of a bzImage's kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel file is empty")]
    EmptyKernel,
    #[error("cannot read the kernel file")]
    Read(#[source] std::io::Error),
    #[error(
        "kernel file is neither a bzImage (no \"HdrS\" at 0x202) nor an ELF vmlinux; pass /boot/vmlinuz-* or the vmlinux that `bulwark image build` extracts"
    )]
    UnknownKernelFormat,
    #[error("cannot load the bzImage (is the file truncated?)")]
    BzImage(#[source] linux_loader::loader::Error),
    #[error("cannot load the ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    #[error(
        "the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); boot its bzImage instead, or build it with CONFIG_PVH=y"
    )]
    NoPvhNote,
    #[error(
        "kernel ({kernel} bytes loaded up to {kernel_end:#x}) and initrd ({initrd} bytes) do not fit in {memory} bytes of guest memory; raise --memory"
    )]
    TooBig {
        kernel: u64,
        kernel_end: u64,
        initrd: u64,
        memory: u64,
    },
    #[error(
        "the initrd is not a cpio archive (newc or gzip/xz/zstd/lz4-compressed); pass an initramfs image"
    )]
    InitrdNotCpio,
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory at {0:#x} failed")]
    GuestMemory(u64),
}

/// The two boot protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// bzImage, entered in 64-bit mode at `startup_64` with the zero page in `rsi`.
    Linux64 { entry: u64 },
    /// ELF vmlinux, entered in 32-bit protected mode at the PVH entry with start info in `rbx`.
    Pvh { entry: u64 },
}

/// Whether `data` looks like an initramfs: a newc cpio, or a compressed stream.
pub fn looks_like_initrd(data: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"070701",
        b"070702",
        &[0x1f, 0x8b],             // gzip
        &[0xfd, b'7', b'z', b'X'], // xz
        &[0x28, 0xb5, 0x2f, 0xfd], // zstd
        &[0x02, 0x21, 0x4c, 0x18], // lz4 legacy
        &[0x04, 0x22, 0x4d, 0x18], // lz4 frame
        b"BZh",                    // bzip2
        &[0x5d, 0x00],             // lzma
    ];
    MAGICS.iter().any(|m| data.starts_with(m))
}

fn is_bzimage(k: &[u8]) -> bool {
    k.get(0x202..0x206) == Some(b"HdrS".as_slice())
}

/// A loaded kernel.
#[derive(Debug)]
pub struct LoadedKernel {
    pub protocol: BootProtocol,
    pub result: KernelLoaderResult,
}

/// Loads the kernel that `kernel` reads (a file, read straight into guest memory: one copy
/// of a 50 MB vmlinux instead of two) into `mem`.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, kernel: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    // The header decides the format: "HdrS" at 0x202 (bzImage) or the ELF magic.
    let mut head = Vec::with_capacity(0x1000);
    kernel
        .seek(SeekFrom::Start(0))
        .and_then(|_| kernel.by_ref().take(0x1000).read_to_end(&mut head))
        .and_then(|_| kernel.seek(SeekFrom::Start(0)))
        .map_err(BootError::Read)?;
    if head.is_empty() {
        return Err(BootError::EmptyKernel);
    }
    let himem = Some(GuestAddress(HIMEM_START));
    if is_bzimage(&head) {
        let result = BzImage::load(mem, None, kernel, himem).map_err(BootError::BzImage)?;
        let entry = result.kernel_load.0 + STARTUP_64_OFFSET;
        return Ok(LoadedKernel {
            protocol: BootProtocol::Linux64 { entry },
            result,
        });
    }
    if head.starts_with(b"\x7fELF") {
        let result = Elf::load(mem, None, kernel, himem).map_err(BootError::Elf)?;
        let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
            return Err(BootError::NoPvhNote);
        };
        return Ok(LoadedKernel {
            protocol: BootProtocol::Pvh { entry: entry.0 },
            result,
        });
    }
    Err(BootError::UnknownKernelFormat)
}

/// Places the initrd at the top of low RAM (below `max_addr`), page-aligned. Returns its address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    initrd: &[u8],
    max_addr: u64,
) -> Result<u64, BootError> {
    if !looks_like_initrd(initrd) {
        return Err(BootError::InitrdNotCpio);
    }
    let len = initrd.len() as u64;
    let top = low_ram_end(mem_size).min(max_addr);
    let addr = top.checked_sub(len).map(|a| a & !0xfff);
    match addr {
        Some(a) if a >= kernel_end => {
            mem.write_slice(initrd, GuestAddress(a))
                .map_err(|_| BootError::GuestMemory(a))?;
            Ok(a)
        }
        _ => Err(BootError::TooBig {
            kernel: kernel_end.saturating_sub(HIMEM_START),
            kernel_end,
            initrd: len,
            memory: mem_size,
        }),
    }
}

/// Writes the command line (NUL-terminated) at `CMDLINE`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|_| BootError::GuestMemory(CMDLINE))
}

/// Writes the zero page for a bzImage boot.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    loaded: &LoadedKernel,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.result.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, len)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(|_| BootError::GuestMemory(ZERO_PAGE))
}

/// Writes the PVH start info, module list (the initrd) and memory map.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map = e820(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, len)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
        let module = hvm_modlist_entry {
            paddr: addr,
            size: len,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST))
            .map_err(|_| BootError::GuestMemory(PVH_MODLIST))?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| BootError::GuestMemory(at))?;
    }
    mem.write_obj(info, GuestAddress(PVH_START_INFO))
        .map_err(|_| BootError::GuestMemory(PVH_START_INFO))
}

fn segment(selector: u16, type_: u8, long: bool, db: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(db),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

fn gdt_entry(seg: &kvm_segment) -> u64 {
    let flags = u64::from(seg.g) << 3 | u64::from(seg.db) << 2 | u64::from(seg.l) << 1;
    let access = u64::from(seg.present) << 7
        | u64::from(seg.dpl) << 5
        | u64::from(seg.s) << 4
        | u64::from(seg.type_);
    (seg.limit as u64 >> 12 & 0xffff)
        | (access << 40)
        | ((seg.limit as u64 >> 28 & 0xf) << 48)
        | (flags << 52)
}

/// Writes the boot GDT, an empty IDT and (for 64-bit boot) identity page tables for the first
/// GiB, and returns the vCPU 0 register state for `protocol`. `sregs` comes from KVM.
pub fn boot_cpu_state(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<kvm_regs, BootError> {
    let long = matches!(protocol, BootProtocol::Linux64 { .. });
    let code = segment(0x08, 0xb, long, !long);
    let data = segment(0x10, 0x3, false, true);
    let tss = kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    let gdt = [0u64, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
    for (i, e) in gdt.iter().enumerate() {
        let at = BOOT_GDT + 8 * i as u64;
        mem.write_obj(*e, GuestAddress(at))
            .map_err(|_| BootError::GuestMemory(at))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(|_| BootError::GuestMemory(BOOT_IDT))?;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match protocol {
        BootProtocol::Linux64 { entry } => {
            // PML4[0] -> PDPT[0] -> PD with 512 2-MiB pages.
            mem.write_obj(PDPT | 0x3, GuestAddress(PML4))
                .map_err(|_| BootError::GuestMemory(PML4))?;
            mem.write_obj(PD | 0x3, GuestAddress(PDPT))
                .map_err(|_| BootError::GuestMemory(PDPT))?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
                    .map_err(|_| BootError::GuestMemory(PD))?;
            }
            sregs.cr3 = PML4;
            sregs.cr4 |= 1 << 5; // PAE
            sregs.cr0 |= 0x8000_0001; // PG | PE
            sregs.efer |= 0x500; // LMA | LME
            Ok(kvm_regs {
                rip: entry,
                rsp: BOOT_STACK,
                rbp: BOOT_STACK,
                rsi: ZERO_PAGE,
                rflags: 0x2,
                ..Default::default()
            })
        }
        BootProtocol::Pvh { entry } => {
            sregs.cr0 = (sregs.cr0 & !0x8000_0000) | 0x1 | 0x10; // PE | ET, paging off
            sregs.cr4 = 0;
            sregs.efer = 0;
            Ok(kvm_regs {
                rip: entry,
                rbx: PVH_START_INFO,
                rflags: 0x2,
                ..Default::default()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn boot_rejects_non_kernels() {
        let m = mem();
        let load = |k: &[u8]| load_kernel(&m, &mut std::io::Cursor::new(k));
        assert!(matches!(load(&[]), Err(BootError::EmptyKernel)));
        assert!(matches!(
            load(&[0u8; 4096]),
            Err(BootError::UnknownKernelFormat)
        ));
        let mut fake = vec![0u8; 0x1000];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(load(&fake), Err(BootError::BzImage(_))));
        // An ELF whose headers are cut short.
        assert!(matches!(load(b"\x7fELF\x02\x01"), Err(BootError::Elf(_))));
    }

    #[test]
    fn boot_initrd_goes_to_top_of_ram_and_must_fit() {
        let m = mem();
        let rd = [b"070701".as_slice(), &[0u8; 5000]].concat();
        let a = load_initrd(&m, 64 << 20, 0x20_0000, &rd, u64::MAX).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + rd.len() as u64 <= 64 << 20 && a + 8192 >= 64 << 20);
        let mut back = [0u8; 6];
        m.read_slice(&mut back, GuestAddress(a)).unwrap();
        assert_eq!(&back, b"070701");
        assert!(matches!(
            load_initrd(&m, 64 << 20, (64 << 20) - 4096, &rd, u64::MAX),
            Err(BootError::TooBig { .. })
        ));
        assert!(matches!(
            load_initrd(&m, 64 << 20, 0, b"not an archive", u64::MAX),
            Err(BootError::InitrdNotCpio)
        ));
    }

    #[test]
    fn boot_cmdline_written_with_nul_and_bounded() {
        let m = mem();
        write_cmdline(&m, "console=ttyS0").unwrap();
        let mut b = [0xffu8; 14];
        m.read_slice(&mut b, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(CMDLINE_MAX)),
            Err(BootError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn boot_gdt_entries_encode_long_mode_code() {
        let code = segment(0x08, 0xb, true, false);
        assert_eq!(gdt_entry(&code), 0x00af_9b00_0000_ffff);
        let data = segment(0x10, 0x3, false, true);
        assert_eq!(gdt_entry(&data), 0x00cf_9300_0000_ffff);
        let code32 = segment(0x08, 0xb, false, true);
        assert_eq!(gdt_entry(&code32), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn boot_zero_page_carries_cmdline_initrd_e820_and_rsdp() {
        let m = mem();
        let loaded = LoadedKernel {
            protocol: BootProtocol::Linux64 { entry: 0x100200 },
            result: KernelLoaderResult::default(),
        };
        write_zero_page(
            &m,
            &loaded,
            64 << 20,
            13,
            Some((0x300_0000, 0x1234)),
            ACPI_START,
        )
        .unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ hdr.cmdline_size }, 14);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x300_0000, 0x1234)
        );
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn boot_pvh_start_info_describes_memory_and_initrd() {
        let m = mem();
        write_pvh_start_info(&m, 64 << 20, Some((0x300_0000, 0x1234)), ACPI_START).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
    }
}
