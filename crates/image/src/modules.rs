//! Kernel modules of a kernel package: finding them, their dependencies, and their load order.
//!
//! Debian's kernel packages ship `lib/modules/<release>/kernel/**.ko` (6.12: `.ko.xz`),
//! `modules.builtin` and `modules.order`, but not `modules.dep`: their post-install script runs
//! depmod. So the dependency graph comes from `modules.dep` when the tree has one (an installed
//! kernel), and otherwise from each module's own `.modinfo` section (`depends=`, which modpost
//! wrote from the same symbol resolution depmod does). Every module taken is decompressed and its
//! `vermagic` checked against the kernel release: an initramfs whose modules do not match its
//! kernel is refused at build time, because the guest could not load them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::decompress::{self, DecompressError};
use crate::elf::{Elf, ElfError};

/// Largest module accepted after decompression.
const MODULE_LIMIT: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a kernel module")]
    NotModule {
        path: String,
        #[source]
        source: ElfError,
    },
    #[error("{path}: cannot decompress the module")]
    Decompress {
        path: String,
        #[source]
        source: DecompressError,
    },
    #[error("{path}: the module has no .modinfo section")]
    NoModinfo { path: String },
    #[error(
        "module {name} is not in {dir} (nor built in): check the name, or use a kernel package that has it"
    )]
    NotFound { name: String, dir: PathBuf },
    #[error(
        "refusing to build: module {name} was built for kernel {module_release} but the kernel is {kernel_release}; take the modules from the same kernel package as the kernel"
    )]
    VermagicMismatch {
        name: String,
        module_release: String,
        kernel_release: String,
    },
    #[error(
        "module {name} has no vermagic, so it cannot be checked against kernel {kernel_release}; use the modules of a Debian kernel package"
    )]
    NoVermagic {
        name: String,
        kernel_release: String,
    },
    #[error("modules.dep line {line}: {problem}")]
    BadModulesDep { line: usize, problem: &'static str },
    #[error("modules {0} depend on each other in a cycle; the module tree is broken")]
    Cycle(String),
}

/// The fields of a module's `.modinfo` section that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub vermagic: Option<String>,
    pub depends: Vec<String>,
}

impl ModInfo {
    /// Reads `.modinfo` (NUL-separated `key=value` strings) of an uncompressed `.ko`.
    pub fn parse(ko: &[u8], path: &str) -> Result<Self, ModulesError> {
        let not_module = |source| ModulesError::NotModule {
            path: path.to_owned(),
            source,
        };
        let elf = Elf::parse(ko).map_err(not_module)?;
        let section = elf
            .section(".modinfo")
            .map_err(not_module)?
            .ok_or_else(|| ModulesError::NoModinfo {
                path: path.to_owned(),
            })?;
        let mut info = ModInfo {
            name: None,
            vermagic: None,
            depends: Vec::new(),
        };
        for field in section.split(|&b| b == 0) {
            let field = String::from_utf8_lossy(field);
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            match key {
                "name" => info.name = Some(value.to_owned()),
                "vermagic" => info.vermagic = Some(value.to_owned()),
                "depends" => {
                    info.depends = value
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(module_name)
                        .collect();
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// The kernel release the module was built for: the first word of `vermagic`.
    pub fn release(&self) -> Option<&str> {
        self.vermagic.as_deref()?.split_whitespace().next()
    }
}

/// The module name of a file or path: `.../kvm-amd.ko.xz` -> `kvm_amd` (the kernel treats `-`
/// and `_` alike and reports `_`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A `modules.dep` file: each module's path, then the paths of everything it needs. As depmod
/// writes it, the list is in reverse load order (the last one is loaded first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModulesDep {
    /// Module path -> dependency paths, in file order.
    entries: BTreeMap<String, Vec<String>>,
    /// Paths in the order they appeared (or were inserted), for rendering.
    order: Vec<String>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> Result<Self, ModulesError> {
        let mut dep = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem| ModulesError::BadModulesDep {
                line: i + 1,
                problem,
            };
            let (module, deps) = line.split_once(':').ok_or(bad("no `:` after the module"))?;
            let module = module.trim();
            if module.is_empty() || module.contains(char::is_whitespace) {
                return Err(bad("module path is empty or has spaces"));
            }
            if dep.entries.contains_key(module) {
                return Err(bad("module listed twice"));
            }
            dep.insert(
                module.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            );
        }
        Ok(dep)
    }

    pub fn insert(&mut self, module: String, deps: Vec<String>) {
        if self.entries.insert(module.clone(), deps).is_none() {
            self.order.push(module);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for m in &self.order {
            out.push_str(m);
            out.push(':');
            for d in &self.entries[m] {
                out.push(' ');
                out.push_str(d);
            }
            out.push('\n');
        }
        out
    }

    /// The path of module `name`, if listed.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.order
            .iter()
            .find(|p| module_name(p) == name)
            .map(String::as_str)
    }

    /// Direct dependencies (by module name) of the module at `path`.
    pub fn depends(&self, path: &str) -> Vec<String> {
        self.entries
            .get(path)
            .map(|d| d.iter().map(|p| module_name(p)).collect())
            .unwrap_or_default()
    }

    /// Load order for `wanted` (paths): every dependency before its users, each module once.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut state = HashMap::new();
        for w in wanted {
            visit(
                &module_name(w),
                &mut |name: &str| {
                    let path = self.path_of(name).map(str::to_owned);
                    let deps = path.as_deref().map(|p| self.depends(p)).unwrap_or_default();
                    Ok((path.unwrap_or_else(|| name.to_owned()), deps))
                },
                &mut state,
                &mut order,
            )?;
        }
        Ok(order)
    }
}

/// Looks a module up by name: (the item to emit, names of its dependencies).
type Lookup<'a, T> = dyn FnMut(&str) -> Result<(T, Vec<String>), ModulesError> + 'a;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Visiting,
    Done,
}

/// Depth-first post-order: dependencies first. `lookup(name)` gives (item, dependency names);
/// depmod lists dependencies in reverse load order, so they are visited from the end.
fn visit<T>(
    name: &str,
    lookup: &mut Lookup<'_, T>,
    state: &mut HashMap<String, Mark>,
    order: &mut Vec<T>,
) -> Result<(), ModulesError> {
    match state.get(name) {
        Some(Mark::Done) => return Ok(()),
        Some(Mark::Visiting) => return Err(ModulesError::Cycle(name.to_owned())),
        None => {}
    }
    state.insert(name.to_owned(), Mark::Visiting);
    let (item, deps) = lookup(name)?;
    for d in deps.iter().rev() {
        visit(d, lookup, state, order)?;
    }
    state.insert(name.to_owned(), Mark::Done);
    order.push(item);
    Ok(())
}

/// A module chosen for an initramfs, decompressed and checked.
#[derive(Clone, Debug)]
pub struct Module {
    pub name: String,
    /// Path relative to `lib/modules/<release>/`, always ending in `.ko`.
    pub path: String,
    pub data: Vec<u8>,
    /// Names of the modules it needs (all earlier in the set).
    pub depends: Vec<String>,
}

/// Modules in load order, plus the requested ones that are built into the kernel.
#[derive(Clone, Debug, Default)]
pub struct ModuleSet {
    pub release: String,
    pub modules: Vec<Module>,
    pub builtin: Vec<String>,
}

impl ModuleSet {
    /// `modules.dep` for just these modules (so `modprobe` works in the guest too).
    pub fn modules_dep(&self) -> ModulesDep {
        let path_of: HashMap<&str, &str> = self
            .modules
            .iter()
            .map(|m| (m.name.as_str(), m.path.as_str()))
            .collect();
        let mut dep = ModulesDep::default();
        for (i, m) in self.modules.iter().enumerate() {
            // All transitive dependencies, in reverse load order as depmod writes them.
            let mut needed = BTreeSet::new();
            let mut stack: Vec<&str> = m.depends.iter().map(String::as_str).collect();
            while let Some(d) = stack.pop() {
                if needed.insert(d)
                    && let Some(dm) = self.modules.iter().find(|x| x.name == d)
                {
                    stack.extend(dm.depends.iter().map(String::as_str));
                }
            }
            let deps = self.modules[..i]
                .iter()
                .rev()
                .filter(|x| needed.contains(x.name.as_str()))
                .filter_map(|x| path_of.get(x.name.as_str()).map(|p| (*p).to_owned()))
                .collect();
            dep.insert(m.path.clone(), deps);
        }
        dep
    }

    /// Total bytes of module data.
    pub fn size(&self) -> usize {
        self.modules.iter().map(|m| m.data.len()).sum()
    }
}

/// `lib/modules/<release>` of a kernel package.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    release: String,
    /// Module name -> path relative to `dir` (possibly compressed).
    files: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
    dep: Option<ModulesDep>,
}

impl ModuleTree {
    /// Opens `dir` (`.../lib/modules/<release>`); the release is the directory's name.
    pub fn open(dir: &Path) -> Result<Self, ModulesError> {
        let release = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files)?;
        let read_opt = |name: &str| -> Result<Option<String>, ModulesError> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ModulesError::Read { path, source }),
            }
        };
        let builtin = read_opt("modules.builtin")?
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        let dep = match read_opt("modules.dep")? {
            Some(text) if !text.trim().is_empty() => Some(ModulesDep::parse(&text)?),
            _ => None,
        };
        Ok(Self {
            dir: dir.to_owned(),
            release,
            files,
            builtin,
            dep,
        })
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the tree has a `modules.dep` (else dependencies come from `.modinfo`).
    pub fn has_modules_dep(&self) -> bool {
        self.dep.is_some()
    }

    /// Whether module `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// The modules `wanted` (names like `virtio_net` or `kvm-amd`) and everything they depend
    /// on, in load order, each checked against the kernel release `kernel_release`. Built-in
    /// modules are reported in [`ModuleSet::builtin`] and not loaded.
    pub fn resolve(
        &self,
        wanted: &[&str],
        kernel_release: &str,
    ) -> Result<ModuleSet, ModulesError> {
        let mut set = ModuleSet {
            release: kernel_release.to_owned(),
            ..ModuleSet::default()
        };
        let mut state = HashMap::new();
        let mut order: Vec<Option<Module>> = Vec::new();
        for w in wanted {
            let name = module_name(w);
            visit(
                &name,
                &mut |name: &str| self.load(name, kernel_release, &mut set.builtin),
                &mut state,
                &mut order,
            )?;
        }
        set.modules = order.into_iter().flatten().collect();
        Ok(set)
    }

    /// One module: `(None, [])` when built in.
    fn load(
        &self,
        name: &str,
        kernel_release: &str,
        builtin: &mut Vec<String>,
    ) -> Result<(Option<Module>, Vec<String>), ModulesError> {
        let Some(rel) = self.files.get(name) else {
            if self.builtin.contains(name) {
                builtin.push(name.to_owned());
                return Ok((None, Vec::new()));
            }
            return Err(ModulesError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        };
        let path = self.dir.join(rel);
        let raw = std::fs::read(&path).map_err(|source| ModulesError::Read {
            path: path.clone(),
            source,
        })?;
        let data = if raw.starts_with(b"\x7fELF") {
            raw
        } else {
            decompress::decompress(&raw, MODULE_LIMIT)
                .map_err(|source| ModulesError::Decompress {
                    path: rel.clone(),
                    source,
                })?
                .1
        };
        let info = ModInfo::parse(&data, rel)?;
        match info.release() {
            Some(r) if r == kernel_release => {}
            Some(r) => {
                return Err(ModulesError::VermagicMismatch {
                    name: name.to_owned(),
                    module_release: r.to_owned(),
                    kernel_release: kernel_release.to_owned(),
                });
            }
            None => {
                return Err(ModulesError::NoVermagic {
                    name: name.to_owned(),
                    kernel_release: kernel_release.to_owned(),
                });
            }
        }
        let depends = match &self.dep {
            Some(dep) => dep.depends(rel),
            None => info.depends.clone(),
        };
        let ko = match rel.find(".ko") {
            Some(i) => format!("{}.ko", &rel[..i]),
            None => rel.clone(),
        };
        let module = Module {
            name: name.to_owned(),
            path: ko,
            data,
            depends: depends.clone(),
        };
        Ok((Some(module), depends))
    }
}

/// Collects `*.ko` / `*.ko.{xz,zst,gz}` under `dir/kernel` (and `dir/updates`, `dir/extra`).
fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) -> Result<(), ModulesError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if dir != root && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ModulesError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        if meta.is_dir() {
            // At the top, only the module directories (not `build`/`source` links).
            let top = dir == root;
            if !top || matches!(&*file_name, "kernel" | "updates" | "extra") {
                walk(root, &path, files)?;
            }
        } else if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|s| file_name.ends_with(s))
        {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            // The first found wins (sorted walk: deterministic).
            files.entry(module_name(&rel)).or_insert(rel);
        }
    }
    Ok(())
}

/// Test helper: a fake `.ko` with the given modinfo fields.
#[cfg(test)]
pub(crate) fn fake_module(name: &str, vermagic: &str, depends: &[&str]) -> Vec<u8> {
    let modinfo = format!(
        "license=GPL\0depends={}\0intree=Y\0name={name}\0vermagic={vermagic} SMP preempt mod_unload modversions \0",
        depends.join(",")
    );
    crate::elf::synthetic_elf(1, &[(".modinfo", 1, modinfo.into_bytes())], false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REL: &str = "6.1.0-99-cloud-amd64";

    fn tree(dir: &Path, mods: &[(&str, &[&str])], builtin: &[&str]) {
        for (path, deps) in mods {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let ko = fake_module(&module_name(path), REL, deps);
            let bytes = if path.ends_with(".xz") {
                let mut out = Vec::new();
                let mut w =
                    lzma_rust2::XzWriter::new(&mut out, lzma_rust2::XzOptions::with_preset(1))
                        .unwrap();
                std::io::Write::write_all(&mut w, &ko).unwrap();
                w.finish().unwrap();
                out
            } else {
                ko
            };
            std::fs::write(p, bytes).unwrap();
        }
        std::fs::write(dir.join("modules.builtin"), builtin.join("\n")).unwrap();
    }

    /// `<test dir>/<release>`, so the release is the directory's name.
    fn tempdir(tag: &str) -> (crate::TestDir, PathBuf) {
        let t = crate::TestDir::new(&format!("modules-{tag}"));
        let d = t.0.join(REL);
        std::fs::create_dir_all(&d).unwrap();
        (t, d)
    }

    const VIRTIO_NET: &[(&str, &[&str])] = &[
        ("kernel/drivers/virtio/virtio.ko", &[]),
        ("kernel/drivers/virtio/virtio_ring.ko", &[]),
        (
            "kernel/drivers/virtio/virtio_mmio.ko",
            &["virtio", "virtio_ring"],
        ),
        ("kernel/net/core/failover.ko", &[]),
        ("kernel/drivers/net/net_failover.ko", &["failover"]),
        (
            "kernel/drivers/net/virtio_net.ko",
            &["virtio_ring", "virtio", "net_failover"],
        ),
        ("kernel/arch/x86/kvm/kvm-amd.ko.xz", &["kvm"]),
        ("kernel/arch/x86/kvm/kvm.ko.xz", &["irqbypass"]),
        ("kernel/virt/lib/irqbypass.ko.xz", &[]),
    ];

    fn position(set: &ModuleSet, name: &str) -> usize {
        set.modules.iter().position(|m| m.name == name).unwrap()
    }

    #[test]
    fn modules_resolve_from_modinfo_puts_dependencies_first() {
        let (_t, dir) = tempdir("modinfo");
        tree(&dir, VIRTIO_NET, &[]);
        let t = ModuleTree::open(&dir).unwrap();
        assert!(!t.has_modules_dep());
        let set = t.resolve(&["virtio_mmio", "virtio_net"], REL).unwrap();
        let names: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(position(&set, "virtio") < position(&set, "virtio_mmio"));
        assert!(position(&set, "virtio_ring") < position(&set, "virtio_mmio"));
        assert!(position(&set, "failover") < position(&set, "net_failover"));
        assert!(position(&set, "net_failover") < position(&set, "virtio_net"));
        assert_eq!(
            set.modules[position(&set, "virtio_net")].path,
            "kernel/drivers/net/virtio_net.ko"
        );
    }

    #[test]
    fn modules_compressed_are_decompressed_and_renamed_to_ko() {
        let (_t, dir) = tempdir("xz");
        tree(&dir, VIRTIO_NET, &[]);
        let set = ModuleTree::open(&dir)
            .unwrap()
            .resolve(&["kvm-amd"], REL)
            .unwrap();
        let names: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["irqbypass", "kvm", "kvm_amd"]);
        assert_eq!(set.modules[2].path, "kernel/arch/x86/kvm/kvm-amd.ko");
        assert!(set.modules.iter().all(|m| m.data.starts_with(b"\x7fELF")));
    }

    #[test]
    fn modules_builtin_are_reported_not_loaded() {
        let (_t, dir) = tempdir("builtin");
        tree(
            &dir,
            &[(
                "kernel/drivers/virtio/virtio_mmio.ko",
                &["virtio", "virtio_ring"],
            )],
            &[
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
            ],
        );
        let t = ModuleTree::open(&dir).unwrap();
        assert!(t.is_builtin("virtio"));
        let set = t.resolve(&["virtio_mmio"], REL).unwrap();
        assert_eq!(set.modules.len(), 1);
        assert_eq!(set.builtin, ["virtio_ring", "virtio"]);
    }

    #[test]
    fn modules_for_another_kernel_are_refused_with_both_releases_named() {
        let (_t, dir) = tempdir("vermagic");
        tree(&dir, VIRTIO_NET, &[]);
        let e = ModuleTree::open(&dir)
            .unwrap()
            .resolve(&["virtio_mmio"], "6.1.0-98-cloud-amd64")
            .unwrap_err();
        assert!(matches!(e, ModulesError::VermagicMismatch { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains(REL) && msg.contains("6.1.0-98-cloud-amd64"),
            "{msg}"
        );
    }

    #[test]
    fn modules_missing_is_not_found() {
        let (_t, dir) = tempdir("missing");
        tree(&dir, VIRTIO_NET, &[]);
        let e = ModuleTree::open(&dir)
            .unwrap()
            .resolve(&["virtio_blk"], REL)
            .unwrap_err();
        assert!(matches!(e, ModulesError::NotFound { ref name, .. } if name == "virtio_blk"));
    }

    #[test]
    fn modules_dep_file_is_preferred_and_parsed_in_depmod_order() {
        let (_t, dir) = tempdir("depfile");
        // .modinfo says nothing about dependencies; modules.dep does.
        let plain: Vec<(&str, &[&str])> = VIRTIO_NET.iter().map(|(p, _)| (*p, &[][..])).collect();
        tree(&dir, &plain, &[]);
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n",
        )
        .unwrap();
        let t = ModuleTree::open(&dir).unwrap();
        assert!(t.has_modules_dep());
        let set = t.resolve(&["virtio_net"], REL).unwrap();
        let names: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio_ring", "failover", "net_failover", "virtio_net"]
        );
    }

    #[test]
    fn modules_dep_parse_render_round_trip_and_load_order() {
        let text = "kernel/b.ko: kernel/a.ko\nkernel/c.ko: kernel/b.ko kernel/a.ko\nkernel/a.ko:\n";
        let dep = ModulesDep::parse(text).unwrap();
        assert_eq!(dep.render(), text);
        assert_eq!(dep.depends("kernel/c.ko"), ["b", "a"]);
        assert_eq!(
            dep.load_order(&["kernel/c.ko"]).unwrap(),
            ["kernel/a.ko", "kernel/b.ko", "kernel/c.ko"]
        );
        assert!(matches!(
            ModulesDep::parse("no colon here"),
            Err(ModulesError::BadModulesDep { line: 1, .. })
        ));
        assert!(matches!(
            ModulesDep::parse("a.ko:\na.ko:\n"),
            Err(ModulesError::BadModulesDep { line: 2, .. })
        ));
        let cyclic = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(
            cyclic.load_order(&["a.ko"]),
            Err(ModulesError::Cycle(_))
        ));
    }

    #[test]
    fn modules_set_writes_transitive_modules_dep() {
        let (_t, dir) = tempdir("write");
        tree(&dir, VIRTIO_NET, &[]);
        let set = ModuleTree::open(&dir)
            .unwrap()
            .resolve(&["virtio_net"], REL)
            .unwrap();
        let dep = ModulesDep::parse(&set.modules_dep().render()).unwrap();
        let order = dep
            .load_order(&["kernel/drivers/net/virtio_net.ko"])
            .unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        let expected: Vec<&str> = set.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, expected);
        // virtio_net's line lists all four dependencies, transitively.
        assert_eq!(dep.depends("kernel/drivers/net/virtio_net.ko").len(), 4);
    }

    #[test]
    fn modinfo_fields_and_names() {
        let ko = fake_module("kvm_amd", REL, &["kvm"]);
        let info = ModInfo::parse(&ko, "kvm-amd.ko").unwrap();
        assert_eq!(info.name.as_deref(), Some("kvm_amd"));
        assert_eq!(info.release(), Some(REL));
        assert_eq!(info.depends, ["kvm"]);
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz"), "kvm_amd");
        assert_eq!(module_name("virtio-rng"), "virtio_rng");
        assert!(matches!(
            ModInfo::parse(b"not elf", "x.ko"),
            Err(ModulesError::NotModule { .. })
        ));
    }
}
