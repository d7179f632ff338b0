//! The guest's loaded modules, read from outside: the kernel's `modules` list (a `list_head`
//! through every `struct module`), each module's name, state and where its code sits. A module
//! that unlinks itself from this list is gone from `lsmod` and from this view alike; what finds
//! it is an integrity check or a cross-view, not this walk.

use crate::layout::KernelLayout;
use crate::pagetable::ReadError;
use crate::tasks::{Listing, Reader, read_each, walk_list};

/// Most modules a walk visits (a Debian guest loads tens).
pub const MAX_MODULES: usize = 4096;

/// One loaded module as the guest kernel records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    /// `module_state`: 0 live, 1 coming (being initialised), 2 going (being unloaded), 3 unformed.
    pub state: u32,
    /// Guest-virtual address and size of the module's code.
    pub base: u64,
    pub size: u32,
    /// The `struct module`'s guest-virtual address.
    pub module: u64,
}

impl Module {
    /// Whether guest-virtual `addr` lies in this module's code.
    pub fn holds(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.base) < u64::from(self.size)
    }

    /// `module_state` in words.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            0 => "live",
            1 => "coming",
            2 => "going",
            3 => "unformed",
            _ => "invalid",
        }
    }
}

/// Every module on the list whose head is the run-time address of the `modules` symbol.
pub fn modules(r: &Reader<'_>, l: &KernelLayout, head: u64) -> Listing<Module> {
    let (links, broken) = walk_list(r, head, l.list_next, MAX_MODULES);
    let mods = links
        .into_iter()
        .map(|link| link.wrapping_sub(l.module_list));
    read_each(mods, "module", broken, |m| module(r, l, m))
}

fn module(r: &Reader<'_>, l: &KernelLayout, m: u64) -> Result<Module, ReadError> {
    let at = |off: u64| m.wrapping_add(off);
    Ok(Module {
        name: r.string(at(l.module_name), l.module_name_len)?,
        state: r.u32(at(l.module_state))?,
        base: r.u64(at(l.module_base))?,
        size: r.u32(at(l.module_size))?,
        module: m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::layout;
    use crate::pagetable::Paging;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const BASE: u64 = 0xffff_8880_0000_0000;

    /// 2 MiB of guest memory mapped at `BASE` by one 2 MiB page.
    fn guest() -> (GuestMemoryMmap, Paging) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (l4, l3, l2) = (0x20_0000u64, 0x20_1000u64, 0x20_2000u64);
        let idx = |level: u32| (BASE >> (12 + 9 * (level - 1))) & 0x1ff;
        mem.write_obj(l3 | 3, GuestAddress(l4 + 8 * idx(4)))
            .unwrap();
        mem.write_obj(l2 | 3, GuestAddress(l3 + 8 * idx(3)))
            .unwrap();
        mem.write_obj(0x83u64, GuestAddress(l2 + 8 * idx(2)))
            .unwrap();
        let paging = Paging {
            cr3: l4,
            five_level: false,
        };
        (mem, paging)
    }

    fn module_at(mem: &GuestMemoryMmap, pa: u64, name: &str, state: u32, next: u64) {
        let l = layout();
        mem.write_obj(state, GuestAddress(pa + l.module_state))
            .unwrap();
        mem.write_obj(next, GuestAddress(pa + l.module_list))
            .unwrap();
        mem.write_slice(name.as_bytes(), GuestAddress(pa + l.module_name))
            .unwrap();
        mem.write_obj(
            0xffff_ffff_c000_0000u64 + pa,
            GuestAddress(pa + l.module_base),
        )
        .unwrap();
        mem.write_obj(0x3000u32, GuestAddress(pa + l.module_size))
            .unwrap();
    }

    #[test]
    fn the_module_list_gives_names_states_and_code_ranges() {
        let (mem, paging) = guest();
        let l = layout();
        let head = BASE + 0x100;
        let (a, b) = (0x1000u64, 0x2000u64);
        mem.write_obj(BASE + a + l.module_list, GuestAddress(0x100))
            .unwrap();
        module_at(&mem, a, "virtio_blk", 0, BASE + b + l.module_list);
        module_at(&mem, b, "ext4", 1, head);
        let r = Reader { mem: &mem, paging };
        let list = modules(&r, &l, head);
        assert_eq!(list.broken, None);
        let rows: Vec<_> = list
            .items
            .iter()
            .map(|m| (m.name.as_str(), m.state_name(), m.base, m.size, m.module))
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "virtio_blk",
                    "live",
                    0xffff_ffff_c000_1000,
                    0x3000,
                    BASE + a
                ),
                ("ext4", "coming", 0xffff_ffff_c000_2000, 0x3000, BASE + b),
            ]
        );
        // The second module's link points into nowhere: the first one stays, the reason is given.
        module_at(&mem, b, "ext4", 1, 0xffff_9999_0000_0000);
        let list = modules(&r, &l, head);
        assert_eq!(list.items.len(), 2);
        assert!(list.broken.unwrap().contains("cannot be read"));
        // An empty list: the head points at itself.
        mem.write_obj(head, GuestAddress(0x100)).unwrap();
        let empty = modules(&r, &l, head);
        assert!(empty.items.is_empty() && empty.broken.is_none());
    }
}
