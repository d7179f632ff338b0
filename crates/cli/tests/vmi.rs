//! Introspection's kernel awareness against a real Debian cloud kernel: the System.map and the
//! vmlinux (with its BTF) that `bulwark image build` ships. No guest runs here; these are the
//! profile-free parts a running guest's introspection starts from.

mod common;

use bulwark_vmi::layout::{Btf, ExecArg, KernelLayout, LayoutError};
use bulwark_vmi::symbols::{KASLR_ALIGN, SYSCALL_ENTRY, SymbolError, SymbolMap};
use common::{image_dir, other_kernel_image};
use std::path::Path;

fn read_from(dir: &Path, name: &str) -> Vec<u8> {
    let p = dir.join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn read(name: &str) -> Vec<u8> {
    read_from(&image_dir(), name)
}

/// The default image's 6.1 kernel and a 6.12 one: the layout and the map come from each
/// kernel's own files, whatever changed between them (`struct module`'s memory layout,
/// `current_task` in `pcpu_hot`, the order of the kallsyms tables).
fn kernels() -> [std::path::PathBuf; 2] {
    [image_dir(), other_kernel_image()]
}

#[test]
fn the_image_kernel_s_btf_gives_the_layouts_introspection_reads() {
    for dir in kernels() {
        btf_layout_of(&dir);
    }
}

fn btf_layout_of(dir: &Path) {
    let btf = Btf::from_vmlinux(&read_from(dir, "vmlinux")).expect("Debian's vmlinux carries .BTF");
    let l = KernelLayout::from_btf(&btf).unwrap();
    // Facts of every x86-64 Linux: list_head is {next, prev}; TASK_COMM_LEN is 16;
    // MODULE_NAME_LEN is 64 - sizeof(unsigned long).
    assert_eq!(l.list_next, 0);
    assert_eq!(btf.offset("list_head", "prev").unwrap(), 8);
    assert_eq!(l.task_comm_len, 16);
    assert_eq!(l.module_name_len, 56);
    assert_eq!(btf.member_size("task_struct", "pid").unwrap(), 4);
    let task = btf.size("task_struct").unwrap();
    let offsets = [
        l.task_tasks,
        l.task_pid,
        l.task_tgid,
        l.task_comm,
        l.task_real_parent,
        l.task_cred,
        l.task_state,
        l.task_start_time,
        l.task_mm,
    ];
    assert!(
        offsets.iter().all(|&o| o < task),
        "every member inside the {task}-byte task_struct: {l:?}"
    );
    let mut sorted = offsets.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        offsets.len(),
        "members at distinct offsets: {l:?}"
    );
    // tgid follows pid (both pid_t) in every kernel since 2.6.
    assert_eq!(l.task_tgid, l.task_pid + 4);
    // The exec path's file name, from the functions' own prototypes: `bprm_execve` took the
    // `struct filename *` third up to 6.5, and only the `struct linux_binprm *` since.
    let release = String::from_utf8(read_from(dir, "manifest.json")).unwrap();
    let expect = if release.contains("\"6.1.0-") {
        ExecArg::Filename(2)
    } else {
        ExecArg::Bprm(0)
    };
    assert_eq!(l.exec_args[0], Some(expect), "{}", dir.display());
    let params = btf.params("bprm_execve").unwrap();
    assert_eq!(params[0].name, "bprm");
    assert_eq!(params[0].pointee.as_deref(), Some("linux_binprm"));
    assert!(matches!(
        btf.params("no_such_function"),
        Err(LayoutError::NoType(_))
    ));
    // A nested path resolves through the members on the way.
    assert_eq!(
        btf.offset("task_struct", "tasks.next").unwrap(),
        l.task_tasks
    );
}

#[test]
fn the_image_kernel_s_system_map_finds_the_symbols_and_the_slide() {
    for dir in kernels() {
        system_map_of(&dir);
    }
}

fn system_map_of(dir: &Path) {
    let text = String::from_utf8(read_from(dir, "System.map")).unwrap();
    let map = SymbolMap::parse(&text).unwrap();
    assert!(
        map.len() > 50_000,
        "a whole kernel's symbols: {}",
        map.len()
    );
    for s in [
        "init_task",
        "sys_call_table",
        "_text",
        "_etext",
        "modules",
        "module_kset",
        "bprm_execve",
        SYSCALL_ENTRY,
    ] {
        let a = map.addr(s).unwrap();
        assert!(
            a >= 0xffff_ffff_8000_0000,
            "{s} at {a:#x}: {}",
            dir.display()
        );
    }
    // The breakpoint decoder finds the running task through one or the other per-CPU symbol
    // (`pcpu_hot` from Linux 6.2).
    assert!(
        map.addr("current_task").is_ok() || map.addr("pcpu_hot").is_ok(),
        "{}",
        dir.display()
    );
    let entry = map.addr(SYSCALL_ENTRY).unwrap();
    assert_eq!(map.resolve(entry + 3).unwrap().0, SYSCALL_ENTRY);
    let slide = 0x1c * KASLR_ALIGN;
    assert_eq!(map.slide(entry + slide).unwrap(), slide);
    assert!(matches!(
        map.slide(entry + 0x1000),
        Err(SymbolError::SlideMismatch { .. })
    ));
}

#[test]
fn wrong_or_damaged_kernel_files_are_named_not_guessed() {
    // The bzImage is not the ELF vmlinux.
    assert!(matches!(
        Btf::from_vmlinux(&read("bzImage")),
        Err(LayoutError::NotElf(_))
    ));
    // BTF cut short.
    let vmlinux = read("vmlinux");
    let elf = bulwark_image::elf::Elf::parse(&vmlinux).unwrap();
    let raw = elf.section(".BTF").unwrap().unwrap();
    assert!(
        raw.len() > 1 << 20,
        "the BTF of a whole kernel: {} bytes",
        raw.len()
    );
    for cut in [0, 10, 24, raw.len() / 2] {
        assert!(
            matches!(Btf::parse(&raw[..cut]), Err(LayoutError::BadBtf(_))),
            "BTF cut at {cut} bytes"
        );
    }
    // A member this kernel does not have.
    let btf = Btf::parse(raw).unwrap();
    assert!(matches!(
        btf.offset("task_struct", "no_such_member"),
        Err(LayoutError::NoMember { .. })
    ));
    assert!(matches!(
        btf.offset("no_such_struct", "x"),
        Err(LayoutError::NoType(_))
    ));
    // A System.map cut in the middle of a line.
    let text = String::from_utf8(read("System.map")).unwrap();
    let end = text[..text.len() / 2].rfind('\n').unwrap() + 10;
    let cut = &text[..end];
    assert!(matches!(
        SymbolMap::parse(cut),
        Err(SymbolError::BadLine { .. })
    ));
}
