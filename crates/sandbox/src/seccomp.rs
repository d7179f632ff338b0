//! Seccomp filters per thread role, deny by default.
//!
//! The policies are data (`crates/sandbox/seccomp/x86_64.json`, seccompiler's JSON format),
//! compiled to BPF when this crate builds. Each thread of a jailed monitor installs its role's
//! filter itself, once the VM is built and before it serves the guest: vCPU threads, virtio
//! device threads, the lazy-restore thread, and the main thread (event loop and control
//! channel) once every other thread has started (so none inherits its filter).
//!
//! A forbidden call raises SIGSYS; the handler writes which thread role made which call to
//! stderr and to the jail's report pipe (the outer process passes it on, bulwark monitor puts
//! it in exit.json), and ends the whole process. Outside a jail (`--no-jail`, tests) nothing
//! is installed.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// One BPF instruction: code, jump if true, jump if false, constant.
type Insn = (u16, u8, u8, u32);

include!(concat!(env!("OUT_DIR"), "/policies.rs"));

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The event loop: console, control channel, snapshots, the end of the VM.
    Main,
    /// A vCPU thread: KVM_RUN and its exits.
    Vcpu,
    /// A virtio device thread: its queues and its host file, tap or sockets.
    Device,
    /// The lazy-restore thread: the snapshot file and the userfaultfd.
    LazyRestore,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::Device => "device",
            Role::LazyRestore => "lazy",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Where the SIGSYS handler also writes its report (-1: nowhere).
pub(crate) static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// This thread's role, for the SIGSYS report.
    static ROLE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unconfined") };
}

/// Turns filters on for this process (the jail does, after its SIGSYS handler is in place).
pub(crate) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether threads of this process install filters.
fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs `role`'s filter on the calling thread (a no-op outside a jail). Irreversible.
pub fn confine_thread(role: Role) -> std::io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    ROLE.with(|r| r.set(role.name()));
    // vCPU and device threads never open a file: a second filter answers EACCES rather than
    // stopping the VM, because glibc itself tries once (see the policy file's comment).
    if matches!(role, Role::Vcpu | Role::Device) {
        apply("no_open")?;
    }
    apply(role.name())
}

/// Confines a device back-end process (`bulwark-backends`; single-threaded): Landlock with no
/// path at all, then `policy`'s filter. A violation is reported as `label` (for example
/// "blk0 back-end") on `report`, its channel to the monitor, and ends only the back-end; the
/// monitor starts another. A no-op outside a jail.
pub fn confine_backend(policy: &str, label: &'static str, report: i32) -> std::io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    ROLE.with(|r| r.set(label));
    REPORT_FD.store(report, Ordering::Relaxed);
    BACKEND.store(true, Ordering::Relaxed);
    crate::landlock_nothing()?;
    apply("no_open")?;
    apply(policy)
}

/// Confines the back-end launcher (single-threaded) with the `launcher` policy, once it has
/// closed every descriptor but its socket. Its violation report goes to stderr only (the
/// jail's report pipe is closed in it). A no-op outside a jail.
pub fn confine_launcher() -> std::io::Result<()> {
    REPORT_FD.store(-1, Ordering::Relaxed);
    if !enabled() {
        return Ok(());
    }
    ROLE.with(|r| r.set("back-end launcher"));
    BACKEND.store(true, Ordering::Relaxed);
    apply("no_open")?;
    apply("launcher")
}

/// The calling process is a back-end (the SIGSYS report says it is restarted, not that the
/// monitor stops).
pub(crate) static BACKEND: AtomicBool = AtomicBool::new(false);

/// Makes system call `nr` with zero arguments (the back-ends' test hook: a call their policy
/// forbids).
pub fn forbidden_call(nr: i64) -> std::io::Result<i64> {
    crate::sys::raw_syscall(nr)
}

fn apply(name: &str) -> std::io::Result<()> {
    let (_, prog) = POLICIES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| std::io::Error::other(format!("no seccomp policy {name}")))?;
    let prog: Vec<seccompiler::sock_filter> = prog
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect();
    seccompiler::apply_filter(&prog).map_err(|e| std::io::Error::other(e.to_string()))
}

/// For the jail's tests: confines a new thread as `role` and makes system call `nr` (which the
/// policy should forbid: the process then ends with the report). Returns if it was allowed.
pub fn probe_forbidden(role: Role, nr: i64) -> std::io::Result<i64> {
    std::thread::spawn(move || -> std::io::Result<i64> {
        confine_thread(role)?;
        crate::sys::raw_syscall(nr)
    })
    .join()
    .map_err(|_| std::io::Error::other("probe thread panicked"))?
}

/// The role the SIGSYS handler names (async-signal-safe: a const-initialised thread local).
pub(crate) fn current_role() -> &'static str {
    ROLE.try_with(|r| r.get()).unwrap_or("?")
}

/// The name of x86_64 system call `nr`, for the ones a monitor uses or an attacker would try.
pub fn syscall_name(nr: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (0, "read"),
        (1, "write"),
        (2, "open"),
        (3, "close"),
        (4, "stat"),
        (5, "fstat"),
        (7, "poll"),
        (8, "lseek"),
        (9, "mmap"),
        (10, "mprotect"),
        (11, "munmap"),
        (12, "brk"),
        (13, "rt_sigaction"),
        (14, "rt_sigprocmask"),
        (15, "rt_sigreturn"),
        (16, "ioctl"),
        (17, "pread64"),
        (18, "pwrite64"),
        (19, "readv"),
        (20, "writev"),
        (21, "access"),
        (22, "pipe"),
        (23, "select"),
        (24, "sched_yield"),
        (25, "mremap"),
        (28, "madvise"),
        (32, "dup"),
        (33, "dup2"),
        (35, "nanosleep"),
        (39, "getpid"),
        (41, "socket"),
        (42, "connect"),
        (43, "accept"),
        (44, "sendto"),
        (45, "recvfrom"),
        (46, "sendmsg"),
        (47, "recvmsg"),
        (48, "shutdown"),
        (49, "bind"),
        (50, "listen"),
        (51, "getsockname"),
        (52, "getpeername"),
        (53, "socketpair"),
        (54, "setsockopt"),
        (55, "getsockopt"),
        (56, "clone"),
        (57, "fork"),
        (58, "vfork"),
        (59, "execve"),
        (60, "exit"),
        (61, "wait4"),
        (62, "kill"),
        (72, "fcntl"),
        (73, "flock"),
        (74, "fsync"),
        (75, "fdatasync"),
        (76, "truncate"),
        (77, "ftruncate"),
        (78, "getdents"),
        (79, "getcwd"),
        (80, "chdir"),
        (82, "rename"),
        (83, "mkdir"),
        (84, "rmdir"),
        (85, "creat"),
        (86, "link"),
        (87, "unlink"),
        (88, "symlink"),
        (89, "readlink"),
        (90, "chmod"),
        (92, "chown"),
        (95, "umask"),
        (96, "gettimeofday"),
        (97, "getrlimit"),
        (98, "getrusage"),
        (101, "ptrace"),
        (102, "getuid"),
        (105, "setuid"),
        (106, "setgid"),
        (110, "getppid"),
        (112, "setsid"),
        (117, "setresuid"),
        (126, "capset"),
        (131, "sigaltstack"),
        (133, "mknod"),
        (137, "statfs"),
        (138, "fstatfs"),
        (155, "pivot_root"),
        (157, "prctl"),
        (158, "arch_prctl"),
        (161, "chroot"),
        (165, "mount"),
        (166, "umount2"),
        (169, "reboot"),
        (170, "sethostname"),
        (175, "init_module"),
        (186, "gettid"),
        (200, "tkill"),
        (202, "futex"),
        (204, "sched_getaffinity"),
        (217, "getdents64"),
        (218, "set_tid_address"),
        (228, "clock_gettime"),
        (230, "clock_nanosleep"),
        (231, "exit_group"),
        (232, "epoll_wait"),
        (233, "epoll_ctl"),
        (234, "tgkill"),
        (257, "openat"),
        (262, "newfstatat"),
        (263, "unlinkat"),
        (264, "renameat"),
        (270, "pselect6"),
        (271, "ppoll"),
        (272, "unshare"),
        (273, "set_robust_list"),
        (281, "epoll_pwait"),
        (284, "eventfd"),
        (285, "fallocate"),
        (288, "accept4"),
        (290, "eventfd2"),
        (291, "epoll_create1"),
        (292, "dup3"),
        (293, "pipe2"),
        (295, "preadv"),
        (296, "pwritev"),
        (302, "prlimit64"),
        (307, "sendmmsg"),
        (310, "process_vm_readv"),
        (311, "process_vm_writev"),
        (313, "finit_module"),
        (316, "renameat2"),
        (317, "seccomp"),
        (318, "getrandom"),
        (319, "memfd_create"),
        (321, "bpf"),
        (322, "execveat"),
        (323, "userfaultfd"),
        (332, "statx"),
        (334, "rseq"),
        (425, "io_uring_setup"),
        (435, "clone3"),
        (439, "faccessat2"),
        (444, "landlock_create_ruleset"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("unknown", |(_, name)| name)
}
