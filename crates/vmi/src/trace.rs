//! What a breakpoint on a kernel function shows, read from the vCPU that hit it: the process
//! that was running (the per-CPU `current_task` through the kernel's GS base) and, for the
//! functions it knows, what the call is about — for exec, the file name.

use crate::guest::GuestKernel;
use crate::layout::{EXEC_FUNCTIONS, ExecArg, KernelLayout};
use crate::pagetable::{Paging, PhysMem};
use crate::tasks::Reader;

/// The symbol `vmi trace` stops at when none is given: every exec of a program.
pub fn default_symbol(g: &GuestKernel<'_>) -> Option<&'static str> {
    EXEC_FUNCTIONS
        .into_iter()
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
    /// Where the file name is, for the exec functions (argument registers in the System V
    /// order rdi, rsi, rdx, rcx, r8, r9).
    pub exec_arg: Option<ExecArg>,
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
            exec_arg: EXEC_FUNCTIONS
                .iter()
                .position(|s| *s == symbol)
                .and_then(|i| g.layout.exec_args[i]),
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
        let name_at = match self.exec_arg {
            Some(ExecArg::Filename(i)) => Some(args[i % 6].wrapping_add(l.filename_name)),
            Some(ExecArg::Bprm(i)) => Some(args[i % 6].wrapping_add(l.bprm_filename)),
            None => None,
        };
        let detail = match name_at {
            Some(at) => {
                let name = r.u64(at).and_then(|p| r.string(p, 256));
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
        assert_eq!(d.exec_arg, Some(ExecArg::Filename(2)));
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
        // The 6.6+ prototype: the name through the `struct linux_binprm *` (first argument).
        let bprm = 0xffff_ffff_8127_1000u64;
        mem.write_obj(
            va(filename + 0x40),
            GuestAddress(pa(bprm + l.bprm_filename)),
        )
        .unwrap();
        let newer = Decoder {
            exec_arg: Some(ExecArg::Bprm(0)),
            ..d
        };
        assert_eq!(
            newer
                .decode(&mem, va(percpu), [va(bprm), 0, 0, 0, 0, 0])
                .detail,
            "/bin/ls"
        );
        let generic = Decoder {
            exec_arg: None,
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
