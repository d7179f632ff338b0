//! A small userfaultfd binding: the monitor fills guest RAM on first touch (lazy restore).
//!
//! Only what lazy restore needs: missing-page registration, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`,
//! unregistering, and reading page-fault events. The `userfaultfd` crate would do the same but
//! generates its bindings with bindgen at build time (libclang on every build machine); the UAPI
//! used here is five fixed structures.
//!
//! Faults taken inside the kernel count too: KVM reading guest memory on a vCPU's behalf, or a
//! `copy_to_user` into guest RAM, waits for the handler like a guest access does. That needs a
//! userfaultfd that is not user-mode-only: the syscall grants one to a process with
//! CAP_SYS_PTRACE (or where `vm.unprivileged_userfaultfd` is 1), `/dev/userfaultfd` to whoever
//! may open it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFD_API: u64 = 0xaa;
const UFFDIO: u32 = 0xaa;
const REGISTER_MODE_MISSING: u64 = 1;
const EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeropageArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (packed, 32 bytes); only the page-fault member of its union is read.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Msg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3f, ApiArg);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, RegisterArg);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, Range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, CopyArg);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, ZeropageArg);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// A userfaultfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Userfault {
    file: File,
}

/// How filling a range ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every byte was placed.
    Done,
    /// Part of the range was already present (filled earlier, or never registered); the
    /// rest is as it was.
    Exists,
}

/// Runs a fill ioctl until `len` bytes are placed: `step(done)` makes one call from `done` on
/// and returns its result and how many bytes it placed (the kernel may stop early: EAGAIN
/// means go on, EEXIST that a page was there already).
fn fill_in_steps(len: u64, mut step: impl FnMut(u64) -> (i32, i64)) -> io::Result<Fill> {
    let mut done = 0u64;
    while done < len {
        let (r, placed) = step(done);
        if placed > 0 {
            done += placed as u64;
        }
        if r < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => continue,
                Some(libc::EEXIST) => return Ok(Fill::Exists),
                _ => return Err(io::Error::last_os_error()),
            }
        }
    }
    Ok(Fill::Done)
}

fn check(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Userfault {
    /// Opens a userfaultfd that also catches faults taken in the kernel, and does the API
    /// handshake.
    pub fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes one integer flags argument and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        let file = if fd >= 0 {
            // SAFETY: `fd` was just returned by the syscall and is owned by nobody else.
            unsafe { File::from_raw_fd(fd) }
        } else {
            let first = io::Error::last_os_error();
            let dev = File::open("/dev/userfaultfd").map_err(|_| {
                io::Error::new(
                    first.kind(),
                    format!(
                        "cannot create a userfaultfd ({first}); lazy restore needs CAP_SYS_PTRACE, \
                         vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd"
                    ),
                )
            })?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns
            // a new fd.
            let fd = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW() as _,
                    flags as libc::c_ulong,
                )
            };
            check(fd)?;
            // SAFETY: as above, a fresh fd we own.
            unsafe { File::from_raw_fd(fd) }
        };
        let mut api = ApiArg {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`.
        check(unsafe { ioctl_with_mut_ref(&file, UFFDIO_API_IOCTL(), &mut api) })?;
        Ok(Self { file })
    }

    /// Registers `[start, start + len)` for missing-page faults: from now on, a first touch
    /// of any page there waits until this fd fills it.
    ///
    /// The range must be a mapping of this process that nothing else fills meanwhile; a page
    /// that is already present is not affected.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; it changes
        // how faults in the range are served, not the memory's content.
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut arg) })
    }

    /// Ends the registration; threads waiting on a fault in the range are woken and served
    /// by the kernel as usual (missing pages read as zero).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = Range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_UNREGISTER(), &mut arg) })
    }

    /// Places `src` at `dst` (page-aligned, registered, missing) and wakes whoever waits there.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Fill> {
        fill_in_steps(src.len() as u64, |done| {
            let mut arg = CopyArg {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: src.len() as u64 - done,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes from `src` (inside the slice we borrow)
            // and fills only pages of a registered range that are missing: no memory the
            // program already uses changes.
            let r = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut arg) };
            (r, arg.copy)
        })
    }

    /// Fills `[start, start + len)` (page-aligned, registered, missing) with zeros and wakes
    /// whoever waits there.
    pub fn zero(&self, start: u64, len: u64) -> io::Result<Fill> {
        fill_in_steps(len, |done| {
            let mut arg = ZeropageArg {
                range: Range {
                    start: start + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE fills only missing pages of a registered range.
            let r = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut arg) };
            (r, arg.zeropage)
        })
    }

    /// Waits up to `timeout_ms` (-1: forever) for page faults and returns their addresses
    /// (at most 32 at a time; empty on timeout). Other events are ignored.
    pub fn faults(&self, timeout_ms: i32) -> io::Result<Vec<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(Vec::new());
        }
        let mut msgs = [Msg::default(); 32];
        let size = std::mem::size_of_val(&msgs);
        // SAFETY: read into the array we own, at most its size; `Msg` is plain data for which
        // any bytes are valid.
        let n = unsafe { libc::read(self.file.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let count = n as usize / std::mem::size_of::<Msg>();
        Ok(msgs[..count]
            .iter()
            .filter(|m| m.event == EVENT_PAGEFAULT)
            .map(|m| m.address)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use vm_memory::{Bytes, GuestAddress};

    const _: () = assert!(std::mem::size_of::<Msg>() == 32);

    /// A real kernel serves a thread's first touches from our fills: copied pages, zeroed
    /// pages, and after unregistering, plain zero pages.
    #[test]
    fn first_touch_waits_for_the_handler_and_sees_its_data() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let host = ram.regions()[0].2;
        let uffd = Userfault::new().expect("userfaultfd (tests run as root)");
        uffd.register(host, 4 << 20).unwrap();
        let mem = ram.memory().clone();
        let toucher = std::thread::spawn(move || {
            let mut a = [0u8; 4];
            mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
            let mut b = [1u8; 4];
            mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
            (a, b)
        });
        let mut served = Vec::new();
        while served.len() < 2 {
            for addr in uffd.faults(5000).unwrap() {
                let page = addr & !0xfff;
                let off = page - host;
                served.push(off);
                if off == 0x1000 {
                    assert_eq!(uffd.copy(page, &[0xab; 4096]).unwrap(), Fill::Done);
                } else {
                    assert_eq!(uffd.zero(page, 4096).unwrap(), Fill::Done);
                }
            }
        }
        let (a, b) = toucher.join().unwrap();
        assert_eq!(a, [0xab; 4]);
        assert_eq!(b, [0; 4]);
        assert_eq!(served, vec![0x1000, 0x20_0000]);
        // Filling a present page reports it instead of overwriting.
        assert_eq!(uffd.copy(host + 0x1000, &[1; 4096]).unwrap(), Fill::Exists);
        uffd.unregister(host, 4 << 20).unwrap();
        let mut c = [1u8; 4];
        ram.memory()
            .read_slice(&mut c, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(c, [0; 4]);
        let mut a = [0u8; 4];
        ram.memory()
            .read_slice(&mut a, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(a, [0xab; 4]);
    }
}
