//! A device's I/O window: a sealed shared-memory file, mapped by the monitor and by the
//! device's back-end, that holds nothing but the data of in-flight requests. The monitor copies
//! request data between guest buffers and the window; the back-end sees only the window.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vm_memory::VolatileSlice;

use crate::sys::{self, Mapping};

/// Size of a block device's window: larger than the requests Linux sends by default
/// (`max_sectors_kb` 1280), so most requests take one round trip.
pub const BLOCK_WINDOW: u64 = 2 << 20;

#[derive(Debug)]
pub struct Window {
    file: File,
    map: MappingDebug,
}

struct MappingDebug(Mapping);

impl std::fmt::Debug for MappingDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes)", self.0.len())
    }
}

impl Window {
    /// A new zero-filled window of `len` bytes (monitor side).
    pub fn create(name: &std::ffi::CStr, len: u64) -> std::io::Result<Self> {
        let file = sys::sealed_memfd(name, len)?;
        let map = Mapping::new(file.as_fd(), len as usize)?;
        Ok(Self {
            file,
            map: MappingDebug(map),
        })
    }

    /// Maps the window the monitor handed over (back-end side).
    pub fn open(fd: OwnedFd) -> std::io::Result<Self> {
        let file = File::from(fd);
        let len = file.metadata()?.len();
        let map = Mapping::new(file.as_fd(), len as usize)?;
        Ok(Self {
            file,
            map: MappingDebug(map),
        })
    }

    pub fn len(&self) -> u64 {
        self.map.0.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.0.is_empty()
    }

    /// Bytes `off..off+len`, or `None` when they are not all inside.
    pub fn slice(&self, off: u64, len: u64) -> Option<VolatileSlice<'_>> {
        self.map
            .0
            .slice(usize::try_from(off).ok()?, usize::try_from(len).ok()?)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
