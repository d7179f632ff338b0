//! The agent's only unsafe code: AF_VSOCK sockets (which std does not offer) and a
//! process-group kill. Each call is wrapped in a safe function that owns its file descriptors
//! through [`OwnedFd`], so nothing outside this module handles a raw fd.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's CID as seen from a guest: the only peer the agent serves.
pub(crate) const VMADDR_CID_HOST: u32 = libc::VMADDR_CID_HOST;

/// `sockaddr_vm` as a `socklen_t`; a 16-byte struct always fits.
const SOCKADDR_VM_LEN: libc::socklen_t = size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    libc::sockaddr_vm {
        // AF_VSOCK is 40: it fits sa_family_t (u16).
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    }
}

/// A listening AF_VSOCK stream socket.
#[derive(Debug)]
pub(crate) struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds to `port` on any local CID and listens.
    pub(crate) fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; it returns a new fd or -1.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd returned by socket(2) above, open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_vm(libc::VMADDR_CID_ANY, port);
        let addr_ptr = std::ptr::from_ref(&addr).cast::<libc::sockaddr>();
        // SAFETY: `addr_ptr` points to a live, initialised sockaddr_vm of SOCKADDR_VM_LEN bytes,
        // which bind(2) only reads during the call; `fd` is an open socket.
        if unsafe { libc::bind(fd.as_raw_fd(), addr_ptr, SOCKADDR_VM_LEN) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) takes no pointers; `fd` is an open, bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits for a connection; returns the stream and the peer's CID. Retries on EINTR.
    pub(crate) fn accept(&self) -> io::Result<(VsockStream, u32)> {
        loop {
            let mut peer = sockaddr_vm(0, 0);
            let mut peer_len = SOCKADDR_VM_LEN;
            let peer_ptr = std::ptr::from_mut(&mut peer).cast::<libc::sockaddr>();
            // SAFETY: `peer_ptr` and `&mut peer_len` point to live, writable locals; the kernel
            // writes at most `peer_len` (the size of `peer`) bytes to the first and a socklen_t
            // to the second. `self.fd` is an open, listening socket.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    peer_ptr,
                    &mut peer_len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            // SAFETY: `raw` is a fresh fd returned by accept4(2) above, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            return Ok((VsockStream(File::from(fd)), peer.svm_cid));
        }
    }
}

/// A connected AF_VSOCK stream. Reads and writes go through `read(2)`/`write(2)`, which work
/// on any stream socket, via [`File`].
#[derive(Debug)]
pub(crate) struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends `SIGKILL` to every process in process group `pgid`.
///
/// Refuses group ids 0 and 1 — `kill(0)` and `kill(-1)` would mean "our own group" and "every
/// process we may signal" — and ids beyond `pid_t`. A group that no longer exists is not an
/// error.
pub(crate) fn kill_process_group(pgid: u32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "refusing process group 0/1"))?;
    // SAFETY: kill(2) takes no pointers; a negative pid < -1 addresses exactly one process
    // group, checked above.
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_process_group_zero_or_one_is_refused() {
        assert!(kill_process_group(0).is_err());
        assert!(kill_process_group(1).is_err());
        assert!(kill_process_group(u32::MAX).is_err());
    }
}
