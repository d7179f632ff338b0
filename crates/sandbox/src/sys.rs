//! The system calls the jail makes, each wrapped once with its safety argument. This is the
//! crate's only `unsafe`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

pub fn euid() -> libc::uid_t {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only and touches no memory of ours.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// What `fork` returned on this side.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// Forks. The caller has checked that this process has one thread, so the child's copy of
/// every lock and allocator is consistent.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the process is single-threaded (checked by the caller), which is what makes
    // fork safe to continue from in Rust.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// Waits for `pid`; its raw wait status.
pub fn wait(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status through a pointer to our live local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the prctl options used here take integer arguments only.
    check(unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let source = source.map(cpath).transpose()?;
    let target = cpath(target)?;
    let ptr = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that lives across the call.
    check(unsafe {
        libc::mount(
            ptr(source.as_deref()),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    })
    .map(drop)
}

pub fn umount_detach(target: &Path) -> io::Result<()> {
    let target = cpath(target)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let (new_root, put_old) = (cpath(new_root)?, cpath(put_old)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(r as libc::c_int).map(drop)
}

pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    check(unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit from a live local.
    check(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties this thread's effective, permitted and inheritable capability sets (threads created
/// afterwards inherit the empty sets).
pub fn clear_capabilities() -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data words from live locals.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(r as libc::c_int).map(drop)
}

/// This thread's effective capability set (bits 0..64).
pub fn effective_capabilities() -> io::Result<u64> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget reads the header and writes two data words into our live array.
    let r = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    check(r as libc::c_int)?;
    Ok(u64::from(data[0].effective) | u64::from(data[1].effective) << 32)
}

/// The child the parent forwards termination signals to (0: none yet).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes integers only.
        unsafe { libc::kill(child, sig) };
    }
}

/// In the parent: SIGINT, SIGTERM, SIGHUP and SIGQUIT go on to `child`.
pub fn forward_signals_to(child: libc::pid_t) -> io::Result<()> {
    CHILD.store(child, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: sigaction is plain data; all-zero is a valid starting value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = forward as *const () as usize;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: installs a handler that only calls the async-signal-safe kill; `act` lives
        // across the call.
        check(unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) })?;
    }
    Ok(())
}

/// Ends this process the way `sig` would, with the default action.
pub fn die_by(sig: libc::c_int) -> ! {
    // SAFETY: restoring the default disposition of a signal touches no memory of ours.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
    // SAFETY: raise takes an integer.
    unsafe { libc::raise(sig) };
    std::process::exit(128 + sig)
}

/// Landlock's ABI version, or the error (ENOSYS, EOPNOTSUPP: the kernel has none).
pub fn landlock_abi() -> io::Result<i64> {
    // SAFETY: with a null attribute, size 0 and the VERSION flag, the call only returns the
    // ABI version.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new Landlock ruleset handling `access` (filesystem rights).
pub fn landlock_ruleset(access: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: the attribute is one u64 (the version-1 `struct landlock_ruleset_attr`) that
    // lives across the call, and its size is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &access,
            std::mem::size_of::<u64>(),
            0u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call returned a new fd that nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// Allows `access` beneath the file or directory `parent` (an O_PATH fd).
pub fn landlock_allow(
    ruleset: &std::os::fd::OwnedFd,
    parent: &std::fs::File,
    access: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let rule = PathBeneath {
        allowed_access: access,
        parent_fd: parent.as_raw_fd(),
    };
    // SAFETY: LANDLOCK_RULE_PATH_BENEATH (1) reads one packed `landlock_path_beneath_attr`
    // from a live local.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            1u32,
            &rule,
            0u32,
        )
    };
    check(r as libc::c_int).map(drop)
}

/// Confines this thread (and the threads it starts) to the ruleset.
pub fn landlock_restrict(ruleset: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: takes an fd and flags only.
    let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    check(r as libc::c_int).map(drop)
}

/// Writes all of `buf` to `fd`, from a signal handler (write only).
fn write_all_raw(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: write from a live slice; async-signal-safe.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// Appends `s` to `out` at `len`, as far as it fits.
fn push(out: &mut [u8], len: &mut usize, s: &[u8]) {
    let n = s.len().min(out.len() - *len);
    out[*len..*len + n].copy_from_slice(&s[..n]);
    *len += n;
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // `si_syscall` of the SIGSYS member of siginfo's union: after si_signo, si_errno, si_code,
    // padding (16 bytes) and si_call_addr (8).
    // The field lies within siginfo's 128 bytes, which the kernel passes to SA_SIGINFO handlers.
    let field = info.cast::<u8>().wrapping_add(24).cast::<i32>();
    // SAFETY: `field` points into the valid siginfo (see above).
    let nr = unsafe { field.read_unaligned() };
    let mut msg = [0u8; 256];
    let mut len = 0;
    push(&mut msg, &mut len, b"bulwark: seccomp: the ");
    push(
        &mut msg,
        &mut len,
        crate::seccomp::current_role().as_bytes(),
    );
    push(
        &mut msg,
        &mut len,
        b" thread made the forbidden system call ",
    );
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(&mut msg, &mut len, &digits[i..]);
    push(&mut msg, &mut len, b" (");
    push(
        &mut msg,
        &mut len,
        crate::seccomp::syscall_name(i64::from(nr)).as_bytes(),
    );
    // The first two arguments, as the registers held them (rdi, rsi), to tell an ioctl or a
    // socket family apart.
    let uc = ctx.cast::<libc::ucontext_t>();
    if !uc.is_null() {
        // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted context.
        let regs = unsafe { (*uc).uc_mcontext.gregs };
        for (label, reg) in [
            (&b", args "[..], libc::REG_RDI),
            (&b", "[..], libc::REG_RSI),
        ] {
            push(&mut msg, &mut len, label);
            push(&mut msg, &mut len, b"0x");
            let v = regs[reg as usize] as u64;
            let mut hex = [0u8; 16];
            let mut n = 0;
            let mut shift = 60i32;
            while shift >= 0 {
                let d = ((v >> shift) & 0xf) as u8;
                if n > 0 || d != 0 || shift == 0 {
                    hex[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
                    n += 1;
                }
                shift -= 4;
            }
            push(&mut msg, &mut len, &hex[..n]);
        }
    }
    if crate::seccomp::BACKEND.load(Ordering::Relaxed) {
        push(&mut msg, &mut len, b"); the back-end stops\n");
    } else {
        push(&mut msg, &mut len, b"); the monitor stops\n");
    }
    write_all_raw(2, &msg[..len]);
    let fd = crate::seccomp::REPORT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        write_all_raw(fd, &msg[..len]);
    }
    // SAFETY: _exit ends the process at once; async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Makes system call `nr` with zero arguments (for the jail's tests: a call a policy forbids).
pub fn raw_syscall(nr: i64) -> io::Result<i64> {
    // SAFETY: the calls the tests make with zero arguments (ptrace(PTRACE_TRACEME), socket(0,
    // 0, 0), mount of nothing, ...) touch no memory of ours.
    let r = unsafe { libc::syscall(nr, 0usize, 0usize, 0usize, 0usize) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Installs the SIGSYS handler that reports a seccomp violation and ends the process.
pub fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid starting value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that uses only write and _exit; `act` lives across the call.
    check(unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) }).map(drop)
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into our array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    let r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    Ok((r, w))
}
