//! The system calls back-ends and their launcher need that std does not wrap: vectored
//! positional I/O between a file and memory, `fallocate`, memfds and shared mappings, unix
//! seqpacket sockets that carry file descriptors, `fork`, and `poll`. This is the only module
//! of the crate with `unsafe`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use vm_memory::VolatileSlice;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Direction of a transfer between a file and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// File → memory (`preadv`).
    ToMemory,
    /// Memory → file (`pwritev`).
    FromMemory,
}

/// Most iovecs handed to one system call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Moves all of `bufs` between memory and `file` at `offset`, retrying short transfers.
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
                .map_err(|_| io::Error::other("buffer offset out of range"))?;
            iov.push(libc::iovec {
                iov_base: part.ptr_guard_mut().as_ptr().cast(),
                iov_len: part.len(),
            });
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let n = match dir {
            // SAFETY: every iovec points into a mapping that `bufs` borrows for this call (it
            // stays mapped while the slices live), with its exact length; the kernel writes
            // only within them. The count is at most IOV_MAX.
            Direction::ToMemory => unsafe {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
            },
            // SAFETY: as above; the kernel only reads the iovecs' memory.
            Direction::FromMemory => unsafe {
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

/// A sealed memfd of `len` bytes (it can never shrink or grow, so a mapping of it never faults
/// past its end).
pub fn sealed_memfd(name: &std::ffi::CStr, len: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with an integer argument.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(file)
}

/// A shared read-write mapping of all `len` bytes of `fd`.
pub struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; who may touch which bytes when is the business of
// its owner (the I/O window and its ownership table), not of the pointer.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a new shared mapping chosen by the kernel; nothing of ours is overwritten.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `off..off + len` as a volatile slice (the other process writes them too), or
    /// `None` when they are not all inside the mapping.
    pub fn slice(&self, off: usize, len: usize) -> Option<VolatileSlice<'_>> {
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let start = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: `off..end` lies inside the live mapping (checked above), which outlives the
        // slice's borrow of `self`.
        Some(unsafe { VolatileSlice::new(start, len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A connected pair of close-on-exec unix seqpacket sockets (message boundaries kept, peer
/// death seen as end of stream).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into our array.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((a, b))
}

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;
const CMSG_SPACE: usize = 64;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// Sends `data` as one message on `sock`, with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: msghdr is plain data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at our buffer of `space` (≤ CMSG_SPACE bytes for 4 fds)
        // bytes, so the first header is inside it.
        let hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: CMSG_LEN is a pure computation.
        let cmsg_len = unsafe { libc::CMSG_LEN(payload) } as usize;
        // SAFETY: `hdr` points at the start of our aligned control buffer (non-null: the
        // buffer is large enough for one header).
        unsafe {
            hdr.write(libc::cmsghdr {
                cmsg_len,
                cmsg_level: libc::SOL_SOCKET,
                cmsg_type: libc::SCM_RIGHTS,
            })
        };
        // SAFETY: CMSG_DATA of that header has room for `payload` bytes inside the buffer.
        let dst = unsafe { libc::CMSG_DATA(hdr) }.cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            let at = dst.wrapping_add(i);
            // SAFETY: `i` < fds.len(), within the room computed above; unaligned-safe write.
            unsafe { at.write_unaligned(fd.as_raw_fd()) };
        }
    }
    loop {
        // SAFETY: `msg` points at live iovec and control buffers for the call's duration.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return if r as usize == data.len() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::WriteZero, "short message"))
            };
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends each of `msgs` as one message on `sock`, with as few system calls as the socket
/// takes them in (one, unless its buffer fills): the peer wakes once for the lot instead of
/// once per message.
pub fn send_many(sock: BorrowedFd<'_>, msgs: &[&[u8]]) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|m| libc::iovec {
            iov_base: m.as_ptr().cast_mut().cast(),
            iov_len: m.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid starting value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut sent = 0;
    while sent < hdrs.len() {
        let rest = &mut hdrs[sent..];
        let n = rest.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
        // SAFETY: every header points at one live iovec, which points at a live message, for
        // the call's duration; the kernel writes only the headers' msg_len fields.
        let r =
            unsafe { libc::sendmmsg(sock.as_raw_fd(), rest.as_mut_ptr(), n, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let r = r as usize;
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "no message sent"));
        }
        if rest[..r]
            .iter()
            .zip(&msgs[sent..])
            .any(|(h, m)| h.msg_len as usize != m.len())
        {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short message"));
        }
        sent += r;
    }
    Ok(())
}

/// Receives one message into `buf`: its length (0 at end of stream) and the descriptors it
/// carried (close-on-exec). A message longer than `buf` is an error (its tail would be lost).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_flags(sock, buf, 0)
}

/// [`recv`] that does not wait: `WouldBlock` when no message is there.
pub fn recv_now(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_flags(sock, buf, libc::MSG_DONTWAIT)
}

fn recv_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: msghdr is plain data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE;
    let n = loop {
        // SAFETY: `msg` points at live iovec and control buffers for the call's duration.
        let r =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_* walk stays within them.
    let mut hdr = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !hdr.is_null() {
        // SAFETY: `hdr` is a header inside the control buffer (the walk checked it).
        let h = unsafe { hdr.read() };
        let (level, kind, len) = (h.cmsg_level, h.cmsg_type, h.cmsg_len);
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is a pure computation.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(head) / size_of::<RawFd>();
            // SAFETY: the data of this header holds `count` descriptors the kernel installed.
            let src = unsafe { libc::CMSG_DATA(hdr) }.cast::<RawFd>();
            for i in 0..count {
                let at = src.wrapping_add(i);
                // SAFETY: `i` < count, inside the header's data.
                let fd = unsafe { at.read_unaligned() };
                // SAFETY: each descriptor the kernel installed for us is new and ours.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: advances within the control buffer the kernel described.
        hdr = unsafe { libc::CMSG_NXTHDR(&msg, hdr) };
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message or its descriptors did not fit",
        ));
    }
    Ok((n, fds))
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to be readable or hung up. `Ok(false)` on
/// timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd, alive for the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The process dies with SIGKILL when its parent does.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes an integer.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) }).map(drop)
}

/// Names the calling thread (`/proc/PID/comm`, 15 bytes at most).
pub fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from our buffer.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// Children are reaped by the kernel (no zombies, no wait loop).
pub fn ignore_children() -> io::Result<()> {
    // SAFETY: sets SIGCHLD's disposition to SIG_IGN; no handler code runs.
    let r = unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    if r == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes every descriptor from 3 up except those in `keep`.
pub fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&f| f >= 3).collect();
    keep.sort_unstable();
    let mut from: RawFd = 3;
    for k in keep.iter().copied().chain([RawFd::MAX]) {
        if k > from {
            // SAFETY: close_range on descriptors this process owns and no longer uses: every
            // live object holding one of them is in `keep`.
            unsafe { libc::syscall(libc::SYS_close_range, from as u32, (k - 1) as u32, 0u32) };
        }
        from = k.saturating_add(1);
    }
}

/// `_exit`: ends the process without running destructors or flushing std's buffers (a forked
/// child must not run its parent's clean-up).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory of ours.
    unsafe { libc::_exit(code) }
}

/// The (device, inode) of an open file, to tell memory files apart.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: stat is plain data; all-zero is a valid starting value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into our live `st`.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((st.st_dev, st.st_ino))
}

/// One `read(2)` from `fd` into `buf` (a tap hands over one frame per read).
pub fn read_into(fd: BorrowedFd<'_>, buf: &VolatileSlice<'_>) -> io::Result<usize> {
    loop {
        let guard = buf.ptr_guard_mut();
        // SAFETY: the kernel writes at most `buf.len()` bytes into the live mapping the slice
        // borrows.
        let n = unsafe { libc::read(fd.as_raw_fd(), guard.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `write(2)` of `buf` to `fd` (a tap takes one frame per write).
pub fn write_from(fd: BorrowedFd<'_>, buf: &VolatileSlice<'_>) -> io::Result<usize> {
    loop {
        let guard = buf.ptr_guard();
        // SAFETY: the kernel reads `buf.len()` bytes from the live mapping the slice borrows.
        let n = unsafe { libc::write(fd.as_raw_fd(), guard.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;

/// `TUNSETOFFLOAD`: which offloaded frames the tap may hand over.
pub fn tap_set_offload(tap: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags as the integer argument.
    check(unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) })
        .map(drop)
}

/// Waits (forever) until one of `fds` has one of the poll events asked with it (or hung up);
/// the events each one has, in order.
pub fn wait_events(fds: &[(BorrowedFd<'_>, i16)]) -> io::Result<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(f, events)| libc::pollfd {
            fd: f.as_raw_fd(),
            events,
            revents: 0,
        })
        .collect();
    poll_forever(&mut p)?;
    Ok(p.iter().map(|x| x.revents).collect())
}

fn poll_forever(p: &mut [libc::pollfd]) -> io::Result<()> {
    loop {
        // SAFETY: `p` is a live array of `p.len()` pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `shutdown(SHUT_WR)`: the peer of stream `fd` reads its end.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown(2) takes a descriptor and a constant.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}
