//! The system calls devices need that std does not wrap: taps and non-blocking unix
//! connections. This is the only module of the crate with `unsafe`. (Block file I/O lives in
//! `bulwark-backends`, which runs it in the monitor or in a back-end process.)

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload flags for `TUNSETOFFLOAD` (`bulwark_backends::sys::tap_set_offload`).
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
