//! The jail every bulwark monitor runs in (the survey's TCB reduction: the code a hostile guest
//! talks to is confined, so a guest that takes over its monitor gets no further).
//!
//! [`enter`] is called by the monitor process itself, early, while it still has one thread:
//!
//! 1. a cgroup with CPU, memory and pids limits (v2 or v1, as the host mounts them);
//! 2. a new PID namespace: the process forks; the parent stays outside as a small waiter that
//!    forwards termination signals and exits as the child does, the child (PID 1 inside) goes on
//!    and dies with the parent (`PR_SET_PDEATHSIG`);
//! 3. new mount, IPC, UTS and cgroup namespaces, and a network namespace with nothing in it
//!    unless the VM has a tap (a tap lives in the host's namespace);
//! 4. a root that is an empty read-only tmpfs holding only what this VM needs, each path bind
//!    mounted at its own absolute path (read-only unless the VM writes it) — its image or
//!    payload, its drives, its vsock socket directory, its state directory, its device nodes —
//!    and a fresh `/proc`; the old root is detached (`pivot_root`);
//! 5. rlimits (open files, no core dumps, no locked memory), `no_new_privs`, and every
//!    capability dropped (bounding, ambient, effective, permitted, inheritable sets), before any
//!    other thread exists, so every thread the monitor starts later has none either.
//!
//! Whatever needs a privilege (opening or creating a tap) is done before [`enter`]; the rest
//! of the monitor then builds and runs the VM inside the jail with its ordinary code, since every
//! path it was given still resolves to the same file.

mod cgroup;
pub mod seccomp;
mod sys;

use std::path::{Path, PathBuf};

pub use cgroup::Cgroup;
pub use sys::{Forked, fork};

/// What a jailed monitor may see and use.
#[derive(Debug, Clone, Default)]
pub struct Jail {
    /// Files and directories of the host, each visible at its own path.
    pub binds: Vec<Bind>,
    /// Device nodes (for example `/dev/kvm`), each visible at its own path, read-write.
    pub devices: Vec<PathBuf>,
    /// Keep the host's network namespace (the VM uses a tap there); otherwise the jail has an
    /// empty one.
    pub host_network: bool,
    pub limits: Limits,
    /// Called in the outer process when the jailed one was stopped by its seccomp policy,
    /// with the report (which thread role, which system call).
    pub on_violation: Option<fn(&str)>,
}

/// A host path the jail shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

impl Bind {
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
        }
    }

    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
        }
    }
}

/// Resource limits of a jailed monitor.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// cgroup memory limit (guest RAM is charged to it).
    pub memory_bytes: Option<u64>,
    /// cgroup CPU limit, in CPUs.
    pub cpus: Option<f64>,
    /// cgroup limit on processes and threads.
    pub pids: Option<u64>,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "the jail must be entered before any thread starts ({0} threads run); this is a bug in bulwark"
    )]
    Threads(usize),
    #[error(
        "the jail needs root (it creates namespaces, mounts and a cgroup before it drops every privilege); run bulwark as root, or pass --no-jail (less safe)"
    )]
    NotRoot,
    #[error(
        "cannot create the jail's namespaces: {0}; run bulwark as root (it needs CAP_SYS_ADMIN to build the jail), or pass --no-jail (less safe)"
    )]
    Namespaces(#[source] std::io::Error),
    #[error("cannot start the jailed monitor process: {0}")]
    Fork(#[source] std::io::Error),
    #[error("cannot {what} {}: {source}", path.display())]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot put {} in the jail: it does not exist; check the path in the VM's configuration", .0.display())]
    Missing(PathBuf),
    #[error("cannot set up the cgroup at {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drop privileges ({what}): {source}")]
    Privileges {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the jail applied, in words (logged by the monitor, shown by `--verbose`).
#[derive(Debug, Clone, Default)]
pub struct Entered {
    pub applied: Vec<String>,
}

/// How many threads this process has (1 when `/proc` cannot say).
pub fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// Puts this process in `jail` (see the crate documentation). Returns in the jailed child;
/// the parent never returns (it exits as the child does).
pub fn enter(jail: &Jail) -> Result<Entered, JailError> {
    if sys::euid() != 0 {
        return Err(JailError::NotRoot);
    }
    let n = threads();
    if n != 1 {
        return Err(JailError::Threads(n));
    }
    let mut applied = Vec::new();
    for b in &jail.binds {
        if !b.path.exists() {
            return Err(JailError::Missing(b.path.clone()));
        }
    }
    let root = jail_root_dir()?;
    let cgroup = match Cgroup::create(std::process::id(), &jail.limits) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir(&root);
            return Err(e);
        }
    };
    match &cgroup {
        Some(c) => applied.push(format!(
            "cgroup {}: cpus {:?}, memory {:?} bytes, pids {:?}",
            c.version, jail.limits.cpus, jail.limits.memory_bytes, jail.limits.pids
        )),
        None => applied.push("cgroup: none (the host mounts no cgroup hierarchy)".into()),
    }
    if let Err(e) = sys::unshare(libc::CLONE_NEWPID) {
        let _ = std::fs::remove_dir(&root);
        return Err(JailError::Namespaces(e));
    }
    let (report_r, report_w) = sys::pipe().map_err(JailError::Fork)?;
    match sys::fork().map_err(JailError::Fork)? {
        sys::Forked::Parent(child) => {
            drop(report_w);
            wait_and_exit(child, &root, cgroup.as_ref(), report_r, jail.on_violation)
        }
        sys::Forked::Child => {}
    }
    drop(report_r);
    // The jailed child from here on. Errors end it; the parent reports its exit.
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).map_err(|source| {
        JailError::Privileges {
            what: "PR_SET_PDEATHSIG",
            source,
        }
    })?;
    if let Some(c) = &cgroup {
        c.join()?;
    }
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
    if !jail.host_network {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags).map_err(JailError::Namespaces)?;
    applied.push(format!(
        "namespaces: pid mount ipc uts cgroup{}",
        if jail.host_network {
            " (host network: the VM has a tap)"
        } else {
            " net (empty)"
        }
    ));
    build_root(jail, &root)?;
    applied.push(format!(
        "root: read-only tmpfs with {} paths and {} devices, fresh /proc",
        jail.binds.len(),
        jail.devices.len()
    ));
    let _ = sys::sethostname("bulwark");
    limit_resources(&jail.limits)?;
    applied.push(format!(
        "rlimits: nofile {}, core 0, memlock 0",
        jail.limits.open_files
    ));
    drop_privileges()?;
    applied.push("no_new_privs, no capabilities".into());
    applied.push(landlock(jail)?);
    // Seccomp: each thread installs its role's filter when it starts serving the VM.
    sys::install_sigsys_handler().map_err(|source| JailError::Privileges {
        what: "SIGSYS handler",
        source,
    })?;
    {
        use std::os::fd::IntoRawFd;
        seccomp::REPORT_FD.store(report_w.into_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    }
    seccomp::enable();
    applied.push("seccomp: a filter per thread role (main, vcpu, device, lazy)".into());
    Ok(Entered { applied })
}

/// A fresh, empty directory for the jail's root to be mounted on (in the jail's own mount
/// namespace: on the host it stays an empty directory). The name carries the pid and the time,
/// since a jail whose outer process was killed leaves its directory behind and pids repeat.
fn jail_root_dir() -> Result<PathBuf, JailError> {
    let pid = std::process::id();
    let mut last = None;
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let root = std::env::temp_dir().join(format!("bulwark-jail-{pid}-{nanos:08x}{attempt:x}"));
        match std::fs::create_dir(&root) {
            Ok(()) => return Ok(root),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((root, e)),
            Err(source) => {
                return Err(JailError::Mount {
                    what: "create the jail root",
                    path: root,
                    source,
                });
            }
        }
    }
    let (path, source) = last.expect("16 attempts");
    Err(JailError::Mount {
        what: "create the jail root",
        path,
        source,
    })
}

/// The parent's life: wait for the jailed child, clean up, exit as it did.
fn wait_and_exit(
    child: libc::pid_t,
    root: &Path,
    cgroup: Option<&Cgroup>,
    mut report: std::fs::File,
    on_violation: Option<fn(&str)>,
) -> ! {
    use std::io::Read;
    let _ = sys::forward_signals_to(child);
    let status = sys::wait(child);
    let _ = std::fs::remove_dir(root);
    if let Some(c) = cgroup {
        let _ = c.remove();
    }
    // The child's end of the pipe closed when it died: this read does not block.
    let mut text = String::new();
    let _ = (&mut report).take(4096).read_to_string(&mut text);
    if let (Some(hook), Some(line)) = (on_violation, text.lines().next()) {
        hook(line.trim_start_matches("bulwark: "));
    }
    match status {
        Ok(s) if libc::WIFEXITED(s) => std::process::exit(libc::WEXITSTATUS(s)),
        Ok(s) if libc::WIFSIGNALED(s) => {
            let sig = libc::WTERMSIG(s);
            if sig == libc::SIGSYS {
                eprintln!(
                    "bulwark: the jailed monitor made a system call its seccomp policy forbids and was killed"
                );
            }
            sys::die_by(sig)
        }
        _ => std::process::exit(125),
    }
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Mount { what, path, source }
}

/// Makes `root` the jail's `/`: a tmpfs with each bind and device at its own path, `/proc`,
/// then `pivot_root` and the old root detached.
fn build_root(jail: &Jail, root: &Path) -> Result<(), JailError> {
    // Nothing mounted from here on propagates back to the host.
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(mount_err("make private", Path::new("/")))?;
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(c"mode=0755,size=1m"),
    )
    .map_err(mount_err("mount a tmpfs on", root))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let place = |src: &Path| -> Result<PathBuf, JailError> {
        let dst = inside(src);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(mount_err("create", parent))?;
        }
        if src.is_dir() {
            std::fs::create_dir_all(&dst).map_err(mount_err("create", &dst))?;
        } else if !dst.exists() {
            std::fs::File::create(&dst).map_err(mount_err("create", &dst))?;
        }
        sys::mount(Some(src), &dst, None, libc::MS_BIND | libc::MS_REC, None)
            .map_err(mount_err("bind", src))?;
        Ok(dst)
    };
    for b in &jail.binds {
        let dst = place(&b.path)?;
        if !b.writable {
            sys::mount(
                None,
                &dst,
                None,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                None,
            )
            .map_err(mount_err("make read-only", &b.path))?;
        }
    }
    for d in &jail.devices {
        if !d.exists() {
            return Err(JailError::Missing(d.clone()));
        }
        let dst = place(d)?;
        sys::mount(
            None,
            &dst,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC,
            None,
        )
        .map_err(mount_err("restrict", d))?;
    }
    let proc = root.join("proc");
    std::fs::create_dir_all(&proc).map_err(mount_err("create", &proc))?;
    sys::mount(
        Some(Path::new("proc")),
        &proc,
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(mount_err("mount /proc at", &proc))?;
    let old = root.join(".old-root");
    std::fs::create_dir(&old).map_err(mount_err("create", &old))?;
    match sys::pivot_root(root, &old) {
        Ok(()) => {
            std::env::set_current_dir("/").map_err(mount_err("enter", Path::new("/")))?;
            sys::umount_detach(Path::new("/.old-root"))
                .map_err(mount_err("detach the old root", Path::new("/.old-root")))?;
            std::fs::remove_dir("/.old-root")
                .map_err(mount_err("remove", Path::new("/.old-root")))?;
        }
        // The host runs from its initramfs (rootfs cannot be pivoted away from, as in the
        // nested rig): move the new root over / and chroot into it. The old root stays
        // mounted underneath but unreachable: no directory fd points there, and leaving a
        // chroot takes CAP_SYS_CHROOT, which goes below.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            std::fs::remove_dir(&old).map_err(mount_err("remove", &old))?;
            std::env::set_current_dir(root).map_err(mount_err("enter", root))?;
            sys::mount(Some(root), Path::new("/"), None, libc::MS_MOVE, None)
                .map_err(mount_err("move the jail root over /", root))?;
            sys::chroot(Path::new(".")).map_err(mount_err("chroot into", root))?;
            std::env::set_current_dir("/").map_err(mount_err("enter", Path::new("/")))?;
        }
        Err(e) => return Err(mount_err("pivot_root into", root)(e)),
    }
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )
    .map_err(mount_err("make read-only", Path::new("/")))?;
    Ok(())
}

fn limit_resources(limits: &Limits) -> Result<(), JailError> {
    let set = |what, res, v| {
        sys::setrlimit(res, v).map_err(|source| JailError::Privileges { what, source })
    };
    set("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, limits.open_files)?;
    set("RLIMIT_CORE", libc::RLIMIT_CORE, 0)?;
    set("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK, 0)?;
    // RLIMIT_NPROC counts every process of the user system-wide (all of root's, for a monitor
    // run as root): the pids cgroup bounds processes and threads instead.
    Ok(())
}

/// `no_new_privs`, then every capability gone: bounding and ambient sets, then the thread's
/// own sets (threads started later inherit them).
fn drop_privileges() -> Result<(), JailError> {
    let err = |what| move |source| JailError::Privileges { what, source };
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(err("PR_SET_NO_NEW_PRIVS"))?;
    for cap in 0..64 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(err("PR_CAPBSET_DROP")(e)),
        }
    }
    sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(err("PR_CAP_AMBIENT_CLEAR_ALL"))?;
    sys::clear_capabilities().map_err(err("capset"))?;
    Ok(())
}

/// Tries to mount a tmpfs at `target` (what a jailed process must not be able to do); for
/// the jail's tests.
pub fn try_mount_tmpfs(target: &Path) -> std::io::Result<()> {
    sys::mount(Some(Path::new("tmpfs")), target, Some(c"tmpfs"), 0, None)
}

// Landlock filesystem rights (ABI 1, then REFER in 2 and TRUNCATE in 3).
const LL_EXECUTE: u64 = 1 << 0;
const LL_WRITE_FILE: u64 = 1 << 1;
const LL_READ_FILE: u64 = 1 << 2;
const LL_READ_DIR: u64 = 1 << 3;
const LL_ABI1: u64 = (1 << 13) - 1;
const LL_REFER: u64 = 1 << 13;
const LL_TRUNCATE: u64 = 1 << 14;

/// Landlock on top of the mount jail, where the kernel has it: the same paths, the same
/// read-only or writable split, nothing else (no exec anywhere).
fn landlock(jail: &Jail) -> Result<String, JailError> {
    let abi = match sys::landlock_abi() {
        Ok(v) => v,
        Err(e) => return Ok(format!("landlock: not available in this kernel ({e})")),
    };
    let mut handled = LL_ABI1;
    if abi >= 2 {
        handled |= LL_REFER;
    }
    if abi >= 3 {
        handled |= LL_TRUNCATE;
    }
    let err = |what| move |source| JailError::Privileges { what, source };
    let ruleset = sys::landlock_ruleset(handled).map_err(err("landlock_create_ruleset"))?;
    let file_rights = LL_WRITE_FILE | LL_READ_FILE | (handled & LL_TRUNCATE);
    let allow = |path: &Path, writable: bool| -> Result<(), JailError> {
        use std::os::unix::fs::OpenOptionsExt;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map_err(err("open a path for landlock"))?;
        let dir = path.is_dir();
        let access = match (dir, writable) {
            (true, true) => handled & !LL_EXECUTE,
            (true, false) => LL_READ_FILE | LL_READ_DIR,
            (false, true) => file_rights,
            (false, false) => LL_READ_FILE,
        };
        sys::landlock_allow(&ruleset, &fd, access).map_err(err("landlock_add_rule"))
    };
    for b in &jail.binds {
        allow(&b.path, b.writable)?;
    }
    for d in &jail.devices {
        allow(d, true)?;
    }
    allow(Path::new("/proc"), false)?;
    sys::landlock_restrict(&ruleset).map_err(err("landlock_restrict_self"))?;
    Ok(format!(
        "landlock: ABI {abi}, {} paths",
        jail.binds.len() + jail.devices.len() + 1
    ))
}

/// Landlock that allows no path at all (a device back-end works on the descriptors it was
/// given and opens nothing). Layered on the jail's own ruleset; fails only if the kernel has
/// Landlock and refuses.
pub(crate) fn landlock_nothing() -> std::io::Result<()> {
    let Ok(abi) = sys::landlock_abi() else {
        return Ok(());
    };
    let mut handled = LL_ABI1;
    if abi >= 2 {
        handled |= LL_REFER;
    }
    if abi >= 3 {
        handled |= LL_TRUNCATE;
    }
    let ruleset = sys::landlock_ruleset(handled)?;
    sys::landlock_restrict(&ruleset)
}

/// This thread's effective capabilities (0 inside the jail).
pub fn effective_capabilities() -> std::io::Result<u64> {
    sys::effective_capabilities()
}
