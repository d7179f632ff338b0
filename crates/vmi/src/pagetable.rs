//! x86-64 guest page tables, walked from outside: 4-level (CR4.LA57 clear) and 5-level paging,
//! 1 GiB and 2 MiB pages. The tables are guest memory, so the guest controls them: every entry
//! is read through [`PhysMem`] (nothing outside guest RAM is ever touched), a walk takes at
//! most five reads, and every way a walk can end short is an error that names the level and
//! the entry.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest-physical memory as introspection reads it.
pub trait PhysMem {
    /// Fills `buf` from guest-physical address `gpa`; fails when any byte of it lies outside
    /// guest RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam>;
}

/// A read reached past guest RAM.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("guest-physical {gpa:#x}+{len} lies outside guest RAM")]
pub struct OutsideRam {
    pub gpa: u64,
    pub len: usize,
}

impl PhysMem for GuestMemoryMmap {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        self.read_slice(buf, GuestAddress(gpa))
            .map_err(|_| OutsideRam {
                gpa,
                len: buf.len(),
            })
    }
}

/// What the walk needs of a vCPU's control registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR3: the top-level table (bits 12..51; PCID and flag bits are ignored).
    pub cr3: u64,
    /// CR4.LA57: five levels, 57-bit virtual addresses.
    pub five_level: bool,
}

impl Paging {
    pub const CR4_LA57: u64 = 1 << 12;
    const CR0_PG: u64 = 1 << 31;
    const EFER_LMA: u64 = 1 << 10;

    /// The paging mode of a vCPU in long mode, from its CR0, CR3, CR4 and EFER; `None` when it
    /// is not in 64-bit paging yet (a guest early in its boot).
    pub fn from_registers(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Option<Self> {
        (cr0 & Self::CR0_PG != 0 && efer & Self::EFER_LMA != 0).then_some(Self {
            cr3,
            five_level: cr4 & Self::CR4_LA57 != 0,
        })
    }

    fn levels(&self) -> u32 {
        if self.five_level { 5 } else { 4 }
    }
}

/// Where a virtual address lands, and what the path to it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Writable at every level (R/W set throughout).
    pub writable: bool,
    /// Reachable from user mode (U/S set throughout).
    pub user: bool,
    /// Not executable (XD set at some level).
    pub no_execute: bool,
}

/// Why a virtual address has no translation.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum WalkError {
    #[error("{va:#x} is not a canonical {bits}-bit virtual address")]
    NonCanonical { va: u64, bits: u32 },
    #[error(
        "{va:#x} is not mapped: its level-{level} entry (at guest-physical {entry:#x}) is not present"
    )]
    NotPresent { va: u64, level: u32, entry: u64 },
    #[error(
        "the level-{level} table for {va:#x} is at guest-physical {table:#x}, outside guest RAM (page tables not set up, or corrupted)"
    )]
    TableOutsideRam { va: u64, level: u32, table: u64 },
    #[error(
        "{va:#x}: a large-page bit in a level-{level} entry ({entry_value:#x}), where x86-64 has none"
    )]
    BadLargePage {
        va: u64,
        level: u32,
        entry_value: u64,
    },
}

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const LARGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// Bits 12..51 of an entry: the next table's or the page's physical address.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Translates guest-virtual `va` under `paging`.
pub fn translate(mem: &dyn PhysMem, paging: Paging, va: u64) -> Result<Translation, WalkError> {
    let levels = paging.levels();
    let bits = 12 + 9 * levels;
    // Canonical: the bits above the top one repeat it.
    let top = (va as i64) >> (bits - 1);
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical { va, bits });
    }
    let mut table = paging.cr3 & ADDR;
    let (mut writable, mut user, mut no_execute) = (true, true, false);
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 0x1ff;
        let at = table + index * 8;
        let mut raw = [0u8; 8];
        mem.read_phys(at, &mut raw)
            .map_err(|_| WalkError::TableOutsideRam { va, level, table })?;
        let entry = u64::from_le_bytes(raw);
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                va,
                level,
                entry: at,
            });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        no_execute |= entry & NO_EXECUTE != 0;
        let large = level > 1 && entry & LARGE != 0;
        if large && level > 3 {
            return Err(WalkError::BadLargePage {
                va,
                level,
                entry_value: entry,
            });
        }
        if level == 1 || large {
            let page_size = 1u64 << shift;
            let base = entry & ADDR & !(page_size - 1);
            return Ok(Translation {
                gpa: base | (va & (page_size - 1)),
                page_size,
                writable,
                user,
                no_execute,
            });
        }
        table = entry & ADDR;
    }
    unreachable!("level 1 always ends the walk")
}

/// Why a virtual read failed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ReadError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{va:#x} maps to guest-physical {gpa:#x}, outside guest RAM")]
    PageOutsideRam { va: u64, gpa: u64 },
}

/// Fills `buf` from guest-virtual `va`, page by page (a read may cross pages that map
/// anywhere).
pub fn read_virt(
    mem: &dyn PhysMem,
    paging: Paging,
    va: u64,
    buf: &mut [u8],
) -> Result<(), ReadError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = va.wrapping_add(done as u64);
        let t = translate(mem, paging, at)?;
        let in_page = (t.page_size - (at & (t.page_size - 1))) as usize;
        let n = in_page.min(buf.len() - done);
        mem.read_phys(t.gpa, &mut buf[done..done + n])
            .map_err(|_| ReadError::PageOutsideRam { va: at, gpa: t.gpa })?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 16 << 20;

    /// Guest memory with page tables the test writes entry by entry.
    struct Tables {
        mem: GuestMemoryMmap,
        next: u64,
    }

    impl Tables {
        fn new() -> Self {
            Self {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap(),
                next: 0x10_0000,
            }
        }

        fn table(&mut self) -> u64 {
            let t = self.next;
            self.next += 0x1000;
            t
        }

        fn set(&self, table: u64, index: u64, value: u64) {
            self.mem
                .write_obj(value, GuestAddress(table + 8 * index))
                .unwrap();
        }

        /// Maps `va` to `gpa` with a page of `size` under a `levels`-level root, making the
        /// tables on the way; `flags` go on the leaf, intermediate entries get P|RW|US.
        fn map(&mut self, root: u64, levels: u32, va: u64, gpa: u64, size: u64, flags: u64) {
            let leaf_level = match size {
                0x1000 => 1,
                0x20_0000 => 2,
                0x4000_0000 => 3,
                _ => panic!("page size"),
            };
            let mut table = root;
            for level in (leaf_level..=levels).rev() {
                let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
                if level == leaf_level {
                    let large = if level > 1 { LARGE } else { 0 };
                    self.set(table, index, gpa | flags | large | PRESENT);
                    return;
                }
                let at = table + 8 * index;
                let e: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
                table = if e & PRESENT != 0 {
                    e & ADDR
                } else {
                    let t = self.table();
                    self.set(table, index, t | PRESENT | WRITABLE | USER);
                    t
                };
            }
        }
    }

    const KERNEL_VA: u64 = 0xffff_8880_0000_0000;

    #[test]
    fn four_level_walks_find_4k_2m_and_1g_pages_with_their_rights() {
        let mut t = Tables::new();
        let root = t.table();
        t.map(root, 4, KERNEL_VA + 0x1000, 0x5000, 0x1000, WRITABLE);
        t.map(
            root,
            4,
            KERNEL_VA + 0x40_0000,
            0x60_0000,
            0x20_0000,
            NO_EXECUTE,
        );
        t.map(
            root,
            4,
            0x0000_7f00_4000_0000,
            0x8000_0000,
            0x4000_0000,
            WRITABLE | USER,
        );
        let p = Paging {
            cr3: root | 0x18, // PWT|PCD bits in CR3 are not part of the address
            five_level: false,
        };
        let a = translate(&t.mem, p, KERNEL_VA + 0x1abc).unwrap();
        assert_eq!(
            a,
            Translation {
                gpa: 0x5abc,
                page_size: 0x1000,
                writable: true,
                user: false,
                no_execute: false
            }
        );
        let b = translate(&t.mem, p, KERNEL_VA + 0x40_0000 + 0x12_3456).unwrap();
        assert_eq!((b.gpa, b.page_size), (0x72_3456, 0x20_0000));
        assert!(b.no_execute && !b.writable);
        let c = translate(&t.mem, p, 0x0000_7f00_4000_0000 + 0x3fff_ffff).unwrap();
        assert_eq!((c.gpa, c.page_size), (0xbfff_ffff, 0x4000_0000));
        assert!(c.user && c.writable);
    }

    #[test]
    fn five_level_walks_use_the_extra_level_and_57_bit_addresses() {
        let mut t = Tables::new();
        let root = t.table();
        let va = 0xff11_0000_0000_2000; // canonical with 57 bits, not with 48
        t.map(root, 5, va, 0x7000, 0x1000, WRITABLE);
        let p5 = Paging {
            cr3: root,
            five_level: true,
        };
        assert_eq!(translate(&t.mem, p5, va + 8).unwrap().gpa, 0x7008);
        let p4 = Paging {
            cr3: root,
            five_level: false,
        };
        assert_eq!(
            translate(&t.mem, p4, va),
            Err(WalkError::NonCanonical { va, bits: 48 })
        );
    }

    #[test]
    fn walks_that_end_short_say_where() {
        let mut t = Tables::new();
        let root = t.table();
        t.map(root, 4, KERNEL_VA, 0x5000, 0x1000, 0);
        let p = Paging {
            cr3: root,
            five_level: false,
        };
        // The next page has a level-1 table but no entry.
        match translate(&t.mem, p, KERNEL_VA + 0x1000) {
            Err(WalkError::NotPresent { level: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A level-4 entry pointing outside RAM (a guest mid-boot, or a corrupted table).
        t.set(root, 5, 0x40_0000_0000 | PRESENT);
        match translate(&t.mem, p, 5 << 39) {
            Err(WalkError::TableOutsideRam {
                level: 3,
                table: 0x40_0000_0000,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // CR3 itself outside RAM.
        let wild = Paging {
            cr3: 0x7000_0000_0000,
            five_level: false,
        };
        assert!(matches!(
            translate(&t.mem, wild, KERNEL_VA),
            Err(WalkError::TableOutsideRam { level: 4, .. })
        ));
        // A "large page" at level 4 does not exist.
        t.set(root, 6, 0x20_0000 | PRESENT | LARGE);
        assert!(matches!(
            translate(&t.mem, p, 6 << 39),
            Err(WalkError::BadLargePage { level: 4, .. })
        ));
    }

    #[test]
    fn a_table_that_points_at_itself_ends_after_one_walk() {
        let mut t = Tables::new();
        let root = t.table();
        // Every entry of the root points back to the root: a hostile guest's loop. The walk
        // reads one entry per level and ends at level 1 with the root as the "page".
        for i in 0..512 {
            t.set(root, i, root | PRESENT | WRITABLE);
        }
        let p = Paging {
            cr3: root,
            five_level: false,
        };
        assert_eq!(translate(&t.mem, p, 0x1234).unwrap().gpa, root | 0x234);
    }

    #[test]
    fn virtual_reads_cross_pages_that_map_apart() {
        let mut t = Tables::new();
        let root = t.table();
        t.map(root, 4, KERNEL_VA, 0x9000, 0x1000, 0);
        t.map(root, 4, KERNEL_VA + 0x1000, 0x3000, 0x1000, 0);
        t.mem
            .write_slice(b"tail-of-first", GuestAddress(0x9ff3))
            .unwrap();
        t.mem.write_slice(b"+second", GuestAddress(0x3000)).unwrap();
        let p = Paging {
            cr3: root,
            five_level: false,
        };
        let mut buf = [0u8; 20];
        read_virt(&t.mem, p, KERNEL_VA + 0xff3, &mut buf).unwrap();
        assert_eq!(&buf, b"tail-of-first+second");
        // A read running into an unmapped page fails, naming the address it could not reach.
        let mut long = [0u8; 0x1010];
        match read_virt(&t.mem, p, KERNEL_VA + 0x1000, &mut long) {
            Err(ReadError::Walk(WalkError::NotPresent { va, .. })) => {
                assert_eq!(va, KERNEL_VA + 0x2000)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paging_mode_comes_from_the_control_registers() {
        let long = Paging::from_registers(1 << 31 | 1, 0x1000, Paging::CR4_LA57, 1 << 10 | 1 << 8);
        assert_eq!(
            long,
            Some(Paging {
                cr3: 0x1000,
                five_level: true
            })
        );
        // Paging off, or not in long mode yet: nothing to walk.
        assert_eq!(Paging::from_registers(1, 0x1000, 0, 0), None);
        assert_eq!(Paging::from_registers(1 << 31 | 1, 0x1000, 0, 0), None);
    }
}
