//! The guest's process list, read from outside: the kernel's task list (`init_task.tasks`,
//! a circular `list_head` through every thread-group leader), each task's pid, parent, name,
//! credentials, state and start time at the offsets its BTF gives. The list is guest memory:
//! a loop, a pointer into nowhere or an endless list ends the walk with what was read so far
//! and the reason, never a hang.

use std::collections::HashSet;

use crate::layout::KernelLayout;
use crate::pagetable::{Paging, PhysMem, ReadError, read_virt};

/// Most tasks a walk visits (Linux's default pid_max is 4 194 304 on 64-bit, but a list that
/// long is far past what a micro-VM runs; a walk that reaches this reports it).
pub const MAX_TASKS: usize = 1 << 16;

/// One process as the guest kernel records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    /// `comm`: the executable's name, at most 15 bytes.
    pub comm: String,
    pub uid: u32,
    /// `__state` (0 runnable, 1 interruptible sleep, 2 uninterruptible, ...).
    pub state: u32,
    /// Monotonic nanoseconds at fork.
    pub start_time_ns: u64,
    /// No user address space (`mm` is NULL).
    pub kernel_thread: bool,
    /// The task_struct's guest-virtual address.
    pub task: u64,
}

/// A walk's result: what it read, and why it stopped early if it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing<T> {
    pub items: Vec<T>,
    /// `None`: the list closed back on its head, complete.
    pub broken: Option<String>,
}

/// Reads guest-virtual memory through one vCPU's page tables.
pub struct Reader<'a> {
    pub mem: &'a dyn PhysMem,
    pub paging: Paging,
}

impl Reader<'_> {
    pub fn bytes(&self, va: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        read_virt(self.mem, self.paging, va, buf)
    }

    pub fn u64(&self, va: u64) -> Result<u64, ReadError> {
        let mut b = [0u8; 8];
        self.bytes(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, va: u64) -> Result<u32, ReadError> {
        let mut b = [0u8; 4];
        self.bytes(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes (lossy UTF-8).
    pub fn string(&self, va: u64, max: u64) -> Result<String, ReadError> {
        let mut b = vec![0u8; max as usize];
        self.bytes(va, &mut b)?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Ok(String::from_utf8_lossy(&b[..end]).into_owned())
    }
}

/// Walks the circular list whose head is at `head` (a `list_head`'s address), returning the
/// address of every entry's `list_head` in order. Stops at the head, at a loop that does not
/// pass through it, at an unreadable link, or after `max` entries.
pub fn walk_list(
    r: &Reader<'_>,
    head: u64,
    next_offset: u64,
    max: usize,
) -> (Vec<u64>, Option<String>) {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut at = head;
    loop {
        let next = match r.u64(at.wrapping_add(next_offset)) {
            Ok(n) => n,
            Err(e) => {
                return (
                    out,
                    Some(format!("the link at {at:#x} cannot be read: {e}")),
                );
            }
        };
        if next == head {
            return (out, None);
        }
        if !seen.insert(next) {
            return (
                out,
                Some(format!(
                    "the list loops back to {next:#x} without returning to its head"
                )),
            );
        }
        if out.len() == max {
            return (out, Some(format!("more than {max} entries: stopped")));
        }
        out.push(next);
        at = next;
    }
}

/// The process list: `init_task` (pid 0, the idle task) and every task on its `tasks` list.
/// `init_task` is the run-time address of the `init_task` symbol.
pub fn processes(r: &Reader<'_>, l: &KernelLayout, init_task: u64) -> Listing<Process> {
    let head = init_task.wrapping_add(l.task_tasks);
    let (links, broken) = walk_list(r, head, l.list_next, MAX_TASKS);
    let tasks =
        std::iter::once(init_task).chain(links.iter().map(|a| a.wrapping_sub(l.task_tasks)));
    read_each(tasks, "task", broken, |t| process(r, l, t))
}

/// Reads the structure at each address in turn, stopping at the first that cannot be read;
/// `broken` is why the list walk itself stopped early, if it did.
pub(crate) fn read_each<T>(
    addrs: impl Iterator<Item = u64>,
    what: &str,
    mut broken: Option<String>,
    read: impl Fn(u64) -> Result<T, ReadError>,
) -> Listing<T> {
    let mut items = Vec::new();
    for a in addrs {
        match read(a) {
            Ok(x) => items.push(x),
            Err(e) => {
                broken.get_or_insert(format!("{what} {a:#x} cannot be read: {e}"));
                break;
            }
        }
    }
    Listing { items, broken }
}

fn process(r: &Reader<'_>, l: &KernelLayout, task: u64) -> Result<Process, ReadError> {
    let at = |off: u64| task.wrapping_add(off);
    let parent = r.u64(at(l.task_real_parent))?;
    let ppid = if parent == task || parent == 0 {
        0
    } else {
        r.u32(parent.wrapping_add(l.task_tgid))? as i32
    };
    let cred = r.u64(at(l.task_cred))?;
    Ok(Process {
        pid: r.u32(at(l.task_tgid))? as i32,
        ppid,
        comm: r.string(at(l.task_comm), l.task_comm_len)?,
        uid: r.u32(cred.wrapping_add(l.cred_uid))?,
        state: r.u32(at(l.task_state))?,
        start_time_ns: r.u64(at(l.task_start_time))?,
        kernel_thread: r.u64(at(l.task_mm))? == 0,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::layout;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const BASE: u64 = 0xffff_8880_0000_0000;
    const MEM: u64 = 8 << 20;

    /// Guest memory whose first 4 MiB are mapped at `BASE` (two 2 MiB pages).
    fn guest() -> (GuestMemoryMmap, Paging) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let (l4, l3, l2) = (0x40_0000u64, 0x40_1000u64, 0x40_2000u64);
        let idx = |va: u64, level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
        mem.write_obj(l3 | 3, GuestAddress(l4 + 8 * idx(BASE, 4)))
            .unwrap();
        mem.write_obj(l2 | 3, GuestAddress(l3 + 8 * idx(BASE, 3)))
            .unwrap();
        for i in 0..2u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(l2 + 8 * (idx(BASE, 2) + i)))
                .unwrap();
        }
        (
            mem,
            Paging {
                cr3: l4,
                five_level: false,
            },
        )
    }

    /// Writes a task at guest-physical `pa` (virtual `BASE + pa`).
    #[allow(clippy::too_many_arguments)]
    fn task(
        mem: &GuestMemoryMmap,
        pa: u64,
        pid: u32,
        parent: u64,
        comm: &str,
        uid: u32,
        mm: u64,
        next: u64,
    ) {
        let l = layout();
        let w64 = |off: u64, v: u64| mem.write_obj(v, GuestAddress(pa + off)).unwrap();
        let w32 = |off: u64, v: u32| mem.write_obj(v, GuestAddress(pa + off)).unwrap();
        w32(l.task_pid, pid);
        w32(l.task_tgid, pid);
        w32(l.task_state, 1);
        w64(l.task_real_parent, parent);
        let cred = pa + 0x800;
        w64(l.task_cred, BASE + cred);
        mem.write_obj(uid, GuestAddress(cred + l.cred_uid)).unwrap();
        w64(l.task_start_time, u64::from(pid) * 1000);
        w64(l.task_mm, mm);
        w64(l.task_tasks, next);
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        mem.write_slice(&c, GuestAddress(pa + l.task_comm)).unwrap();
    }

    fn tasks_of(pa: u64) -> u64 {
        BASE + pa + layout().task_tasks
    }

    #[test]
    fn a_closed_task_list_gives_every_process_with_its_parent_and_owner() {
        let (mem, paging) = guest();
        let (t0, t1, t2) = (0x1000, 0x3000, 0x5000);
        task(&mem, t0, 0, BASE + t0, "swapper/0", 0, 0, tasks_of(t1));
        task(&mem, t1, 1, BASE + t0, "init", 0, 0xdead_0000, tasks_of(t2));
        task(
            &mem,
            t2,
            42,
            BASE + t1,
            "sshd",
            1000,
            0xbeef_0000,
            tasks_of(t0),
        );
        let r = Reader { mem: &mem, paging };
        let list = processes(&r, &layout(), BASE + t0);
        assert_eq!(list.broken, None);
        let rows: Vec<_> = list
            .items
            .iter()
            .map(|p| (p.pid, p.ppid, p.comm.as_str(), p.uid, p.kernel_thread))
            .collect();
        assert_eq!(
            rows,
            [
                (0, 0, "swapper/0", 0, true),
                (1, 0, "init", 0, false),
                (42, 1, "sshd", 1000, false)
            ]
        );
        assert_eq!(list.items[2].start_time_ns, 42_000);
        assert_eq!(list.items[2].task, BASE + t2);
    }

    #[test]
    fn a_hostile_task_list_ends_the_walk_with_a_reason_not_a_hang() {
        let (mem, paging) = guest();
        let r = Reader { mem: &mem, paging };
        let (t0, t1, t2) = (0x1000, 0x3000, 0x5000);
        // t2 points back at t1: a loop that never returns to the head.
        task(&mem, t0, 0, BASE + t0, "swapper/0", 0, 0, tasks_of(t1));
        task(&mem, t1, 1, BASE + t0, "init", 0, 1, tasks_of(t2));
        task(&mem, t2, 2, BASE + t1, "kthreadd", 0, 0, tasks_of(t1));
        let list = processes(&r, &layout(), BASE + t0);
        assert_eq!(list.items.len(), 3);
        assert!(list.broken.unwrap().contains("loops"));
        // A link into unmapped memory.
        task(
            &mem,
            t2,
            2,
            BASE + t1,
            "kthreadd",
            0,
            0,
            0xffff_9999_0000_0000,
        );
        let list = processes(&r, &layout(), BASE + t0);
        assert_eq!(list.items.len(), 3);
        assert!(list.broken.unwrap().contains("cannot be read"));
        // A task whose credentials point nowhere: the walk keeps what it read before it.
        task(&mem, t2, 2, BASE + t1, "kthreadd", 0, 0, tasks_of(t0));
        mem.write_obj(
            0xffff_9999_0000_0000u64,
            GuestAddress(t2 + layout().task_cred),
        )
        .unwrap();
        let list = processes(&r, &layout(), BASE + t0);
        assert_eq!(list.items.len(), 2);
        assert!(list.broken.unwrap().contains(&format!("{:#x}", BASE + t2)));
    }

    #[test]
    fn an_endless_list_stops_at_the_bound() {
        let (mem, paging) = guest();
        let r = Reader { mem: &mem, paging };
        // 100 entries chained one after the other, the last back to the head.
        let head = BASE + 0x1000;
        let entry = |i: u64| BASE + 0x2000 + 16 * i;
        mem.write_obj(entry(0), GuestAddress(0x1000)).unwrap();
        for i in 0..100 {
            let next = if i == 99 { head } else { entry(i + 1) };
            mem.write_obj(next, GuestAddress(0x2000 + 16 * i)).unwrap();
        }
        let (all, broken) = walk_list(&r, head, 0, 1000);
        assert_eq!((all.len(), broken), (100, None));
        let (some, broken) = walk_list(&r, head, 0, 10);
        assert_eq!(some.len(), 10);
        assert!(broken.unwrap().contains("more than 10"));
    }
}
