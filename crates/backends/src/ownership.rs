//! The page ownership table (ARCHITECTURE.md §4), as far as device back-ends go.
//!
//! Two facts are kept here and asked by every path that hands memory to a back-end:
//!
//! - **Guest RAM is private to the VM.** The monitor registers the file behind guest RAM
//!   ([`mark_guest_memory`]); the back-end launcher refuses to pass any descriptor of that file
//!   to a back-end ([`check_exportable`]). No guest page is ever shared with a back-end: request
//!   data is copied between guest buffers and the device's I/O window by the monitor.
//! - **Each byte of an I/O window has one owner at a time**: the monitor, or the back-end
//!   serving one request ([`WindowTable`]). The monitor lends a range when it sends a request
//!   and takes it back only with the reply that names that request; a reply for a request the
//!   back-end was not lent, or a second reply, is a protocol violation. The monitor reads or
//!   writes a range only while it owns it.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

/// The (device, inode) pairs of files that hold guest RAM.
static GUEST_MEMORY: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// Records that the file `fd` holds guest RAM: it never leaves the monitor.
pub fn mark_guest_memory(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let id = crate::sys::identity(fd)?;
    let mut g = GUEST_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if !g.contains(&id) {
        g.push(id);
    }
    Ok(())
}

/// Refuses `fd` if it is (another descriptor of) a file that holds guest RAM.
pub fn check_exportable(fd: BorrowedFd<'_>) -> Result<(), OwnershipError> {
    let id = crate::sys::identity(fd).map_err(|_| OwnershipError::Unknown)?;
    let g = GUEST_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if g.contains(&id) {
        Err(OwnershipError::GuestMemory)
    } else {
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    #[error("refused to hand guest memory to a back-end (guest RAM is private to the VM)")]
    GuestMemory,
    #[error("cannot identify a descriptor to be handed to a back-end")]
    Unknown,
    #[error("window range {start:#x}+{len:#x} is not inside the {size:#x}-byte window")]
    Outside { start: u64, len: u64, size: u64 },
    #[error("window range {start:#x}+{len:#x} overlaps a range lent for request {holder}")]
    Overlap { start: u64, len: u64, holder: u64 },
    #[error("request {0} already holds a window range")]
    Duplicate(u64),
    #[error("a reply for request {0}, which holds no window range")]
    NotLent(u64),
}

/// Who owns a byte of a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Monitor,
    /// Lent to the back-end for the request with this id.
    BackEnd(u64),
}

/// One device window's ownership: the ranges lent to its back-end, by request.
#[derive(Debug)]
pub struct WindowTable {
    size: u64,
    /// start → (end, request id).
    lent: BTreeMap<u64, (u64, u64)>,
    /// request id → start.
    by_request: BTreeMap<u64, u64>,
}

impl WindowTable {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            lent: BTreeMap::new(),
            by_request: BTreeMap::new(),
        }
    }

    /// Lends `start..start+len` (non-empty) to the back-end for `request`.
    pub fn lend(&mut self, start: u64, len: u64, request: u64) -> Result<(), OwnershipError> {
        let end = start
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.size)
            .ok_or(OwnershipError::Outside {
                start,
                len,
                size: self.size,
            })?;
        if self.by_request.contains_key(&request) {
            return Err(OwnershipError::Duplicate(request));
        }
        // The range lent last before `end` is the only one that can overlap.
        if let Some((_, &(e, holder))) = self.lent.range(..end).next_back()
            && e > start
        {
            return Err(OwnershipError::Overlap { start, len, holder });
        }
        self.lent.insert(start, (end, request));
        self.by_request.insert(request, start);
        Ok(())
    }

    /// The reply for `request` came: its range returns to the monitor. Returns it.
    pub fn take_back(&mut self, request: u64) -> Result<(u64, u64), OwnershipError> {
        let start = self
            .by_request
            .remove(&request)
            .ok_or(OwnershipError::NotLent(request))?;
        let (end, _) = self.lent.remove(&start).expect("the two maps agree");
        Ok((start, end - start))
    }

    /// Every range goes back to the monitor (the back-end died; its requests are sent again).
    pub fn take_all_back(&mut self) -> Vec<(u64, u64, u64)> {
        self.by_request.clear();
        std::mem::take(&mut self.lent)
            .into_iter()
            .map(|(s, (e, r))| (r, s, e - s))
            .collect()
    }

    pub fn owner(&self, at: u64) -> Owner {
        match self.lent.range(..=at).next_back() {
            Some((_, &(end, r))) if at < end => Owner::BackEnd(r),
            _ => Owner::Monitor,
        }
    }

    /// Whether the monitor owns all of `start..start+len` (it may touch it).
    pub fn monitor_owns(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len).filter(|&e| e <= self.size) else {
            return false;
        };
        if len == 0 {
            return true;
        }
        self.lent
            .range(..end)
            .next_back()
            .is_none_or(|(_, &(e, _))| e <= start)
    }

    pub fn lent_bytes(&self) -> u64 {
        self.lent
            .values()
            .zip(self.lent.keys())
            .map(|((e, _), s)| e - s)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: a fixed sequence of pseudo-random numbers for the property test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn lending_checks_bounds_overlap_and_replies() {
        let mut t = WindowTable::new(4096);
        t.lend(0, 1024, 1).unwrap();
        assert_eq!(t.owner(1023), Owner::BackEnd(1));
        assert_eq!(t.owner(1024), Owner::Monitor);
        assert!(matches!(
            t.lend(512, 1024, 2),
            Err(OwnershipError::Overlap { holder: 1, .. })
        ));
        assert_eq!(t.lend(1024, 1024, 1), Err(OwnershipError::Duplicate(1)));
        assert!(matches!(
            t.lend(4000, 100, 3),
            Err(OwnershipError::Outside { .. })
        ));
        assert!(t.lend(u64::MAX, 2, 3).is_err());
        assert!(t.lend(100, 0, 3).is_err(), "empty ranges are not lent");
        assert_eq!(t.take_back(2), Err(OwnershipError::NotLent(2)));
        assert_eq!(t.take_back(1), Ok((0, 1024)));
        assert_eq!(t.take_back(1), Err(OwnershipError::NotLent(1)), "one reply");
        assert!(t.monitor_owns(0, 4096));
        assert!(!t.monitor_owns(0, 4097));
    }

    /// Property: after any sequence of lends and replies, (1) lent ranges never overlap and lie
    /// inside the window, (2) every byte's owner is the one request whose range holds it, or
    /// the monitor, (3) a lend succeeds exactly when its range is inside and free and its
    /// request holds nothing, (4) a reply succeeds exactly for a request that holds a range.
    #[test]
    fn ownership_invariants_hold_under_random_operations() {
        const SIZE: u64 = 256;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _round in 0..200 {
            let mut t = WindowTable::new(SIZE);
            // The model: the owner of every byte.
            let mut model: Vec<Option<u64>> = vec![None; SIZE as usize];
            for _ in 0..200 {
                let request = rng.next() % 16;
                if rng.next().is_multiple_of(3) {
                    let held = model.contains(&Some(request));
                    let r = t.take_back(request);
                    assert_eq!(r.is_ok(), held, "reply for {request}");
                    if let Ok((s, l)) = r {
                        for b in s..s + l {
                            assert_eq!(model[b as usize], Some(request));
                            model[b as usize] = None;
                        }
                    }
                    assert!(!model.contains(&Some(request)));
                } else {
                    let start = rng.next() % (SIZE + 8);
                    let len = rng.next() % 64;
                    let inside = len > 0 && start + len <= SIZE;
                    let free = inside && (start..start + len).all(|b| model[b as usize].is_none());
                    let holds = model.contains(&Some(request));
                    let r = t.lend(start, len, request);
                    assert_eq!(
                        r.is_ok(),
                        inside && free && !holds,
                        "lend {start}+{len}: {r:?}"
                    );
                    if r.is_ok() {
                        for b in start..start + len {
                            model[b as usize] = Some(request);
                        }
                    }
                }
                for (b, owner) in model.iter().enumerate() {
                    let want = owner.map_or(Owner::Monitor, Owner::BackEnd);
                    assert_eq!(t.owner(b as u64), want, "byte {b}");
                }
                let lent = model.iter().filter(|o| o.is_some()).count() as u64;
                assert_eq!(t.lent_bytes(), lent);
                let s = rng.next() % SIZE;
                let l = rng.next() % (SIZE - s + 1);
                let free = (s..s + l).all(|b| model[b as usize].is_none());
                assert_eq!(t.monitor_owns(s, l), free, "monitor_owns {s}+{l}");
            }
        }
    }
}
