//! The kernel symbols of the default guest image, from its kernel's own kallsyms tables:
//! Debian's package ships a placeholder `System.map`, so `bulwark image build` writes the map
//! it decodes from the `vmlinux` instead. Builds the default image once (packages cached under
//! the user's cache directory); needs no KVM.

mod common;

use bulwark_image::ImageManifest;
use bulwark_image::kallsyms::{self, Symbol};

/// Where Debian's x86-64 kernels link `.text` (`_text`, `startup_64`).
const TEXT: u64 = 0xffff_ffff_8100_0000;

fn find<'a>(symbols: &'a [Symbol], name: &str) -> &'a Symbol {
    symbols
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} among {} kallsyms symbols", symbols.len()))
}

#[test]
fn kallsyms_of_the_image_kernel() {
    let dir = common::image_dir();
    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    let symbols = kallsyms::symbols(&vmlinux).unwrap();

    assert!(symbols.len() > 50_000, "only {} symbols", symbols.len());
    assert!(
        symbols.windows(2).all(|w| w[0].addr <= w[1].addr),
        "symbols are not sorted by address"
    );

    let text = find(&symbols, "_text");
    assert_eq!((text.addr, text.kind), (TEXT, 'T'));
    let startup = find(&symbols, "startup_64");
    assert_eq!(startup.addr, TEXT);
    for name in [
        "startup_64",
        "entry_SYSCALL_64",
        "init_task",
        "sys_call_table",
        "_etext",
        "modules",
    ] {
        let s = find(&symbols, name);
        assert!(s.addr >= TEXT, "{name} at {:#x}, below .text", s.addr);
    }
    let init_task = find(&symbols, "init_task");
    assert!(matches!(init_task.kind, 'D' | 'd'), "{init_task:?}");
    let sys_call_table = find(&symbols, "sys_call_table");
    assert!(
        matches!(sys_call_table.kind, 'D' | 'R' | 'r'),
        "{sys_call_table:?}"
    );
    // The syscall entry is code: inside .text (`_stext` .. `_etext`).
    let entry = find(&symbols, "entry_SYSCALL_64");
    let (stext, etext) = (find(&symbols, "_stext"), find(&symbols, "_etext"));
    assert!(matches!(entry.kind, 'T' | 't'), "{entry:?}");
    assert!(
        stext.addr <= entry.addr && entry.addr < etext.addr,
        "entry_SYSCALL_64 at {:#x} is outside .text {:#x}..{:#x}",
        entry.addr,
        stext.addr,
        etext.addr
    );
    eprintln!(
        "{} symbols; _text {:#x}, entry_SYSCALL_64 {:#x}, init_task {:#x}, sys_call_table {:#x}, _etext {:#x}",
        symbols.len(),
        text.addr,
        entry.addr,
        init_task.addr,
        sys_call_table.addr,
        etext.addr
    );
}

#[test]
fn image_system_map_is_the_kallsyms_map_in_the_manifest() {
    let dir = common::image_dir();
    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    let map = std::fs::read_to_string(dir.join("System.map")).unwrap();
    assert!(
        kallsyms::map_has_symbols(map.as_bytes()),
        "the image's System.map is a placeholder:\n{}",
        map.lines().next().unwrap_or_default()
    );
    assert_eq!(
        map,
        kallsyms::system_map(&kallsyms::symbols(&vmlinux).unwrap()),
        "the image's System.map is not the map of its kernel's kallsyms"
    );
    let manifest = ImageManifest::read(&dir).unwrap();
    assert!(manifest.files.contains_key("System.map"));
    manifest.verify(&dir).unwrap();
}
