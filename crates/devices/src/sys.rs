//! The system calls device back-ends need that std does not wrap: vectored positional I/O
//! straight between a file and guest memory (no bounce copy), and `fallocate` for discard and
//! write-zeroes. This is the only module of the crate with `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::VolatileSlice;

/// Direction of a transfer between a file and guest buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// File → guest memory (`preadv`).
    ToGuest,
    /// Guest memory → file (`pwritev`).
    FromGuest,
}

/// Most iovecs handed to one system call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Moves all of `bufs` between guest memory and `file` at `offset`, retrying short transfers.
/// Reading past the end of the file is an `UnexpectedEof` error.
pub fn transfer_all(
    file: &File,
    dir: Direction,
    mut offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> io::Result<u64> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    let (mut index, mut within) = (0usize, 0usize);
    let mut done = 0u64;
    while done < total {
        // The remaining buffers, the first one trimmed by what a short transfer already moved.
        let mut iov = Vec::with_capacity((bufs.len() - index).min(IOV_MAX));
        for (i, b) in bufs[index..].iter().enumerate().take(IOV_MAX) {
            let skip = if i == 0 { within } else { 0 };
            let part = b
                .offset(skip)
                .map_err(|_| io::Error::other("guest buffer offset out of range"))?;
            iov.push(libc::iovec {
                iov_base: part.ptr_guard_mut().as_ptr().cast(),
                iov_len: part.len(),
            });
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let n = match dir {
            // SAFETY: every iovec points into a guest-memory mapping that `bufs` borrows for
            // this call (the regions stay mapped while the slices live), with its exact length;
            // the kernel writes only within them. The count is at most IOV_MAX.
            Direction::ToGuest => unsafe {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
            },
            // SAFETY: as above; the kernel only reads the iovecs' memory.
            Direction::FromGuest => unsafe {
                libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
            },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        done += n as u64;
        offset += n as u64;
        // Advance (index, within) by n bytes.
        while n > 0 && index < bufs.len() {
            let left = bufs[index].len() - within;
            if n < left {
                within += n;
                n = 0;
            } else {
                n -= left;
                index += 1;
                within = 0;
            }
        }
    }
    Ok(done)
}

/// `fallocate(2)` modes used by the block device.
pub mod falloc {
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
}

/// `fallocate(2)` on `file`.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    loop {
        // SAFETY: fallocate takes plain integers and a descriptor `file` keeps open.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload flags for [`tap_set_offload`].
pub mod tun {
    pub const F_CSUM: u32 = 0x01;
    pub const F_TSO4: u32 = 0x02;
    pub const F_TSO6: u32 = 0x04;
    pub const F_TSO_ECN: u32 = 0x08;
}

/// Opens (creating if needed, which takes CAP_NET_ADMIN) the tap interface `name`, non-blocking,
/// with virtio-net headers of `vnet_hdr_len` bytes in front of every frame. Returns the file
/// and the interface's name as the kernel knows it.
pub fn tap_open(name: &str, vnet_hdr_len: i32) -> io::Result<(File, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface names are 1 to 15 bytes without '/'",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one, laid out as the kernel's
    // (16-byte name, then the flags in the union), and lives across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &vnet_hdr_len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(libc::IFNAMSIZ);
    Ok((file, String::from_utf8_lossy(&req.name[..len]).into_owned()))
}

/// Tells the tap which offloads the guest can take on received frames (`tun::F_*`).
pub fn tap_set_offload(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Connects to the unix stream socket at `path` without blocking: a listener whose backlog is
/// full answers `WouldBlock` instead of stalling the caller. The stream is non-blocking.
pub fn unix_connect_nonblocking(
    path: &std::path::Path,
) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) takes plain integers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns; OwnedFd closes it on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len()) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call; `len` covers the family
    // and the path bytes written into it.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::os::unix::net::UnixStream::from(owned))
}
