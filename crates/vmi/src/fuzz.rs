//! Fuzz harness: introspection reading guest memory the guest wrote as it liked. Input: 8 bytes
//! CR3, 1 byte paging mode, 8 bytes virtual address, 8 bytes `init_task` address, then the
//! first bytes of a 1 MiB guest RAM (the rest zero). The page-table walk, a virtual read, the
//! process- and module-list walks, an integrity measurement (IDT and GDT where the guest says)
//! the `/sys/module` walk and a breakpoint hit's decoding must end (bounded) and never panic; a measurement compared with
//! itself finds nothing. `fuzz/fuzz_targets/vmi_walk.rs` runs it; `tests/fuzz_corpus.rs` replays the
//! corpus.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest::{CpuView, GuestKernel};
use crate::integrity;
use crate::layout::{ExecArg, KernelLayout};
use crate::modules::{MAX_MODULES, modules};
use crate::pagetable::{Paging, read_virt, translate};
use crate::symbols::{Kernel, SymbolMap};
use crate::tasks::{MAX_TASKS, Reader, processes};
use crate::trace::Decoder;

const RAM: usize = 1 << 20;
const HEAD: usize = 25;

/// A plausible layout (offsets of the 6.1 kernel's order of magnitude, all within the first
/// 2 KiB of a task), shared with the task-list tests.
pub(crate) fn layout() -> KernelLayout {
    KernelLayout {
        task_tasks: 0x4a8,
        task_pid: 0x598,
        task_tgid: 0x59c,
        task_comm: 0x738,
        task_comm_len: 16,
        task_real_parent: 0x5a8,
        task_cred: 0x728,
        task_state: 0x18,
        task_start_time: 0x6a8,
        task_mm: 0x4f8,
        cred_uid: 4,
        module_list: 8,
        module_name: 0x18,
        module_name_len: 56,
        module_state: 0,
        module_base: 0x140,
        module_size: 0x148,
        list_next: 0,
        kset_list: 0,
        kobject_entry: 8,
        kobject_name: 0,
        module_kobject_mod: 0x40,
        filename_name: 0,
        bprm_filename: 0x40,
        exec_args: [Some(ExecArg::Filename(2)), Some(ExecArg::Bprm(0))],
    }
}

pub fn fuzz_walk(data: &[u8]) {
    if data.len() < HEAD {
        return;
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or([0; 8]));
    let paging = Paging {
        cr3: word(0),
        five_level: data[8] & 1 != 0,
    };
    let va = word(9);
    let init_task = word(17);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]) else {
        return;
    };
    let body = &data[HEAD..data.len().min(HEAD + RAM)];
    if mem.write_slice(body, GuestAddress(0)).is_err() {
        return;
    }
    if let Ok(t) = translate(&mem, paging, va) {
        assert!(matches!(t.page_size, 0x1000 | 0x20_0000 | 0x4000_0000));
        assert_eq!(t.gpa & (t.page_size - 1), va & (t.page_size - 1));
    }
    let mut buf = [0u8; 64];
    let _ = read_virt(&mem, paging, va, &mut buf);
    let r = Reader { mem: &mem, paging };
    let list = processes(&r, &layout(), init_task);
    assert!(list.items.len() <= MAX_TASKS + 1);
    for p in &list.items {
        assert!(p.comm.len() <= 16 * 3, "lossy UTF-8 of 16 bytes at most");
    }
    // The module list from the same head, the integrity measurement of a small kernel whose
    // symbols sit where the guest-chosen tables map them, and the sysfs walk.
    let l = layout();
    let mods = modules(&r, &l, init_task);
    assert!(mods.items.len() <= MAX_MODULES);
    let map = kernel_map();
    let g = GuestKernel {
        kernel: Kernel { map, slide: 0 },
        reader: r,
        layout: &l,
        phys_base: 0,
    };
    let cpu = CpuView {
        idt: (va, init_task as u16),
        gdt: (va, (init_task >> 16) as u16),
        ..Default::default()
    };
    if let Ok(m) = integrity::measure(&g, &[cpu]) {
        assert!(m.cpus[0].idt.len() <= 256);
        assert!(integrity::compare(&g, &mods.items, &m, &m).is_empty());
    }
    let _ = integrity::hidden_modules(&g, &mods.items);
    // A breakpoint hit whose per-CPU base and argument registers the guest chose: the
    // decoder reads what they point at and always gives a hit.
    for exec_arg in [Some(ExecArg::Filename(2)), Some(ExecArg::Bprm(0)), None] {
        let d = Decoder {
            paging,
            layout: l,
            current_task: init_task & 0xfff,
            exec_arg,
        };
        let hit = d.decode(&mem, va, [init_task, va, va, init_task, 0, 0]);
        assert!(hit.comm.len() <= 16 * 3 && hit.detail.len() <= 1024);
    }
}

/// A small kernel for the integrity measurement: 8 KiB of text and 4 KiB of rodata at
/// `0xffff888000000000`, which the seeds' tables map.
fn kernel_map() -> &'static SymbolMap {
    static MAP: std::sync::OnceLock<SymbolMap> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let text = "ffff888000000000 T _stext\n\
                    ffff888000002000 T _etext\n\
                    ffff888000002000 R __start_rodata\n\
                    ffff888000002800 R sys_call_table\n\
                    ffff888000003000 R __end_rodata\n\
                    ffff888000004000 D module_kset\n\
                    ffff888000005000 B _end\n";
        SymbolMap::parse(text).unwrap_or_else(|e| panic!("the fuzz kernel's map: {e}"))
    })
}

/// Seeds: a walk through 4-level tables to a 2 MiB page holding a two-task list, a 5-level
/// walk, a self-referencing root.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let head = |cr3: u64, five: u8, va: u64, init: u64| {
        let mut v = Vec::new();
        v.extend_from_slice(&cr3.to_le_bytes());
        v.push(five);
        v.extend_from_slice(&va.to_le_bytes());
        v.extend_from_slice(&init.to_le_bytes());
        v
    };
    let put = |mem: &mut Vec<u8>, at: usize, v: u64| {
        if mem.len() < at + 8 {
            mem.resize(at + 8, 0);
        }
        mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    const BASE: u64 = 0xffff_8880_0000_0000;
    let idx = |va: u64, level: u32| ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize;
    // Tables at 0x1000 (L4), 0x2000 (L3), 0x3000 (L2); a 2 MiB page at 0 maps BASE.
    let mut mem = Vec::new();
    put(&mut mem, 0x1000 + 8 * idx(BASE, 4), 0x2000 | 3);
    put(&mut mem, 0x2000 + 8 * idx(BASE, 3), 0x3000 | 3);
    put(&mut mem, 0x3000 + 8 * idx(BASE, 2), 0x83);
    let l = layout();
    let (t0, t1) = (0x8000u64, 0x9000u64);
    put(
        &mut mem,
        (t0 + l.task_tasks) as usize,
        BASE + t1 + l.task_tasks,
    );
    put(
        &mut mem,
        (t1 + l.task_tasks) as usize,
        BASE + t0 + l.task_tasks,
    );
    for t in [t0, t1] {
        put(&mut mem, (t + l.task_real_parent) as usize, BASE + t0);
        put(&mut mem, (t + l.task_cred) as usize, BASE + 0xa000);
    }
    let mut walk = head(0x1000, 0, BASE + 0x8000, BASE + t0);
    walk.extend_from_slice(&mem);
    let mut five = head(0x1000, 1, 0xff11_0000_0000_0000, 0);
    five.extend_from_slice(&mem);
    let mut selfref = head(0x1000, 0, 0x1234, 0x1000);
    let mut m = vec![0u8; 0x2000];
    for i in 0..512 {
        put(&mut m, 0x1000 + 8 * i, 0x1000 | 3);
    }
    selfref.extend_from_slice(&m);
    vec![
        ("walk", walk),
        ("five_level", five),
        ("self_reference", selfref),
    ]
}
