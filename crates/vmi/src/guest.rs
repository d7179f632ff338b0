//! A running guest's kernel as introspection sees it, from a paused vCPU's registers and guest
//! memory: the KASLR slide from LSTAR, the kernel's own top-level page table (`init_top_pgt`,
//! so what the vCPU happened to be running — a user process under page-table isolation, for
//! one — does not matter), and a check that the profile fits before anything is listed.

use thiserror::Error;

use crate::layout::{Btf, KernelLayout, LayoutError};
use crate::modules::{Module, modules};
use crate::pagetable::{Paging, PhysMem, translate};
use crate::symbols::{Kernel, SymbolError, SymbolMap};
use crate::tasks::{Listing, Process, Reader, processes};

/// Where x86-64 Linux maps its image: a kernel-image virtual address minus this, plus
/// `phys_base`, is its physical address.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// A kernel's symbols and structure layouts: everything introspection needs of a kernel, all
/// from files the image ships.
#[derive(Debug)]
pub struct Profile {
    pub map: SymbolMap,
    pub layout: KernelLayout,
}

#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("System.map: {0}")]
    Symbols(#[from] SymbolError),
    #[error("the kernel's BTF: {0}")]
    Layout(#[from] LayoutError),
    #[error("System.map is not text (is it the right file?)")]
    NotText,
}

impl Profile {
    /// A profile from a System.map's text and a kernel's raw BTF (its vmlinux's `.BTF`).
    pub fn load(system_map: &[u8], btf: &[u8]) -> Result<Self, ProfileError> {
        let text = std::str::from_utf8(system_map).map_err(|_| ProfileError::NotText)?;
        let map = SymbolMap::parse(text)?;
        for s in ["init_task", "init_top_pgt", "modules"] {
            map.addr(s)?;
        }
        let layout = KernelLayout::from_btf(&Btf::parse(btf)?)?;
        Ok(Self { map, layout })
    }
}

/// What introspection reads of a paused vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuView {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// MSR_LSTAR: the 64-bit syscall entry point.
    pub lstar: u64,
    /// IDTR and GDTR: base and limit.
    pub idt: (u64, u16),
    pub gdt: (u64, u16),
    /// The other MSRs an attacker redirects system calls with: STAR, CSTAR, SFMASK (syscall
    /// segments, compat entry, flags cleared on entry) and SYSENTER_CS/ESP/EIP.
    pub msrs: [(u32, u64); SECURITY_MSRS.len()],
}

/// The MSRs [`CpuView::msrs`] holds, in order, with their names.
pub const SECURITY_MSRS: [(u32, &str); 6] = [
    (0xc000_0081, "STAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0x174, "SYSENTER_CS"),
    (0x175, "SYSENTER_ESP"),
    (0x176, "SYSENTER_EIP"),
];

impl CpuView {
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;
}

#[derive(Debug, Error)]
pub enum AttachError {
    #[error(
        "the guest is not in 64-bit paging yet (CR0 {cr0:#x}, EFER {efer:#x}): it is still booting; ask again once it is up"
    )]
    NoPaging { cr0: u64, efer: u64 },
    #[error(transparent)]
    Slide(SymbolError),
    #[error(
        "the guest's syscall entry {lstar:#x} is not mapped by its page tables ({why}): the guest is still booting or its tables are damaged"
    )]
    EntryUnmapped { lstar: u64, why: String },
    #[error(
        "init_task at {addr:#x} does not read as the kernel's idle task ({why}): the System.map or BTF is not this guest's kernel's"
    )]
    Mismatch { addr: u64, why: String },
}

/// A guest kernel, located: read through its own page tables, its symbols relocated.
pub struct GuestKernel<'a> {
    pub kernel: Kernel<'a>,
    pub reader: Reader<'a>,
    pub layout: &'a KernelLayout,
    /// The guest-physical address the kernel image was loaded at, less its link address.
    pub phys_base: u64,
}

impl<'a> GuestKernel<'a> {
    /// Locates the kernel `profile` describes in a guest, from one paused vCPU's `cpu` state,
    /// and checks that the profile fits it (the idle task reads back as itself).
    pub fn attach(
        profile: &'a Profile,
        mem: &'a dyn PhysMem,
        cpu: &CpuView,
    ) -> Result<Self, AttachError> {
        let vcpu_paging = Paging::from_registers(cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer).ok_or(
            AttachError::NoPaging {
                cr0: cpu.cr0,
                efer: cpu.efer,
            },
        )?;
        let slide = profile.map.slide(cpu.lstar).map_err(AttachError::Slide)?;
        let kernel = Kernel {
            map: &profile.map,
            slide,
        };
        // Every page table maps the syscall entry (it runs before any switch of CR3), so the
        // vCPU's tables give its physical address and with it phys_base; init_top_pgt then
        // gives the kernel's own view of every kernel address.
        let entry =
            translate(mem, vcpu_paging, cpu.lstar).map_err(|e| AttachError::EntryUnmapped {
                lstar: cpu.lstar,
                why: e.to_string(),
            })?;
        let phys_base = entry
            .gpa
            .wrapping_sub(cpu.lstar.wrapping_sub(START_KERNEL_MAP));
        let mut g = Self {
            kernel,
            reader: Reader {
                mem,
                paging: vcpu_paging,
            },
            layout: &profile.layout,
            phys_base,
        };
        let pgt = g.kernel.addr("init_top_pgt").map_err(AttachError::Slide)?;
        g.reader.paging.cr3 = g.image_pa(pgt);
        g.check_idle_task()?;
        Ok(g)
    }

    /// The guest-physical address of a kernel-image virtual address (text, data, `init_*`).
    pub fn image_pa(&self, va: u64) -> u64 {
        va.wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.phys_base)
    }

    /// The kernel-image virtual address of a guest-physical address in the image.
    pub fn image_va(&self, pa: u64) -> u64 {
        pa.wrapping_sub(self.phys_base)
            .wrapping_add(START_KERNEL_MAP)
    }

    /// `init_task` must be pid 0 named `swapper...` whose parent is itself: a profile of another
    /// kernel (or another build of it) reads something else there.
    fn check_idle_task(&self) -> Result<(), AttachError> {
        let addr = self.kernel.addr("init_task").map_err(AttachError::Slide)?;
        let l = self.layout;
        let why = |w: String| AttachError::Mismatch { addr, why: w };
        let r = &self.reader;
        let comm = (r.string(addr.wrapping_add(l.task_comm), l.task_comm_len))
            .map_err(|e| why(e.to_string()))?;
        let pid = r
            .u32(addr.wrapping_add(l.task_pid))
            .map_err(|e| why(e.to_string()))?;
        let parent = r
            .u64(addr.wrapping_add(l.task_real_parent))
            .map_err(|e| why(e.to_string()))?;
        if !comm.starts_with("swapper") || pid != 0 || parent != addr {
            return Err(why(format!(
                "comm {comm:?}, pid {pid}, parent {parent:#x}; expected \"swapper/0\", 0, itself"
            )));
        }
        Ok(())
    }

    /// The process list (thread-group leaders and the idle task).
    pub fn processes(&self) -> Listing<Process> {
        // Checked in attach.
        let init = self.kernel.addr("init_task").unwrap_or_default();
        processes(&self.reader, self.layout, init)
    }

    /// The loaded modules.
    pub fn modules(&self) -> Listing<Module> {
        match self.kernel.addr("modules") {
            Ok(head) => modules(&self.reader, self.layout, head),
            Err(e) => Listing {
                items: Vec::new(),
                broken: Some(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fuzz::layout;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T _stext
ffffffff81100000 T entry_SYSCALL_64
ffffffff81180000 T _etext
ffffffff81180000 R __start_rodata
ffffffff81181000 R sys_call_table
ffffffff81181100 R __end_rodata
ffffffff81200000 D init_top_pgt
ffffffff81210000 D init_task
ffffffff81220000 D modules
ffffffff81230000 D module_kset
ffffffff81240000 T bprm_execve
0000000000000100 D current_task
ffffffff81300000 B _end
";
    pub(crate) const SLIDE: u64 = 0x0400_0000;
    /// The run-time address of a linked kernel address.
    pub(crate) const fn va(linked: u64) -> u64 {
        linked + SLIDE
    }
    /// Where the test loads the kernel image: `_text` at guest-physical 0.
    pub(crate) const fn pa(linked: u64) -> u64 {
        linked - 0xffff_ffff_8100_0000
    }

    /// A guest whose kernel image (4 MiB from `_text`) is mapped by the tables at
    /// `init_top_pgt`, and a second top-level table for the vCPU (as a process's would be).
    pub(crate) fn guest() -> (GuestMemoryMmap, CpuView) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let pgd = pa(0xffff_ffff_8120_0000);
        let (pud, pmd, user_pgd) = (pgd + 0x1000, pgd + 0x2000, 0x60_0000);
        let text = va(0xffff_ffff_8100_0000);
        let idx = |level: u32| (text >> (12 + 9 * (level - 1))) & 0x1ff;
        for top in [pgd, user_pgd] {
            mem.write_obj(pud | 3, GuestAddress(top + 8 * idx(4)))
                .unwrap();
        }
        mem.write_obj(pmd | 3, GuestAddress(pud + 8 * idx(3)))
            .unwrap();
        for i in 0..2 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(pmd + 8 * (idx(2) + i)))
                .unwrap();
        }
        let l = layout();
        let task = 0xffff_ffff_8121_0000;
        let w = |linked: u64, v: u64| mem.write_obj(v, GuestAddress(pa(linked))).unwrap();
        w(task + l.task_real_parent, va(task));
        w(task + l.task_tasks, va(task + l.task_tasks));
        w(task + l.task_cred, va(task + 0x800));
        mem.write_slice(b"swapper/0", GuestAddress(pa(task + l.task_comm)))
            .unwrap();
        w(0xffff_ffff_8122_0000, va(0xffff_ffff_8122_0000));
        // module_kset points at a kset whose kobject list is empty.
        w(0xffff_ffff_8123_0000, va(0xffff_ffff_8123_0100));
        w(0xffff_ffff_8123_0100, va(0xffff_ffff_8123_0100));
        // IDT gate 3 present, pointing at entry_SYSCALL_64 + 0x10.
        let handler = va(0xffff_ffff_8110_0010);
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[5] = 0x8e;
        gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        mem.write_slice(&gate, GuestAddress(pa(0xffff_ffff_8124_0000 + 3 * 16)))
            .unwrap();
        let cpu = CpuView {
            cr0: 0x8005_0033,
            cr3: user_pgd,
            cr4: 0x20,
            efer: 0xd01,
            lstar: va(0xffff_ffff_8110_0000),
            idt: (va(0xffff_ffff_8124_0000), 0xff),
            gdt: (va(0xffff_ffff_8125_0000), 0x7f),
            ..Default::default()
        };
        (mem, cpu)
    }

    pub(crate) fn profile() -> Profile {
        Profile {
            map: SymbolMap::parse(MAP).unwrap(),
            layout: layout(),
        }
    }

    #[test]
    fn a_guest_kernel_is_found_through_its_own_page_table_and_listed() {
        let (mem, cpu) = guest();
        let p = profile();
        let g = GuestKernel::attach(&p, &mem, &cpu).unwrap();
        assert_eq!(g.kernel.slide, SLIDE);
        assert_eq!(g.reader.paging.cr3, pa(0xffff_ffff_8120_0000));
        let procs = g.processes();
        assert_eq!(procs.broken, None);
        assert_eq!(procs.items.len(), 1);
        assert_eq!(procs.items[0].comm, "swapper/0");
        let mods = g.modules();
        assert!(mods.items.is_empty() && mods.broken.is_none());
    }

    #[test]
    fn a_booting_guest_or_a_wrong_profile_is_refused_with_the_reason() {
        let (mem, cpu) = guest();
        let p = profile();
        let booting = CpuView { cr0: 0x11, ..cpu };
        assert!(matches!(
            GuestKernel::attach(&p, &mem, &booting),
            Err(AttachError::NoPaging { .. })
        ));
        let other_kernel = CpuView {
            lstar: cpu.lstar + 0x40,
            ..cpu
        };
        assert!(matches!(
            GuestKernel::attach(&p, &mem, &other_kernel),
            Err(AttachError::Slide(SymbolError::SlideMismatch { .. }))
        ));
        // A layout whose comm offset is wrong reads something other than "swapper".
        let mut wrong = profile();
        wrong.layout.task_comm += 8;
        match GuestKernel::attach(&wrong, &mem, &cpu) {
            Err(e @ AttachError::Mismatch { .. }) => {
                assert!(e.to_string().contains("not this guest's kernel's"), "{e}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a wrong layout was accepted"),
        }
        // The syscall entry moved to where nothing maps it.
        let unmapped = CpuView {
            lstar: cpu.lstar + 0x4000_0000 - SLIDE,
            ..cpu
        };
        assert!(GuestKernel::attach(&p, &mem, &unmapped).is_err());
    }
}
