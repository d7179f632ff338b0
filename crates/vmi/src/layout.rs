//! Structure layouts from the guest kernel's own BTF (the `.BTF` section of the vmlinux that
//! `bulwark image` ships; Debian builds its kernels with `CONFIG_DEBUG_INFO_BTF`), so that no
//! profile has to be made by hand for a kernel: the offsets introspection needs are looked up
//! by name in the kernel they describe.

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{0}: not an ELF file (give the image's vmlinux, not the bzImage)")]
    NotElf(String),
    #[error(
        "the vmlinux has no .BTF section: its kernel was built without CONFIG_DEBUG_INFO_BTF (Debian's cloud kernels have it)"
    )]
    NoBtf,
    #[error("the BTF data is malformed or truncated: {0}")]
    BadBtf(String),
    #[error(
        "the kernel's BTF has no type `{0}`: this kernel's layout is not one introspection knows"
    )]
    NoType(String),
    #[error("the kernel's `{ty}` has no member `{path}` (this kernel's layout differs): {why}")]
    NoMember {
        ty: String,
        path: String,
        why: String,
    },
    #[error("`{ty}.{path}` is a bit-field; introspection reads whole bytes")]
    BitField { ty: String, path: String },
}

/// A kernel's BTF, parsed.
pub struct Btf {
    info: TypeInformation,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Btf({} types)", self.info.get().len())
    }
}

/// Raw BTF bytes, for the parser.
struct Bytes<'a>(&'a [u8]);

impl Readable for Bytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| self.0.get(s..s.checked_add(buffer.len())?))
            .ok_or_else(|| {
                btfparse::Error::new(
                    btfparse::ErrorKind::IOError,
                    "read past the end of the BTF data",
                )
            })?;
        buffer.copy_from_slice(src);
        Ok(())
    }
}

impl Btf {
    /// Parses raw BTF (a `.BTF` section, or `/sys/kernel/btf/vmlinux`).
    pub fn parse(raw: &[u8]) -> Result<Self, LayoutError> {
        let info =
            TypeInformation::new(&Bytes(raw)).map_err(|e| LayoutError::BadBtf(format!("{e:?}")))?;
        Ok(Self { info })
    }

    /// The BTF of an ELF vmlinux.
    pub fn from_vmlinux(elf: &[u8]) -> Result<Self, LayoutError> {
        let elf =
            bulwark_image::elf::Elf::parse(elf).map_err(|e| LayoutError::NotElf(e.to_string()))?;
        let raw = elf
            .section(".BTF")
            .map_err(|e| LayoutError::NotElf(e.to_string()))?
            .ok_or(LayoutError::NoBtf)?;
        Self::parse(raw)
    }

    fn id(&self, ty: &str) -> Result<u32, LayoutError> {
        self.info
            .id_of(ty)
            .ok_or_else(|| LayoutError::NoType(ty.to_owned()))
    }

    /// Member `path` of `ty`: its type id and offset.
    fn member(&self, ty: &str, path: &str) -> Result<(u32, Offset), LayoutError> {
        self.info
            .offset_of(self.id(ty)?, path)
            .map_err(|e| LayoutError::NoMember {
                ty: ty.to_owned(),
                path: path.to_owned(),
                why: format!("{e:?}"),
            })
    }

    /// The byte offset of member `path` (`a.b.c`, through nested structures and unions) in
    /// structure `ty`.
    pub fn offset(&self, ty: &str, path: &str) -> Result<u64, LayoutError> {
        match self.member(ty, path)?.1 {
            Offset::ByteOffset(b) => Ok(u64::from(b)),
            Offset::BitOffsetAndSize(bits, _) if bits % 8 == 0 => Ok(u64::from(bits / 8)),
            Offset::BitOffsetAndSize(..) => Err(LayoutError::BitField {
                ty: ty.to_owned(),
                path: path.to_owned(),
            }),
        }
    }

    /// The size in bytes of member `path` of `ty`.
    pub fn member_size(&self, ty: &str, path: &str) -> Result<u64, LayoutError> {
        let (tid, _) = self.member(ty, path)?;
        self.info
            .size_of(tid)
            .map(|s| s as u64)
            .map_err(|e| LayoutError::BadBtf(format!("size of {ty}.{path}: {e:?}")))
    }

    /// The size in bytes of type `ty`.
    pub fn size(&self, ty: &str) -> Result<u64, LayoutError> {
        self.info
            .size_of(self.id(ty)?)
            .map(|s| s as u64)
            .map_err(|e| LayoutError::BadBtf(format!("size of {ty}: {e:?}")))
    }

    /// The parameters of kernel function `func` from its BTF prototype, in order: each one's
    /// name and, for a pointer to a structure, that structure's name.
    pub fn params(&self, func: &str) -> Result<Vec<Param>, LayoutError> {
        let proto = match self.info.from_id(self.id(func)?) {
            Some(TypeVariant::Func(f)) => *f.prototype_tid(),
            _ => return Err(LayoutError::NoType(format!("function {func}"))),
        };
        let Some(TypeVariant::FuncProto(p)) = self.info.from_id(proto) else {
            return Err(LayoutError::BadBtf(format!("{func} has no prototype")));
        };
        Ok(p.parameter_list()
            .iter()
            .map(|a| Param {
                name: a.name().unwrap_or_default(),
                pointee: self
                    .info
                    .pointee_tid(a.tid())
                    .ok()
                    .and_then(|t| self.struct_name(t)),
            })
            .collect())
    }

    /// The name of structure `tid`, through typedefs and qualifiers.
    fn struct_name(&self, tid: u32) -> Option<String> {
        match self.info.from_id(tid)? {
            TypeVariant::Struct(_) => self.info.name_of(tid),
            TypeVariant::Typedef(t) => self.struct_name(*t.tid()),
            TypeVariant::Const(t) => self.struct_name(*t.tid()),
            TypeVariant::Volatile(t) => self.struct_name(*t.tid()),
            _ => None,
        }
    }

    /// The first of `paths` that `ty` has (members renamed between kernel versions).
    fn offset_any(&self, ty: &str, paths: &[&str]) -> Result<u64, LayoutError> {
        let mut last = None;
        for p in paths {
            match self.offset(ty, p) {
                Ok(o) => return Ok(o),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LayoutError::NoType(ty.to_owned())))
    }
}

/// One parameter of a kernel function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    /// The structure it points to, for a pointer to a structure.
    pub pointee: Option<String>,
}

/// The kernel functions on the exec path a breakpoint decodes (the file name of every exec).
pub const EXEC_FUNCTIONS: [&str; 2] = ["bprm_execve", "do_execveat_common"];

/// Where an exec function's argument registers hold the file name, per its BTF prototype
/// (which changed: `bprm_execve` took a `struct filename *` up to Linux 6.5 and only the
/// `struct linux_binprm *` since).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecArg {
    /// Argument N is a `struct filename *` (its `name`).
    Filename(usize),
    /// Argument N is a `struct linux_binprm *` (its `filename`).
    Bprm(usize),
}

impl ExecArg {
    /// From a prototype: the first `struct filename *` argument, else the first
    /// `struct linux_binprm *`, within the six argument registers.
    pub fn find(params: &[Param]) -> Option<Self> {
        let at = |ty: &str| {
            params
                .iter()
                .take(6)
                .position(|p| p.pointee.as_deref() == Some(ty))
        };
        at("filename")
            .map(Self::Filename)
            .or_else(|| at("linux_binprm").map(Self::Bprm))
    }
}

/// Where the members introspection reads sit in a kernel's structures (byte offsets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `task_struct.tasks` (the `list_head` linking every process).
    pub task_tasks: u64,
    pub task_pid: u64,
    pub task_tgid: u64,
    /// `task_struct.comm` and its length (TASK_COMM_LEN).
    pub task_comm: u64,
    pub task_comm_len: u64,
    pub task_real_parent: u64,
    /// `task_struct.real_cred` (the objective credentials).
    pub task_cred: u64,
    /// `task_struct.__state` (`state` before Linux 5.14).
    pub task_state: u64,
    /// `task_struct.start_time` (ns of monotonic time at fork).
    pub task_start_time: u64,
    /// `task_struct.mm` (NULL for kernel threads).
    pub task_mm: u64,
    /// `cred.uid` (a `kuid_t`: one u32).
    pub cred_uid: u64,
    /// `module.list` (linking the loaded modules from the `modules` list head).
    pub module_list: u64,
    pub module_name: u64,
    pub module_name_len: u64,
    pub module_state: u64,
    /// Where a module's code sits: `module.core_layout.base` and `.size` (Linux 6.1 to 6.3), or
    /// `module.mem[MOD_TEXT].base` and `.size` (6.4 on).
    pub module_base: u64,
    pub module_size: u64,
    /// `list_head.next`.
    pub list_next: u64,
    /// The sysfs side of modules (`/sys/module`): `kset.list` links `kobject.entry`; a loaded
    /// module's `module_kobject` (whose first member is its kobject) points back at it through
    /// `.mod` (built-in modules have none).
    pub kset_list: u64,
    pub kobject_entry: u64,
    pub kobject_name: u64,
    pub module_kobject_mod: u64,
    /// `filename.name` (the path a `struct filename` carries, for exec tracing).
    pub filename_name: u64,
    /// `linux_binprm.filename` (the path being exec'd).
    pub bprm_filename: u64,
    /// For each of [`EXEC_FUNCTIONS`]: where its file name is, when the kernel's BTF has its
    /// prototype.
    pub exec_args: [Option<ExecArg>; 2],
}

impl KernelLayout {
    /// Looks every member up in `btf`; the first one missing names itself.
    pub fn from_btf(btf: &Btf) -> Result<Self, LayoutError> {
        let t = "task_struct";
        let (module_base, module_size) = match (
            btf.offset("module", "core_layout.base"),
            btf.offset("module", "core_layout.size"),
        ) {
            (Ok(b), Ok(s)) => (b, s),
            (Err(e), _) | (_, Err(e)) => {
                // MOD_TEXT is the first of `mem`'s module_memory entries.
                let mem = btf.offset("module", "mem").map_err(|_| e)?;
                (
                    mem + btf.offset("module_memory", "base")?,
                    mem + btf.offset("module_memory", "size")?,
                )
            }
        };
        Ok(Self {
            task_tasks: btf.offset(t, "tasks")?,
            task_pid: btf.offset(t, "pid")?,
            task_tgid: btf.offset(t, "tgid")?,
            task_comm: btf.offset(t, "comm")?,
            task_comm_len: btf.member_size(t, "comm")?,
            task_real_parent: btf.offset(t, "real_parent")?,
            task_cred: btf.offset(t, "real_cred")?,
            task_state: btf.offset_any(t, &["__state", "state"])?,
            task_start_time: btf.offset(t, "start_time")?,
            task_mm: btf.offset(t, "mm")?,
            cred_uid: btf.offset("cred", "uid")?,
            module_list: btf.offset("module", "list")?,
            module_name: btf.offset("module", "name")?,
            module_name_len: btf.member_size("module", "name")?,
            module_state: btf.offset("module", "state")?,
            module_base,
            module_size,
            list_next: btf.offset("list_head", "next")?,
            kset_list: btf.offset("kset", "list")?,
            kobject_entry: btf.offset("kobject", "entry")?,
            kobject_name: btf.offset("kobject", "name")?,
            module_kobject_mod: btf.offset("module_kobject", "mod")?,
            filename_name: btf.offset("filename", "name")?,
            bprm_filename: btf.offset("linux_binprm", "filename")?,
            exec_args: EXEC_FUNCTIONS.map(|f| btf.params(f).ok().and_then(|p| ExecArg::find(&p))),
        })
    }
}
