//! What a breakpoint on a kernel function shows, read from the vCPU that hit it: the process
//! that was running (the per-CPU `current_task` through the kernel's GS base) and, for the
//! functions it knows, what the call is about — for exec, the file name.

use crate::guest::GuestKernel;
use crate::layout::KernelLayout;
use crate::pagetable::{Paging, PhysMem};
use crate::tasks::Reader;

/// Functions whose arguments the tracer decodes: (symbol, index of the `struct filename *`
/// argument in the System V order rdi, rsi, rdx, rcx, r8, r9).
pub const FILENAME_ARGS: &[(&str, usize)] = &[("bprm_execve", 2), ("do_execveat_common", 1)];

/// The symbol `vmi trace` stops at when none is given: every exec of a program.
pub fn default_symbol(g: &GuestKernel<'_>) -> Option<&'static str> {
    FILENAME_ARGS
        .iter()
        .map(|&(s, _)| s)
        .find(|s| g.kernel.addr(s).is_ok())
}

/// Everything a vCPU needs to decode a hit without the rest of the profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoder {
    /// The kernel's own page tables.
    pub paging: Paging,
    pub layout: KernelLayout,
    /// Offset of `current_task` in the per-CPU area (`pcpu_hot.current_task` from Linux 6.2).
    pub current_task: u64,
    /// Which argument register holds a `struct filename *`, for the functions that take one.
    pub filename_arg: Option<usize>,
}

/// One hit, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The running process (thread-group id) and its name; 0 and "" when unreadable.
    pub pid: i32,
    pub comm: String,
    /// What the call is about (the file name for exec), or the first three arguments.
    pub detail: String,
}

impl Decoder {
    /// A decoder for breakpoints on `symbol` in the kernel `g`.
    pub fn new(g: &GuestKernel<'_>, symbol: &str) -> Result<Self, crate::symbols::SymbolError> {
        // Per-CPU symbols are offsets into each CPU's area: KASLR does not move them.
        let current_task = match g.kernel.map.addr("current_task") {
            Ok(off) => off,
            Err(_) => g.kernel.map.addr("pcpu_hot")?,
        };
        Ok(Self {
            paging: g.reader.paging,
            layout: *g.layout,
            current_task,
            filename_arg: FILENAME_ARGS
                .iter()
                .find(|(s, _)| *s == symbol)
                .map(|&(_, i)| i),
        })
    }

    /// Decodes a hit on a vCPU whose kernel GS base is `gs_base` and whose argument registers
    /// are `args` (rdi, rsi, rdx, rcx, r8, r9). Everything read is the guest's: an unreadable
    /// pointer gives an empty field, never an error.
    pub fn decode(&self, mem: &dyn PhysMem, gs_base: u64, args: [u64; 6]) -> Hit {
        let r = Reader {
            mem,
            paging: self.paging,
        };
        let l = &self.layout;
        let task = r.u64(gs_base.wrapping_add(self.current_task)).ok();
        let pid = task
            .and_then(|t| r.u32(t.wrapping_add(l.task_tgid)).ok())
            .map_or(0, |p| p as i32);
        let comm = task
            .and_then(|t| r.string(t.wrapping_add(l.task_comm), l.task_comm_len).ok())
            .unwrap_or_default();
        let detail = match self.filename_arg {
            Some(i) => {
                let name = r
                    .u64(args[i].wrapping_add(l.filename_name))
                    .and_then(|p| r.string(p, 256));
                match name {
                    Ok(n) => n,
                    Err(e) => format!("<file name unreadable: {e}>"),
                }
            }
            None => format!("args {:#x} {:#x} {:#x}", args[0], args[1], args[2]),
        };
        Hit { pid, comm, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::tests::{guest, pa, profile, va};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn an_exec_hit_names_the_process_and_the_file() {
        let (mem, cpu) = guest();
        let p = profile();
        let g = GuestKernel::attach(&p, &mem, &cpu).unwrap();
        let mut d = Decoder::new(&g, "bprm_execve").unwrap();
        assert_eq!(d.filename_arg, Some(2));
        // A per-CPU area at (run-time) 0xffffffff85260000 whose current_task is init_task,
        // and a struct filename naming /bin/ls.
        d.current_task = 0x100;
        let percpu = 0xffff_ffff_8126_0000u64;
        let task = 0xffff_ffff_8121_0000u64;
        mem.write_obj(va(task), GuestAddress(pa(percpu + 0x100)))
            .unwrap();
        let filename = 0xffff_ffff_8127_0000u64;
        let l = &p.layout;
        mem.write_obj(
            va(filename + 0x40),
            GuestAddress(pa(filename + l.filename_name)),
        )
        .unwrap();
        mem.write_slice(b"/bin/ls\0", GuestAddress(pa(filename + 0x40)))
            .unwrap();
        let hit = d.decode(&mem, va(percpu), [0, 0, va(filename), 0, 0, 0]);
        assert_eq!(
            hit,
            Hit {
                pid: 0,
                comm: "swapper/0".into(),
                detail: "/bin/ls".into()
            }
        );
        // A hostile pointer: the hit is still recorded, its file name marked unreadable.
        let bad = d.decode(&mem, va(percpu), [0, 0, 0xdead_0000, 0, 0, 0]);
        assert!(bad.detail.starts_with("<file name unreadable"), "{bad:?}");
        let generic = Decoder {
            filename_arg: None,
            ..d
        };
        assert!(
            generic
                .decode(&mem, 0, [1, 2, 3, 4, 5, 6])
                .detail
                .starts_with("args 0x1 0x2 0x3")
        );
    }
}
