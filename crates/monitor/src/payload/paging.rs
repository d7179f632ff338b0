//! Builds x86-64 4-level identity page tables in a byte image that is then copied into guest
//! memory. Built on the host, tested on the host: the guest only ever sees the finished tables.

use super::layout::{LARGE_PAGE, PAGE};

pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_USER: u64 = 1 << 2;
pub const PTE_PWT: u64 = 1 << 3;
pub const PTE_PCD: u64 = 1 << 4;
pub const PTE_LARGE: u64 = 1 << 7;
pub const PTE_NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub user: bool,
    pub write: bool,
    pub exec: bool,
    pub uncached: bool,
}

impl Access {
    pub const SUPERVISOR_RO: Self = Self::new(false, false, false);
    pub const SUPERVISOR_RW: Self = Self::new(false, true, false);
    pub const SUPERVISOR_RX: Self = Self::new(false, false, true);
    pub const USER_RO: Self = Self::new(true, false, false);
    pub const USER_RW: Self = Self::new(true, true, false);
    pub const USER_RWX: Self = Self::new(true, true, true);

    const fn new(user: bool, write: bool, exec: bool) -> Self {
        Self {
            user,
            write,
            exec,
            uncached: false,
        }
    }

    pub const fn uncached(mut self) -> Self {
        self.uncached = true;
        self
    }

    fn bits(self) -> u64 {
        let mut b = PTE_PRESENT;
        if self.user {
            b |= PTE_USER;
        }
        if self.write {
            b |= PTE_WRITABLE;
        }
        if !self.exec {
            b |= PTE_NX;
        }
        if self.uncached {
            b |= PTE_PCD | PTE_PWT;
        }
        b
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    #[error("page tables need more than {0} pages; this is a layout bug, please report it")]
    OutOfTables(usize),
    #[error("mapping at {0:#x} is not aligned to its page size")]
    Unaligned(u64),
    #[error("address {0:#x} is already mapped")]
    AlreadyMapped(u64),
}

/// Page tables under construction. Table 0 is the PML4.
#[derive(Debug)]
pub struct PageTables {
    base: u64,
    max_tables: usize,
    tables: Vec<[u64; 512]>,
}

impl PageTables {
    /// Tables that will live at guest-physical `base`, at most `max_tables` pages of them.
    pub fn new(base: u64, max_tables: usize) -> Self {
        Self {
            base,
            max_tables,
            tables: vec![[0; 512]],
        }
    }

    /// Guest-physical address of the PML4 (the value for CR3).
    pub fn root(&self) -> u64 {
        self.base
    }

    fn index(addr: u64, level: u32) -> usize {
        ((addr >> (12 + 9 * level)) & 0x1ff) as usize
    }

    /// The table the entry at `(table, idx)` points to, created if absent.
    fn next_table(&mut self, table: usize, idx: usize) -> Result<usize, PagingError> {
        let entry = self.tables[table][idx];
        if entry & PTE_PRESENT != 0 {
            if entry & PTE_LARGE != 0 {
                return Err(PagingError::AlreadyMapped(entry & ADDR_MASK));
            }
            return Ok(((entry & ADDR_MASK) - self.base) as usize / PAGE as usize);
        }
        if self.tables.len() >= self.max_tables {
            return Err(PagingError::OutOfTables(self.max_tables));
        }
        self.tables.push([0; 512]);
        let new = self.tables.len() - 1;
        // Intermediate levels allow everything; the leaf entry decides.
        self.tables[table][idx] =
            (self.base + new as u64 * PAGE) | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
        Ok(new)
    }

    fn map_one(&mut self, addr: u64, leaf_level: u32, access: Access) -> Result<(), PagingError> {
        let mut table = 0;
        for level in (leaf_level + 1..=3).rev() {
            table = self.next_table(table, Self::index(addr, level))?;
        }
        let idx = Self::index(addr, leaf_level);
        if self.tables[table][idx] & PTE_PRESENT != 0 {
            return Err(PagingError::AlreadyMapped(addr));
        }
        let large = if leaf_level == 1 { PTE_LARGE } else { 0 };
        self.tables[table][idx] = addr | access.bits() | large;
        Ok(())
    }

    /// Identity-maps `[addr, addr + len)` with 4 KiB pages.
    pub fn map_small(&mut self, addr: u64, len: u64, access: Access) -> Result<(), PagingError> {
        if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(PagingError::Unaligned(addr));
        }
        (addr..addr + len)
            .step_by(PAGE as usize)
            .try_for_each(|a| self.map_one(a, 0, access))
    }

    /// Identity-maps `[addr, addr + len)` with 2 MiB pages.
    pub fn map_large(&mut self, addr: u64, len: u64, access: Access) -> Result<(), PagingError> {
        if !addr.is_multiple_of(LARGE_PAGE) || !len.is_multiple_of(LARGE_PAGE) {
            return Err(PagingError::Unaligned(addr));
        }
        (addr..addr + len)
            .step_by(LARGE_PAGE as usize)
            .try_for_each(|a| self.map_one(a, 1, access))
    }

    /// The tables as bytes, to be written at `root()`.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.tables
            .iter()
            .flat_map(|t| t.iter().flat_map(|e| e.to_le_bytes()))
            .collect()
    }

    /// Walks the tables like the MMU: the physical address and effective rights of `addr`.
    pub fn translate(&self, addr: u64) -> Option<(u64, Access)> {
        let mut table = 0usize;
        let mut user = true;
        let mut write = true;
        for level in (0..=3).rev() {
            let e = self.tables[table][Self::index(addr, level)];
            if e & PTE_PRESENT == 0 {
                return None;
            }
            user &= e & PTE_USER != 0;
            write &= e & PTE_WRITABLE != 0;
            let leaf = level == 0 || (level == 1 && e & PTE_LARGE != 0);
            if leaf {
                let size = if level == 0 { PAGE } else { LARGE_PAGE };
                let access = Access {
                    user,
                    write,
                    exec: e & PTE_NX == 0,
                    uncached: e & PTE_PCD != 0,
                };
                return Some(((e & ADDR_MASK & !(size - 1)) | (addr & (size - 1)), access));
            }
            table = usize::try_from(((e & ADDR_MASK) - self.base) / PAGE).ok()?;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_small_and_large_pages_translate_identity() {
        let mut pt = PageTables::new(0x10000, 16);
        pt.map_small(0x1000, 0x2000, Access::SUPERVISOR_RO).unwrap();
        pt.map_large(0x20_0000, 0x40_0000, Access::USER_RWX)
            .unwrap();
        assert_eq!(pt.translate(0x1234), Some((0x1234, Access::SUPERVISOR_RO)));
        assert_eq!(pt.translate(0x2fff).map(|t| t.0), Some(0x2fff));
        assert_eq!(pt.translate(0x0), None);
        assert_eq!(pt.translate(0x3000), None);
        assert_eq!(pt.translate(0x5f_ffff), Some((0x5f_ffff, Access::USER_RWX)));
        assert_eq!(pt.translate(0x60_0000), None);
        assert_eq!(pt.root(), 0x10000);
        // PML4, PDPT, PD, one PT.
        assert_eq!(pt.to_bytes().len(), 4 * 4096);
    }

    #[test]
    fn paging_nx_user_and_cache_bits_encoded() {
        let mut pt = PageTables::new(0, 8);
        pt.map_small(0xd000_0000, 0x1000, Access::USER_RW.uncached())
            .unwrap();
        let (_, a) = pt.translate(0xd000_0010).unwrap();
        assert!(a.user && a.write && !a.exec && a.uncached);
        let bytes = pt.to_bytes();
        // Find the leaf entry and check the raw bits.
        let leaf = bytes
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .find(|e| e & ADDR_MASK == 0xd000_0000)
            .unwrap();
        assert_eq!(
            leaf & !ADDR_MASK,
            PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_PCD | PTE_PWT | PTE_NX
        );
    }

    #[test]
    fn paging_rejects_double_map_unaligned_and_overflow() {
        let mut pt = PageTables::new(0, 3);
        pt.map_large(0, LARGE_PAGE, Access::USER_RW).unwrap();
        assert_eq!(
            pt.map_small(0x1000, 0x1000, Access::USER_RW),
            Err(PagingError::AlreadyMapped(0))
        );
        assert_eq!(
            pt.map_large(0, LARGE_PAGE, Access::USER_RW),
            Err(PagingError::AlreadyMapped(0))
        );
        assert_eq!(
            pt.map_small(0x1001, 0x1000, Access::USER_RW),
            Err(PagingError::Unaligned(0x1001))
        );
        // A second gigabyte needs a fourth table: over the limit of 3.
        assert_eq!(
            pt.map_large(1 << 30, LARGE_PAGE, Access::USER_RW),
            Err(PagingError::OutOfTables(3))
        );
    }
}
