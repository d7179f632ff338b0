//! A disk image file and the operations virtio-blk needs of it: positional reads and writes
//! (straight between the file and memory, through an aligned bounce buffer when `O_DIRECT`
//! meets unaligned buffers), flush, discard and write-zeroes. The monitor's in-process block
//! device and the block back-end process run the same code.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use crate::sys::{self, Direction, falloc};

/// Sector size: the unit of O_DIRECT alignment here.
pub const SECTOR: u64 = 512;

/// An open image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// Opened with `O_DIRECT`.
    direct: bool,
}

/// What [`Disk::punch`] does to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punch {
    /// A hint: free the blocks if the filesystem can, else nothing.
    Discard,
    /// Zeroes, keeping the blocks allocated.
    Zero,
    /// Zeroes, freeing the blocks if the filesystem can.
    ZeroUnmap,
}

/// One operation of a block request, with its data in memory the caller can reach (guest
/// memory in the monitor, the I/O window in a back-end).
#[derive(Debug)]
pub enum DiskOp<'a> {
    /// Read into the buffers, in order, from the byte offset.
    Read(u64, Vec<VolatileSlice<'a>>),
    /// Write the buffers, in order, at the byte offset.
    Write(u64, Vec<VolatileSlice<'a>>),
    Flush,
    /// Discard or zero `.2` bytes at byte offset `.1`.
    Punch(Punch, u64, u64),
}

impl Disk {
    pub fn new(file: File, direct: bool) -> Self {
        Self { file, direct }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Runs one operation.
    pub fn run(&self, op: &DiskOp<'_>) -> std::io::Result<()> {
        match op {
            DiskOp::Read(offset, bufs) => self.read(*offset, bufs),
            DiskOp::Write(offset, bufs) => self.write(*offset, bufs),
            DiskOp::Flush => self.flush(),
            DiskOp::Punch(how, offset, len) => self.punch(*how, *offset, *len),
        }
    }

    /// Reads `bufs` (in order) from byte `offset`.
    pub fn read(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.transfer(offset, bufs, Direction::ToMemory)
    }

    /// Writes `bufs` (in order) at byte `offset`.
    pub fn write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.transfer(offset, bufs, Direction::FromMemory)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    fn transfer(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        dir: Direction,
    ) -> std::io::Result<()> {
        let aligned = bufs.iter().all(|s| {
            (s.ptr_guard().as_ptr() as u64).is_multiple_of(SECTOR)
                && (s.len() as u64).is_multiple_of(SECTOR)
        });
        if self.direct && !aligned {
            let len = bufs.iter().map(|b| b.len() as u64).sum();
            return self.transfer_bounced(bufs, offset, len, dir);
        }
        sys::transfer_all(&self.file, dir, offset, bufs).map(|_| ())
    }

    /// `O_DIRECT` needs sector-aligned memory: buffers placed anywhere go through an aligned
    /// bounce buffer.
    fn transfer_bounced(
        &self,
        slices: &[VolatileSlice<'_>],
        offset: u64,
        len: u64,
        dir: Direction,
    ) -> std::io::Result<()> {
        const ALIGN: usize = 4096;
        let mut raw = vec![0u8; len as usize + ALIGN];
        let skip = raw.as_ptr().align_offset(ALIGN);
        let buf = &mut raw[skip..skip + len as usize];
        match dir {
            Direction::ToMemory => {
                self.file.read_exact_at(buf, offset)?;
                let mut at = 0;
                for s in slices {
                    s.copy_from(&buf[at..at + s.len()]);
                    at += s.len();
                }
            }
            Direction::FromMemory => {
                let mut at = 0;
                for s in slices {
                    s.copy_to(&mut buf[at..at + s.len()]);
                    at += s.len();
                }
                self.file.write_all_at(buf, offset)?;
            }
        }
        Ok(())
    }

    /// Discards or zeroes `len` bytes at `off`.
    pub fn punch(&self, how: Punch, off: u64, len: u64) -> std::io::Result<()> {
        let mode = match how {
            Punch::Discard | Punch::ZeroUnmap => falloc::PUNCH_HOLE,
            Punch::Zero => falloc::ZERO_RANGE,
        };
        match sys::fallocate(&self.file, mode, off, len) {
            Ok(()) => Ok(()),
            // Discard is a hint: a filesystem without hole punching ignores it.
            Err(e) if how == Punch::Discard && is_unsupported(&e) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zeroes(off, len),
            Err(e) => Err(e),
        }
    }

    fn write_zeroes(&self, mut off: u64, len: u64) -> std::io::Result<()> {
        let end = off + len;
        let chunk = vec![0u8; (1 << 20).min(len as usize)];
        while off < end {
            let n = chunk.len().min((end - off) as usize);
            self.file.write_all_at(&chunk[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}
