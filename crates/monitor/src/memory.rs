//! Guest RAM: one sealed memfd, mapped shared into the monitor and registered with KVM.
//!
//! A memfd (rather than anonymous memory) gives the VM's memory an identity the monitor can
//! later hand out piecewise — I/O windows, snapshots — under the page ownership table. Sealing
//! it against growing and shrinking means no one holding the fd can change its size under the
//! mapping.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create)")]
    Memfd(#[source] io::Error),
    #[error("cannot size guest memory to {size} bytes; is the host out of memory?")]
    Resize {
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot seal the guest memory file")]
    Seal(#[source] io::Error),
    #[error("cannot map {size} bytes of guest memory; lower --memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory region rejected: {0}")]
    Region(String),
}

/// The VM's RAM: one memfd, mapped as one or more guest-physical regions (RAM is split around
/// the MMIO gap below 4 GiB for large Linux guests).
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    /// (guest-physical start, size, host address) of each region.
    regions: Vec<(u64, u64, u64)>,
    size: u64,
}

fn memfd(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM at guest-physical 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_regions(&[(0, size)])
    }

    /// Creates zeroed guest RAM laid out as `(guest-physical start, size)` regions, sorted and
    /// not overlapping, backed by one memfd.
    pub fn with_regions(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let size: u64 = layout.iter().map(|r| r.1).sum();
        let file = memfd(c"bulwark-guest-ram").map_err(MemoryError::Memfd)?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(MemoryError::Seal(io::Error::last_os_error()));
        }
        let mut regions = Vec::new();
        let mut mapped = Vec::new();
        let mut offset = 0u64;
        for &(gpa, len) in layout {
            let ulen = usize::try_from(len).map_err(|_| MemoryError::Region("size".into()))?;
            let file = file.try_clone().map_err(MemoryError::Memfd)?;
            let region = MmapRegion::from_file(FileOffset::new(file, offset), ulen)
                .map_err(|source| MemoryError::Map { size: len, source })?;
            regions.push((gpa, len, region.as_ptr() as u64));
            mapped.push(
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| MemoryError::Region("address overflow".into()))?,
            );
            offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self {
            memory,
            regions,
            size,
        })
    }

    /// (guest-physical start, size, host address) of each region, for KVM memory slots.
    pub fn regions(&self) -> &[(u64, u64, u64)] {
        &self.regions
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn guest_ram_is_zeroed_and_sealed() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mut b = [1u8; 16];
        ram.memory()
            .read_slice(&mut b, GuestAddress((2 << 20) - 16))
            .unwrap();
        assert_eq!(b, [0; 16]);
        ram.memory().write_slice(&[7], GuestAddress(5)).unwrap();
        assert!(
            ram.memory()
                .write_slice(&[7], GuestAddress(2 << 20))
                .is_err()
        );
        let region = ram.memory().iter().next().unwrap().get_mmap();
        let fd = region.file_offset().unwrap().file().as_raw_fd();
        // SAFETY: F_GET_SEALS on a valid fd takes no argument.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert_eq!(seals & libc::F_SEAL_GROW, libc::F_SEAL_GROW);
        assert!(
            region
                .file_offset()
                .unwrap()
                .file()
                .set_len(4 << 20)
                .is_err()
        );
    }
}
