//! The back-end launcher: a small process the monitor forks while it still has one thread and
//! before guest memory exists. It forks each back-end on request, so a back-end begins as a
//! copy of a monitor that had not yet mapped the guest, opened devices or started threads, and
//! holds exactly the descriptors it is sent. (Forking the running monitor instead would copy
//! guest memory mappings and locks held by other threads; executing a fresh binary would need
//! the binary inside the jail and `execve` in the monitor's seccomp policies.)
//!
//! Monitor → launcher, one datagram per back-end: `BWLN`, kind (u16), flags (u16),
//! incarnation (u32), name (16 bytes, NUL-padded), with the back-end's descriptors attached:
//! its end of its channel, its I/O window, and its resource (an image file, a tap) if its kind
//! has one ([`Kind::resources`]). The launcher
//! answers with the new process's pid (i32; negative: an errno).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

static GLOBAL: OnceLock<Arc<Launcher>> = OnceLock::new();

use bulwark_sandbox::{Forked, fork};

use crate::sys;
use crate::{Kind, ownership};

const MAGIC: u32 = u32::from_le_bytes(*b"BWLN");
const REQUEST_LEN: usize = 28;
/// Longest back-end name (it becomes part of the process name `bw-<name>`).
pub const MAX_NAME: usize = 16;
/// Spawn flag: the resource was opened with `O_DIRECT`.
pub const FLAG_DIRECT: u16 = 1;

/// What the launcher is asked to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spawn {
    pub kind: Kind,
    pub flags: u16,
    pub incarnation: u32,
    pub name: String,
}

impl Spawn {
    fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.incarnation.to_le_bytes());
        let n = self.name.len().min(MAX_NAME);
        b[12..12 + n].copy_from_slice(&self.name.as_bytes()[..n]);
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != REQUEST_LEN || b[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let kind = Kind::from_u16(u16::from_le_bytes([b[4], b[5]]))?;
        let name = &b[12..];
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let name = std::str::from_utf8(&name[..end]).ok()?;
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return None;
        }
        Some(Self {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            incarnation: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            name: name.to_owned(),
        })
    }
}

/// The monitor's handle on its launcher. Dropping it ends the launcher (and, through
/// `PR_SET_PDEATHSIG`, the back-ends it started do not outlive the monitor either).
#[derive(Debug)]
pub struct Launcher {
    sock: Mutex<OwnedFd>,
    pid: libc::pid_t,
}

impl Launcher {
    /// Forks the launcher. Must be called while the process has one thread and before guest
    /// memory is mapped.
    pub fn start() -> io::Result<Self> {
        let n = bulwark_sandbox::threads();
        if n != 1 {
            return Err(io::Error::other(format!(
                "the back-end launcher must be started before any thread ({n} run); this is a bug in bulwark"
            )));
        }
        let (ours, theirs) = sys::seqpacket_pair()?;
        match fork()? {
            Forked::Parent(pid) => {
                drop(theirs);
                Ok(Self {
                    sock: Mutex::new(ours),
                    pid,
                })
            }
            Forked::Child => {
                drop(ours);
                serve(theirs)
            }
        }
    }

    /// Makes `self` the process's launcher, which block devices with a back-end use.
    pub fn install(self) -> Arc<Self> {
        let l = Arc::new(self);
        let _ = GLOBAL.set(l.clone());
        l
    }

    /// The process's launcher, if one was installed.
    pub fn global() -> Option<Arc<Self>> {
        GLOBAL.get().cloned()
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Starts a back-end with `channel` (its end), `window` and `resource` (which its kind
    /// must or must not have). Returns its pid.
    pub fn spawn(
        &self,
        what: &Spawn,
        channel: BorrowedFd<'_>,
        window: BorrowedFd<'_>,
        resource: Option<BorrowedFd<'_>>,
    ) -> io::Result<libc::pid_t> {
        let mut fds = vec![channel, window];
        fds.extend(resource);
        if fds.len() != 2 + what.kind.resources() {
            return Err(io::Error::other(format!(
                "a {:?} back-end takes {} resource descriptors; this is a bug in bulwark",
                what.kind,
                what.kind.resources()
            )));
        }
        for &fd in &fds[1..] {
            ownership::check_exportable(fd).map_err(io::Error::other)?;
        }
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        sys::send(sock.as_fd(), &what.encode(), &fds)?;
        let mut reply = [0u8; 4];
        let (n, _) = sys::recv(sock.as_fd(), &mut reply)?;
        if n != 4 {
            return Err(io::Error::other(
                "the back-end launcher is gone (it may have been killed)",
            ));
        }
        let pid = i32::from_le_bytes(reply);
        if pid < 0 {
            return Err(io::Error::from_raw_os_error(-pid));
        }
        Ok(pid)
    }
}

/// The launcher's life: fork a back-end for each request until the monitor goes away.
fn serve(sock: OwnedFd) -> ! {
    sys::set_name("bw-launcher");
    if sys::die_with_parent().is_err() || sys::ignore_children().is_err() {
        sys::exit_now(1);
    }
    sys::close_all_but(&[sock.as_raw_fd()]);
    if let Err(e) = bulwark_sandbox::seccomp::confine_launcher() {
        eprintln!("bulwark: the back-end launcher cannot confine itself: {e}");
        sys::exit_now(1);
    }
    let mut buf = [0u8; 64];
    loop {
        let (n, fds) = match sys::recv(sock.as_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => sys::exit_now(0),
            Ok(r) => r,
        };
        let reply = match Spawn::decode(&buf[..n]) {
            Some(what) if fds.len() == 2 + what.kind.resources() => match fork() {
                Ok(Forked::Child) => {
                    let keep: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                    sys::close_all_but(&keep);
                    crate::server::run(&what, fds)
                }
                Ok(Forked::Parent(pid)) => pid,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            },
            _ => -libc::EINVAL,
        };
        if sys::send(sock.as_fd(), &reply.to_le_bytes(), &[]).is_err() {
            sys::exit_now(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_requests_round_trip_and_bad_ones_are_refused() {
        let s = Spawn {
            kind: Kind::Block,
            flags: FLAG_DIRECT,
            incarnation: 3,
            name: "blk0".into(),
        };
        assert_eq!(Spawn::decode(&s.encode()), Some(s.clone()));
        let mut b = s.encode();
        b[12] = b'/';
        assert_eq!(Spawn::decode(&b), None, "names are plain");
        let mut b = s.encode();
        b[4] = 9;
        assert_eq!(Spawn::decode(&b), None, "unknown kind");
        assert_eq!(Spawn::decode(&s.encode()[..20]), None);
    }
}
