//! Guest RAM: one sealed memfd, mapped shared into the monitor and registered with KVM.
//!
//! A memfd (rather than anonymous memory) gives the VM's memory an identity the monitor can
//! later hand out piecewise — I/O windows, snapshots — under the page ownership table. Sealing
//! it against growing and shrinking means no one holding the fd can change its size under the
//! mapping.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

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
    #[error("cannot map {size} bytes of guest memory; lower --memory")]
    AlignedMap {
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("guest memory region rejected: {0}")]
    Region(String),
}

/// What guest RAM is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A sealed memfd with 4 KiB pages: cheapest to create and touch (function micro-VMs).
    Memfd,
    /// A sealed memfd, asking for transparent huge pages (needs shared-memory THP enabled).
    MemfdHuge,
    /// Private anonymous memory asking for transparent huge pages.
    AnonymousHuge,
}

/// Maps `len` bytes of private anonymous memory at a 2 MiB-aligned address.
///
/// KVM can map guest memory with large pages only where the host address and the guest-physical
/// address agree modulo 2 MiB; plain `mmap` gives only 4 KiB alignment, which would waste the
/// huge pages.
fn map_aligned_anonymous(len: usize) -> io::Result<*mut u8> {
    const ALIGN: usize = 2 << 20;
    let span = len
        .checked_add(ALIGN)
        .ok_or_else(|| io::Error::other("size overflow"))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous reservation; no existing memory is affected.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_NONE, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = (base as usize).next_multiple_of(ALIGN);
    // SAFETY: `start..start + len` lies inside the reservation made above (at most ALIGN - 1
    // bytes past its start), which MAP_FIXED replaces with usable memory.
    let addr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        let err = io::Error::last_os_error();
        // SAFETY: unmapping the reservation we own.
        unsafe { libc::munmap(base, span) };
        return Err(err);
    }
    // Give back the unused head and tail of the reservation.
    let head = start - base as usize;
    let tail = span - head - len;
    if head > 0 {
        // SAFETY: the head lies inside our reservation, before the memory we keep.
        unsafe { libc::munmap(base, head) };
    }
    if tail > 0 {
        // SAFETY: the tail lies inside our reservation, after the memory we keep.
        unsafe { libc::munmap((start + len) as *mut libc::c_void, tail) };
    }
    Ok(addr.cast())
}

/// Asks for transparent huge pages; a refusal only costs speed.
fn advise_huge(addr: *mut u8, len: usize) {
    // SAFETY: madvise on a mapping we own, with an advice that does not change its contents.
    let r = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "MADV_HUGEPAGE refused");
    }
}

/// The VM's RAM: one memfd (or anonymous memory), mapped as one or more guest-physical regions (RAM is split around
/// the MMIO gap below 4 GiB for large Linux guests).
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    /// (guest-physical start, size, host address) of each region.
    regions: Vec<(u64, u64, u64)>,
    size: u64,
    /// The memfd behind the regions and each region's offset in it (memfd backings).
    memfd: Option<(File, Vec<u64>)>,
}

/// Which parts of guest RAM may hold data: what the guest (or the monitor) ever wrote. The rest
/// reads as zero, and a snapshot need not read it at all — reading would even allocate it.
#[derive(Debug)]
pub enum RamMap {
    /// Holes of the memfd (`SEEK_DATA`/`SEEK_HOLE`), exact.
    Memfd { file: File, offsets: Vec<u64> },
    /// Pages present or swapped out (`/proc/self/pagemap`), for anonymous memory.
    Anonymous { hosts: Vec<u64> },
}

const PAGE: u64 = 4096;

impl RamMap {
    /// Ranges `(offset, length)` within region `index` (of `len` bytes) that may hold data,
    /// sorted. An error means "unknown": the caller treats everything as populated.
    pub fn populated(&self, index: usize, len: u64) -> io::Result<Vec<(u64, u64)>> {
        match self {
            RamMap::Memfd { file, offsets } => {
                let base = *offsets.get(index).ok_or(io::ErrorKind::InvalidInput)?;
                let mut out = Vec::new();
                let mut at = base;
                let end = base + len;
                while at < end {
                    let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
                        break;
                    };
                    if data >= end {
                        break;
                    }
                    let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                    out.push((data - base, hole - data));
                    at = hole;
                }
                Ok(out)
            }
            RamMap::Anonymous { hosts } => {
                use std::os::unix::fs::FileExt;
                let host = *hosts.get(index).ok_or(io::ErrorKind::InvalidInput)?;
                let pagemap = File::open("/proc/self/pagemap")?;
                let pages = len.div_ceil(PAGE);
                let mut out: Vec<(u64, u64)> = Vec::new();
                let mut buf = vec![0u8; 8 * 4096];
                let mut page = 0u64;
                while page < pages {
                    let n = (pages - page).min(4096);
                    let bytes = &mut buf[..(n * 8) as usize];
                    pagemap.read_exact_at(bytes, (host / PAGE + page) * 8)?;
                    for (i, e) in bytes.chunks_exact(8).enumerate() {
                        let e =
                            u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                        // Bit 63: present; bit 62: swapped.
                        if e >> 62 == 0 {
                            continue;
                        }
                        let off = (page + i as u64) * PAGE;
                        match out.last_mut() {
                            Some(last) if last.0 + last.1 == off => last.1 += PAGE,
                            _ => out.push((off, PAGE)),
                        }
                    }
                    page += n;
                }
                Ok(out)
            }
        }
    }
}

/// `lseek(fd, at, whence)`; `None` when there is no more data (ENXIO).
fn seek(file: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor we own; it touches no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
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
    /// Creates `size` bytes of zeroed guest RAM at guest-physical 0, backed by a sealed memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_regions(&[(0, size)], Backing::Memfd)
    }

    /// Creates zeroed guest RAM laid out as `(guest-physical start, size)` regions, sorted and
    /// not overlapping.
    pub fn with_regions(layout: &[(u64, u64)], backing: Backing) -> Result<Self, MemoryError> {
        match backing {
            Backing::Memfd => Self::memfd_regions(layout, false),
            Backing::MemfdHuge => Self::memfd_regions(layout, true),
            Backing::AnonymousHuge => Self::anonymous_regions(layout),
        }
    }

    /// The backing that gives a large VM transparent huge pages on this host: a memfd where
    /// shared-memory THP is allowed, otherwise private anonymous memory.
    ///
    /// Huge pages matter: every guest TLB miss walks the host's page tables too, and with 4 KiB
    /// host pages a Linux guest boots about twice as slowly (measured in the nested rig).
    /// Asked once per process (a jailed monitor cannot see `/sys`; it asks before the jail).
    pub fn huge_backing() -> Backing {
        static BACKING: std::sync::OnceLock<Backing> = std::sync::OnceLock::new();
        *BACKING.get_or_init(Self::find_huge_backing)
    }

    fn find_huge_backing() -> Backing {
        let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        let selected = policy
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .unwrap_or("[never]");
        if matches!(
            selected,
            "[always]" | "[within_size]" | "[advise]" | "[force]"
        ) {
            Backing::MemfdHuge
        } else {
            Backing::AnonymousHuge
        }
    }

    fn anonymous_regions(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let mut mapped = Vec::new();
        for &(gpa, len) in layout {
            let ulen = usize::try_from(len).map_err(|_| MemoryError::Region("size".into()))?;
            let addr = map_aligned_anonymous(ulen)
                .map_err(|source| MemoryError::AlignedMap { size: len, source })?;
            advise_huge(addr, ulen);
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            // SAFETY: `addr..addr + ulen` is the mapping made just above, readable and
            // writable with these flags; it is never unmapped (it lives as long as the VM's
            // process needs it, like every guest RAM mapping).
            let region = unsafe {
                MmapRegion::build_raw(addr, ulen, libc::PROT_READ | libc::PROT_WRITE, flags)
            }
            .map_err(|source| MemoryError::Map { size: len, source })?;
            mapped.push((gpa, region));
        }
        Self::assemble(mapped, None)
    }

    /// Guest RAM from mapped `(guest-physical start, mapping)` regions.
    fn assemble(
        mapped: Vec<(u64, MmapRegion)>,
        memfd: Option<(File, Vec<u64>)>,
    ) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(mapped.len());
        let mut guest = Vec::with_capacity(mapped.len());
        for (gpa, region) in mapped {
            regions.push((gpa, region.size() as u64, region.as_ptr() as u64));
            guest.push(
                GuestRegionMmap::new(region, GuestAddress(gpa))
                    .ok_or_else(|| MemoryError::Region("address overflow".into()))?,
            );
        }
        let memory =
            GuestMemoryMmap::from_regions(guest).map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self {
            size: regions.iter().map(|r| r.1).sum(),
            memory,
            regions,
            memfd,
        })
    }

    fn memfd_regions(layout: &[(u64, u64)], huge: bool) -> Result<Self, MemoryError> {
        let size: u64 = layout.iter().map(|r| r.1).sum();
        let file = memfd(c"bulwark-guest-ram").map_err(MemoryError::Memfd)?;
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(MemoryError::Seal(io::Error::last_os_error()));
        }
        // The ownership table: this file is guest RAM, private to the VM; no descriptor of it
        // may ever be handed to a device back-end.
        bulwark_backends::ownership::mark_guest_memory(file.as_fd()).map_err(MemoryError::Memfd)?;
        let mut mapped = Vec::new();
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for &(gpa, len) in layout {
            offsets.push(offset);
            let ulen = usize::try_from(len).map_err(|_| MemoryError::Region("size".into()))?;
            let file = file.try_clone().map_err(MemoryError::Memfd)?;
            let region = MmapRegion::from_file(FileOffset::new(file, offset), ulen)
                .map_err(|source| MemoryError::Map { size: len, source })?;
            if huge {
                advise_huge(region.as_ptr(), ulen);
            }
            mapped.push((gpa, region));
            offset += len;
        }
        Self::assemble(mapped, Some((file, offsets)))
    }

    /// A map of the populated parts of guest RAM, for snapshots.
    pub fn ram_map(&self) -> io::Result<RamMap> {
        Ok(match &self.memfd {
            Some((file, offsets)) => RamMap::Memfd {
                file: file.try_clone()?,
                offsets: offsets.clone(),
            },
            None => RamMap::Anonymous {
                hosts: self.regions.iter().map(|r| r.2).collect(),
            },
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

    #[test]
    fn ram_map_lists_only_written_memory_for_both_backings() {
        for backing in [Backing::Memfd, Backing::AnonymousHuge] {
            let size = 64u64 << 20;
            let ram = GuestRam::with_regions(&[(0, size)], backing).unwrap();
            let map = ram.ram_map().unwrap();
            assert!(
                map.populated(0, size).unwrap().is_empty(),
                "{backing:?}: fresh RAM holds nothing"
            );
            for at in [0x1000u64, 40 << 20] {
                ram.memory().write_obj(0xabu8, GuestAddress(at)).unwrap();
            }
            let ranges = map.populated(0, size).unwrap();
            for at in [0x1000u64, 40 << 20] {
                assert!(
                    ranges.iter().any(|&(o, l)| o <= at && at < o + l),
                    "{backing:?}: {at:#x} not in {ranges:x?}"
                );
            }
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            assert!(
                total <= 8 << 20,
                "{backing:?}: {total} bytes populated for two writes"
            );
        }
    }
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
