//! Putting a monitor in its jail (`bulwark-sandbox`): what a VM needs to see, taken from its
//! configuration, and the step that enters the jail before the VM is built.

use std::path::{Path, PathBuf};

use bulwark_sandbox::{Bind, Jail, Limits};

use crate::run::VmSpec;

/// Said on every run without a jail.
pub(crate) const NO_JAIL_WARNING: &str = "bulwark: WARNING: --no-jail: this VM's monitor runs with all of your privileges and sees the whole host; a guest that breaks out of the monitor owns whatever you own. Use it for debugging only.";

/// `p` as an absolute path (the jail shows each path at its own absolute place).
fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Where a vsock device's host sockets live: the directory of its socket path (the monitor
/// listens at PATH and connects to PATH_<port> siblings).
fn socket_dir(socket: &Path) -> PathBuf {
    abs(socket)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| "/".into())
}

/// The jail of the VM `spec`; `state_dir` is a managed monitor's directory (written), and
/// `extra` what else it reads (a snapshot to restore).
pub(crate) fn plan(spec: &VmSpec, state_dir: Option<&Path>, extra: &[PathBuf]) -> Jail {
    let mut binds = Vec::new();
    // /dev/random and /dev/urandom: in this static binary the getrandom crate cannot find
    // libc's getrandom() and reads the device files instead (it polls /dev/random once, then
    // reads /dev/urandom); /dev/null for whatever redirects there.
    let mut devices = vec![
        PathBuf::from(bulwark_monitor::kvm::KVM_PATH),
        "/dev/random".into(),
        "/dev/urandom".into(),
        "/dev/null".into(),
    ];
    let (memory, vcpus, drives, vsock, nets) = match spec {
        VmSpec::Function(c) => (c.memory, c.vcpus, &c.drives, None, 0),
        VmSpec::Linux(c) => (c.memory, c.vcpus, &c.drives, c.vsock.as_ref(), c.nets.len()),
    };
    for d in drives {
        binds.push(if d.read_only {
            Bind::read_only(abs(&d.path))
        } else {
            Bind::writable(abs(&d.path))
        });
    }
    if let Some(v) = vsock {
        binds.push(Bind::writable(socket_dir(&v.socket)));
    }
    if let Some(dir) = state_dir {
        binds.push(Bind::writable(abs(dir)));
    }
    binds.extend(extra.iter().map(|p| Bind::read_only(abs(p))));
    if nets > 0 {
        devices.push("/dev/net/tun".into());
    }
    // Lazy restore's userfaultfd, for a monitor without CAP_SYS_PTRACE (where the host has it).
    devices.push("/dev/userfaultfd".into());
    // A path that does not exist stays out: the monitor then reports it in its own words
    // (a missing drive, no /dev/kvm) when it tries to use it.
    binds.retain(|b| b.path.exists());
    devices.retain(|d| d.exists());
    binds.sort_by(|a, b| a.path.cmp(&b.path));
    binds.dedup_by(|a, b| {
        // The same path twice: keep it writable if either wants that.
        if a.path == b.path {
            b.writable |= a.writable;
            true
        } else {
            false
        }
    });
    Jail {
        binds,
        devices,
        host_network: nets > 0,
        on_violation: state_dir.map(|_| violation as fn(&str)),
        limits: Limits {
            // Guest RAM is charged to the cgroup; the monitor itself, its page tables and the
            // page cache of a snapshot being written fit in the rest.
            memory_bytes: Some(memory + (512 << 20)),
            cpus: Some(f64::from(vcpus) + 1.0),
            pids: Some(64 + 4 * u64::from(vcpus)),
            open_files: 4096,
        },
    }
}

/// Starts the back-end launcher when the VM has a device whose back-end runs in a process of
/// its own: now, while the monitor has one thread and no guest memory (see
/// `bulwark_backends::launcher`). Called inside the jail, or without one under `--no-jail`.
pub(crate) fn start_backends(spec: &VmSpec) -> anyhow::Result<()> {
    use bulwark_monitor::Isolation;
    let needed = match spec {
        VmSpec::Function(c) => c.drives.iter().any(|d| d.isolation == Isolation::Process),
        VmSpec::Linux(c) => {
            c.drives.iter().any(|d| d.isolation == Isolation::Process)
                || c.nets.iter().any(|n| n.isolation == Isolation::Process)
                || c.vsock
                    .as_ref()
                    .is_some_and(|v| v.isolation == Isolation::Process)
        }
    };
    if needed {
        let launcher = bulwark_monitor::backends::launcher::Launcher::start()
            .map_err(|e| anyhow::anyhow!("cannot start the device back-end launcher: {e}"))?;
        tracing::debug!(pid = launcher.pid(), "device back-end launcher started");
        launcher.install();
    }
    Ok(())
}

/// A managed monitor's directory, for the outer process's report of a seccomp violation.
static STATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// In the jail's outer process: the jailed monitor broke its seccomp policy; exit.json says
/// so (the control plane reads it).
fn violation(report: &str) {
    if let Some(dir) = STATE_DIR.get() {
        crate::monitor::write_failure(dir, report, 123);
    }
}

/// Opens what needs privileges, learns what the jail hides, and enters the jail. Returns in
/// the jailed process (the caller's parent process waits outside and exits as it does).
pub(crate) fn enter(
    spec: &VmSpec,
    state_dir: Option<&Path>,
    extra: &[PathBuf],
) -> anyhow::Result<()> {
    if let VmSpec::Linux(c) = spec {
        for n in &c.nets {
            bulwark_monitor::preopen_tap(n)?;
        }
    }
    // Host facts read from /sys, which the jail does not show.
    bulwark_monitor::kvm::is_software_virtualization();
    bulwark_monitor::memory::GuestRam::huge_backing();
    let jail = plan(spec, state_dir, extra);
    if let Some(dir) = state_dir {
        let _ = STATE_DIR.set(dir.to_path_buf());
    }
    let outer = std::process::id();
    let entered = bulwark_sandbox::enter(&jail)?;
    bulwark_monitor::managed::set_reported_pid(outer);
    start_backends(spec)?;
    // The random-number crate opens its device files on first use; do that now, while every
    // thread may still open files (the seccomp filters do not let most of them).
    let _ = bulwark_seal::OwnerKey::generate();
    for line in &entered.applied {
        tracing::info!("jail: {line}");
    }
    // Test-only hook, in debug builds only: try what the jail must stop, from inside it.
    if cfg!(debug_assertions)
        && let Ok(spec) = std::env::var("BULWARK_JAIL_PROBE")
        && let Some((role, nr)) = spec
            .strip_prefix("seccomp:")
            .and_then(|s| s.split_once(':'))
    {
        // A thread of `role` makes system call `nr`: a forbidden one ends the process.
        use bulwark_sandbox::seccomp::Role;
        let role = match role {
            "main" => Role::Main,
            "vcpu" => Role::Vcpu,
            "device" => Role::Device,
            _ => Role::LazyRestore,
        };
        let nr: i64 = nr.parse().unwrap_or(-1);
        match bulwark_sandbox::seccomp::probe_forbidden(role, nr) {
            Ok(v) => println!("probe seccomp {nr}: returned {v}"),
            Err(e) => println!(
                "probe seccomp {nr}: failed ({})",
                e.raw_os_error().unwrap_or(0)
            ),
        }
        std::process::exit(0);
    }
    if cfg!(debug_assertions) && std::env::var_os("BULWARK_JAIL_PROBE").is_some() {
        let landlock = entered
            .applied
            .iter()
            .find_map(|l| l.strip_prefix("landlock: "))
            .unwrap_or("missing");
        println!("probe landlock: {landlock}");
        probe(&jail);
    }
    Ok(())
}

/// Prints one line per attempt, `probe <name>: <outcome>`, then exits. Run by the tests
/// (`crates/cli/tests/jail.rs`) in debug builds; release builds do not have it.
fn probe(jail: &Jail) -> ! {
    fn outcome<T>(r: std::io::Result<T>) -> String {
        match r {
            Ok(_) => "allowed".into(),
            Err(e) => format!("denied ({})", e.raw_os_error().map_or(0, |c| c)),
        }
    }
    let say = |name: &str, what: String| println!("probe {name}: {what}");
    say("read-host-file", outcome(std::fs::read("/etc/passwd")));
    say(
        "read-host-kvm-module",
        outcome(std::fs::metadata("/sys/module/kvm")),
    );
    say("write-root", outcome(std::fs::write("/probe", b"x")));
    say(
        "mount",
        outcome(bulwark_sandbox::try_mount_tmpfs(std::path::Path::new(
            "/proc",
        ))),
    );
    say(
        "tcp-connect",
        outcome(std::net::TcpStream::connect_timeout(
            &"127.0.0.1:22".parse().expect("address"),
            std::time::Duration::from_millis(200),
        )),
    );
    say(
        "capabilities",
        format!(
            "{:#x}",
            bulwark_sandbox::effective_capabilities().unwrap_or(u64::MAX)
        ),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["NoNewPrivs:", "CapBnd:", "CapAmb:"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or("?")
            .trim();
        say(key.trim_end_matches(':'), v.to_string());
    }
    say(
        "random",
        match bulwark_seal::OwnerKey::generate() {
            Ok(_) => "allowed".into(),
            Err(e) => format!("failed: {e}: {:?}", std::error::Error::source(&e)),
        },
    );
    say("pid", std::process::id().to_string());
    let mut procs: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default();
    procs.sort();
    say("processes", procs.join(","));
    match std::fs::read_dir("/") {
        Ok(d) => {
            let mut root: Vec<String> = d
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            root.sort();
            say("root", root.join(","));
        }
        Err(e) => say("root", outcome::<()>(Err(e))),
    }
    for b in &jail.binds {
        let write = std::fs::OpenOptions::new().append(true).open(&b.path);
        let what = if b.path.is_dir() {
            outcome(std::fs::read_dir(&b.path))
        } else {
            outcome(write)
        };
        say(&format!("bind {}", b.path.display()), what);
    }
    say(
        "cgroup",
        std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .replace('\n', " "),
    );
    std::process::exit(0)
}
