//! Kernel symbols from the `System.map` that `bulwark image` ships with each kernel, and the
//! KASLR slide that relocates them in a running guest, found from outside: the syscall-entry MSR
//! (LSTAR) holds the run-time address of `entry_SYSCALL_64`, whose link-time address the map
//! gives.

use std::collections::HashMap;

use thiserror::Error;

/// The symbol whose run-time address LSTAR holds.
pub const SYSCALL_ENTRY: &str = "entry_SYSCALL_64";
/// x86-64 KASLR moves the kernel image in steps of CONFIG_PHYSICAL_ALIGN (2 MiB on Debian).
pub const KASLR_ALIGN: u64 = 2 << 20;
/// ... and by less than this (the kernel image's 1 GiB virtual window).
pub const KASLR_MAX: u64 = 1 << 30;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SymbolError {
    #[error(
        "System.map line {line}: {text:?} is not `ADDRESS TYPE NAME` (is this a System.map file?)"
    )]
    BadLine { line: usize, text: String },
    #[error("System.map has no kernel symbols (an empty or truncated file)")]
    Empty,
    #[error("System.map has no `{0}`: it is not an x86-64 Linux kernel's map")]
    Missing(String),
    #[error(
        "the guest's syscall entry is {lstar:#x}, which is not this System.map's {SYSCALL_ENTRY} ({linked:#x}) moved by a whole number of 2 MiB steps under 1 GiB: the map belongs to another kernel, or the guest has not set up (or has changed) its syscall entry"
    )]
    SlideMismatch { lstar: u64, linked: u64 },
}

/// A kernel's symbols at their link-time addresses.
#[derive(Debug)]
pub struct SymbolMap {
    /// (address, name), sorted by address.
    by_addr: Vec<(u64, String)>,
    by_name: HashMap<String, u64>,
}

impl SymbolMap {
    /// Parses a System.map (`ffffffff81000000 T _text` per line). Absolute and undefined-type
    /// symbols are kept for lookups by name only when they carry an address.
    pub fn parse(text: &str) -> Result<Self, SymbolError> {
        let mut by_addr = Vec::new();
        let mut by_name = HashMap::new();
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let mut f = l.split_whitespace();
            let (Some(addr), Some(kind), Some(name), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(bad(i, l));
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                return Err(bad(i, l));
            };
            if kind.len() != 1 {
                return Err(bad(i, l));
            }
            by_name.entry(name.to_owned()).or_insert(addr);
            // Only symbols in the kernel's own address range resolve addresses (per-CPU and
            // absolute symbols sit near zero).
            if addr >= 0xffff_0000_0000_0000 {
                by_addr.push((addr, name.to_owned()));
            }
        }
        if by_addr.is_empty() {
            return Err(SymbolError::Empty);
        }
        by_addr.sort();
        Ok(Self { by_addr, by_name })
    }

    /// A symbol's link-time address.
    pub fn addr(&self, name: &str) -> Result<u64, SymbolError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| SymbolError::Missing(name.to_owned()))
    }

    /// The symbol at or before link-time address `addr`, and how far past it `addr` is.
    pub fn resolve(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.by_addr.partition_point(|(a, _)| *a <= addr);
        let (a, name) = self.by_addr.get(i.checked_sub(1)?)?;
        Some((name, addr - a))
    }

    /// Bytes from link-time address `addr` to the next symbol above it (how large the object
    /// there can be), if one follows.
    pub fn span(&self, addr: u64) -> Option<u64> {
        let i = self.by_addr.partition_point(|(a, _)| *a <= addr);
        Some(self.by_addr.get(i)?.0 - addr)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The KASLR slide of a guest whose LSTAR MSR reads `lstar`: run-time minus link-time
    /// address, checked against what x86-64 KASLR can produce.
    pub fn slide(&self, lstar: u64) -> Result<u64, SymbolError> {
        let linked = self.addr(SYSCALL_ENTRY)?;
        let slide = lstar.wrapping_sub(linked);
        if slide.is_multiple_of(KASLR_ALIGN) && slide < KASLR_MAX {
            Ok(slide)
        } else {
            Err(SymbolError::SlideMismatch { lstar, linked })
        }
    }
}

fn bad(i: usize, l: &str) -> SymbolError {
    SymbolError::BadLine {
        line: i + 1,
        text: l.chars().take(80).collect(),
    }
}

/// A kernel's symbols where a running guest has them: the map and the guest's KASLR slide.
#[derive(Debug)]
pub struct Kernel<'m> {
    pub map: &'m SymbolMap,
    pub slide: u64,
}

impl Kernel<'_> {
    /// A symbol's run-time address.
    pub fn addr(&self, name: &str) -> Result<u64, SymbolError> {
        Ok(self.map.addr(name)?.wrapping_add(self.slide))
    }

    /// `symbol+0xoff` for a run-time address (or the bare address when no symbol is before it).
    pub fn describe(&self, addr: u64) -> String {
        match self.map.resolve(addr.wrapping_sub(self.slide)) {
            Some((name, 0)) => name.to_owned(),
            Some((name, off)) => format!("{name}+{off:#x}"),
            None => format!("{addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81e00000 T entry_SYSCALL_64
ffffffff81e00060 T entry_SYSCALL_64_safe_stack
ffffffff82a00000 D init_task
";

    #[test]
    fn symbols_resolve_both_ways_and_slide_from_lstar() {
        let m = SymbolMap::parse(MAP).unwrap();
        assert_eq!(m.addr("init_task").unwrap(), 0xffff_ffff_82a0_0000);
        assert_eq!(m.addr("__per_cpu_start").unwrap(), 0);
        assert_eq!(
            m.resolve(0xffff_ffff_81e0_0070),
            Some(("entry_SYSCALL_64_safe_stack", 0x10))
        );
        assert_eq!(m.resolve(0xffff_ffff_8000_0000), None);
        assert_eq!(m.span(0xffff_ffff_81e0_0000), Some(0x60));
        assert_eq!(m.span(0xffff_ffff_82a0_0000), None);
        let slide = m.slide(0xffff_ffff_a5e0_0000).unwrap();
        assert_eq!(slide, 0x2400_0000);
        let k = Kernel { map: &m, slide };
        assert_eq!(k.addr("init_task").unwrap(), 0xffff_ffff_a6a0_0000);
        assert_eq!(
            k.describe(0xffff_ffff_a5e0_0064),
            "entry_SYSCALL_64_safe_stack+0x4"
        );
        assert_eq!(k.describe(0xffff_ffff_a5e0_0000), "entry_SYSCALL_64");
        // No KASLR: slide 0.
        assert_eq!(m.slide(0xffff_ffff_81e0_0000).unwrap(), 0);
    }

    #[test]
    fn a_wrong_map_or_a_guest_without_its_syscall_entry_is_named() {
        let m = SymbolMap::parse(MAP).unwrap();
        // Not a 2 MiB step (another kernel's map), past the KASLR window, or LSTAR still 0.
        for lstar in [0xffff_ffff_81e0_1000, 0xffff_ffff_c1e0_0000, 0] {
            assert_eq!(
                m.slide(lstar),
                Err(SymbolError::SlideMismatch {
                    lstar,
                    linked: 0xffff_ffff_81e0_0000
                })
            );
        }
        let no_entry = SymbolMap::parse("ffffffff81000000 T _text\n").unwrap();
        assert_eq!(
            no_entry.slide(0),
            Err(SymbolError::Missing(SYSCALL_ENTRY.into()))
        );
    }

    #[test]
    fn malformed_maps_are_refused_with_the_line() {
        assert_eq!(SymbolMap::parse("").unwrap_err(), SymbolError::Empty);
        assert_eq!(
            SymbolMap::parse("0000000000000000 A zero\n").unwrap_err(),
            SymbolError::Empty
        );
        match SymbolMap::parse("ffffffff81000000 T _text\nnot a map line at all\n") {
            Err(SymbolError::BadLine { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            SymbolMap::parse("\u{7f}ELF\u{2}\u{1}\u{1}"),
            Err(SymbolError::BadLine { line: 1, .. })
        ));
    }
}
