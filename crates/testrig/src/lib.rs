//! The nested test rig: real hardware-virtualization KVM on hosts that have none.
//!
//! A host whose `/dev/kvm` is `kvm_pvm` (software virtualization) cannot boot stock Linux in
//! useful time. The rig boots QEMU with TCG and an emulated AMD CPU with SVM and nested paging
//! (`-accel tcg -cpu EPYC,+svm,+npt`) on the same Debian cloud kernel the guest images use; its
//! L1 `/init` loads irqbypass, kvm and kvm-amd from that kernel package, which gives a working
//! `/dev/kvm` in about two seconds. Inside, the static `bulwark` binary runs Linux guests
//! and payloads on real (emulated-hardware) KVM.
//!
//! ```no_run
//! use bulwark_testrig::{run_script, GuestImage, RigSpec};
//! let mut spec = RigSpec::new("target/x86_64-unknown-linux-gnu/debug/bulwark");
//! spec.images.push(GuestImage::new("default", "/tmp/image"));
//! let run = run_script(&spec, "section kvm\nls -l /dev/kvm\nsection guest\n\
//!     bulwark run --image /images/default -- uname -r")?;
//! assert_eq!(run.status, 0);
//! let sections = run.sections();
//! println!("{}", sections.get("guest")?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - [`run_script`] builds the L1 initramfs ([`l1`]: busybox, the KVM modules, `/bin/bulwark`,
//!   images under `/images/<name>`, extra files, the script), boots QEMU ([`qemu`]) with the
//!   console captured, and returns the script's output and exit status ([`RigRun`]). Put many
//!   checks in one script and split the output with [`RigRun::sections`]: the script prelude
//!   defines `section NAME`, which prints `=== NAME`.
//! - [`run_command`] runs one bulwark command in the rig with the console on the caller's
//!   terminal (for `bulwark rig -- COMMAND`).
//! - Every run is bounded by [`RigSpec::timeout`]; QEMU is killed when it passes.
//! - [`workspace_bulwark`] finds (building it if needed) the workspace's static bulwark binary
//!   for tests.
#![forbid(unsafe_code)]

pub mod l1;
pub mod qemu;
pub mod sections;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulwark_image::kernel::{self, KernelError};
use bulwark_image::packages::{self, Apt, PackageError};
pub use bulwark_image::{BusyboxSource, ExtraFile, KernelFiles, KernelSource};

pub use l1::{GuestImage, L1Error};
pub use qemu::{ConsoleMode, QemuError};
pub use sections::{SectionError, Sections};

/// Default bound on a whole rig run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    L1(#[from] L1Error),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Section(#[from] SectionError),
    #[error("cannot create the rig's work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "L1 ended without reporting the script's status (kernel panic, or the script killed init?); console:\n{console}"
    )]
    NoStatus { console: String },
    #[error(
        "no bulwark binary at {path} (from {from}): build it with `cargo build -p bulwark-cli` or set BULWARK_BIN"
    )]
    NoBulwark { path: PathBuf, from: &'static str },
    #[error(
        "`cargo build -p bulwark-cli` failed; fix the build or set BULWARK_BIN to a static bulwark binary:\n{stderr}"
    )]
    BuildBulwark { stderr: String },
}

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct RigSpec {
    /// The static bulwark binary, installed as `/bin/bulwark` in L1.
    pub bulwark: PathBuf,
    /// Guest image directories, at `/images/<name>` in L1.
    pub images: Vec<GuestImage>,
    /// More files for L1 (test payloads, configuration).
    pub files: Vec<ExtraFile>,
    /// L1's kernel and its KVM modules: the default image kernel unless set.
    pub kernel: KernelSource,
    pub busybox: BusyboxSource,
    /// L1 memory; guests run inside it.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Bound on the whole run (building the archive included); QEMU is killed after it.
    pub timeout: Duration,
    /// Copy the console to stderr as it arrives ([`run_script`] only). Defaults to whether
    /// `BULWARK_RIG_ECHO=1` is set, so a hanging test or `bulwark rig --script` can be watched.
    pub echo: bool,
    /// Extra words for L1's kernel command line.
    pub cmdline_extra: String,
    /// The QEMU binary: `BULWARK_RIG_QEMU` when set, else `qemu-system-x86_64` on `PATH`.
    pub qemu: PathBuf,
    /// Package cache; the default user cache when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Keep the work directory (L1 archive) after the run, for debugging.
    pub keep_work_dir: bool,
    /// L1 is taken for wedged when its heartbeat stops for this long ([`run_script`] only).
    pub wedged_after: Duration,
    /// Boot L1 again this many times when it froze or wedged (a fault of QEMU's emulated SVM,
    /// not of the script). Default 1.
    pub hang_retries: u32,
}

impl RigSpec {
    pub fn new(bulwark: impl Into<PathBuf>) -> Self {
        Self {
            bulwark: bulwark.into(),
            images: Vec::new(),
            files: Vec::new(),
            kernel: KernelSource::default(),
            busybox: BusyboxSource::default(),
            memory_mib: 2048,
            cpus: 1,
            timeout: DEFAULT_TIMEOUT,
            echo: std::env::var_os("BULWARK_RIG_ECHO").is_some_and(|v| v == "1"),
            cmdline_extra: String::new(),
            qemu: std::env::var_os("BULWARK_RIG_QEMU")
                .filter(|v| !v.is_empty())
                .map_or_else(|| qemu::QEMU_BINARY.into(), PathBuf::from),
            cache_dir: None,
            keep_work_dir: false,
            wedged_after: qemu::WEDGED_AFTER,
            hang_retries: 1,
        }
    }
}

/// The result of a rig run.
#[derive(Clone, Debug)]
pub struct RigRun {
    /// The script's (or command's) exit status in L1.
    pub status: i32,
    /// What the script printed (stdout and stderr, in order), `\r` removed.
    pub output: String,
    /// The whole L1 console, kernel messages and rig markers included.
    pub console: String,
    /// L1's uptime (s) when `/dev/kvm` was ready; `None` if it never was.
    pub kvm_ready_uptime: Option<f64>,
    /// From starting QEMU to the `kvm ready` marker, host time.
    pub kvm_ready_wall: Option<Duration>,
    /// QEMU's run, host time.
    pub qemu_wall: Duration,
    /// The whole run including building the L1 archive, host time.
    pub wall: Duration,
    /// Times L1 stopped its heartbeat and a nudge woke it (QEMU had lost its interrupts).
    pub l1_woken: u32,
    /// Size of the L1 archive.
    pub initramfs_bytes: u64,
}

impl RigRun {
    /// The output split at `=== name` lines.
    pub fn sections(&self) -> Sections {
        Sections::parse(&self.output)
    }
}

/// Boots the rig, runs `script` (busybox `sh`) in L1, and returns its output and status.
pub fn run_script(spec: &RigSpec, script: &str) -> Result<RigRun, RigError> {
    run(spec, script, ConsoleMode::Capture { echo: spec.echo })
}

/// Runs `bulwark ARGS...` in the rig with the console on the caller's terminal (stdin to L1,
/// L1's console to stdout, the rig's own marker lines left out) and returns its status and
/// output. Ctrl-A X leaves QEMU at any time.
pub fn run_command(spec: &RigSpec, args: &[String]) -> Result<RigRun, RigError> {
    let mut script = String::from("bulwark");
    for a in args {
        script.push(' ');
        script.push_str(&shell_quote(a));
    }
    run(spec, &script, ConsoleMode::Attached)
}

fn run(spec: &RigSpec, script: &str, mode: ConsoleMode) -> Result<RigRun, RigError> {
    let started = Instant::now();
    let nonce = format!("{:016x}", RandomState::new().build_hasher().finish());
    let cache = match &spec.cache_dir {
        Some(c) => c.clone(),
        None => packages::cache_dir()?,
    };
    let mut apt = Apt::new(cache);
    let mut query: Vec<&str> = KernelFiles::apt_query(&spec.kernel).into_iter().collect();
    if spec.busybox == BusyboxSource::Package {
        query.push(packages::BUSYBOX_PACKAGE);
    }
    apt.query(&query)?;
    let kernel = KernelFiles::locate(&spec.kernel, &mut apt)?;
    let (busybox, _) = kernel::locate_busybox(&spec.busybox, &mut apt)?;
    let kvm = kernel
        .module_tree()?
        .resolve(l1::KVM_MODULES, &kernel.release)
        .map_err(KernelError::from)?;

    let work = std::env::temp_dir().join(format!("bulwark-rig-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|source| RigError::WorkDir {
        path: work.clone(),
        source,
    })?;
    let result = (|| {
        let initrd = work.join("l1.cpio");
        let initramfs_bytes = l1::write_l1_initramfs(
            &initrd,
            &l1::L1Contents {
                busybox: &busybox,
                kvm_modules: &kvm,
                bulwark: &spec.bulwark,
                images: &spec.images,
                files: &spec.files,
                script,
                nonce: &nonce,
            },
        )?;
        let cfg = qemu::QemuConfig {
            qemu: spec.qemu.clone(),
            kernel: kernel.bzimage.clone(),
            initrd,
            append: format!(
                "console=ttyS0 quiet panic=-1 unknown_nmi_panic {}",
                spec.cmdline_extra
            )
            .trim_end()
            .to_owned(),
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            extra_args: Vec::new(),
            // Someone at the console decides for themselves when to give up.
            freeze_after: match mode {
                ConsoleMode::Attached => Duration::MAX,
                ConsoleMode::Capture { .. } => qemu::FREEZE_AFTER,
            },
            heartbeat: Some(work.join("heartbeat.sock")),
            wedged_after: match mode {
                ConsoleMode::Attached => Duration::MAX,
                ConsoleMode::Capture { .. } => spec.wedged_after,
            },
            qmp: Some(work.join("qmp.sock")),
        };
        let remaining = spec.timeout.saturating_sub(started.elapsed());
        let mut q = qemu::run(&cfg, mode, remaining);
        // QEMU's emulated SVM now and then leaves L1 frozen for good (its CPU time stops) or
        // wedged (busy, but its processes never run again). The script starts from nothing in
        // a new L1, so it is booted again (once by default), and said loudly.
        let mut retries = spec.hang_retries;
        while let Err(e @ (qemu::QemuError::Frozen { .. } | qemu::QemuError::Wedged { .. })) = &q
            && retries > 0
        {
            retries -= 1;
            eprintln!("bulwark: rig: {e}\nbulwark: rig: booting L1 again");
            if let Some(hb) = &cfg.heartbeat {
                let _ = std::fs::remove_file(hb);
            }
            let remaining = spec.timeout.saturating_sub(started.elapsed());
            q = qemu::run(&cfg, mode, remaining);
        }
        let q = q?;
        let (status, output) =
            parse_console(&q.console, &nonce).ok_or_else(|| RigError::NoStatus {
                console: q.console.clone(),
            })?;
        Ok(RigRun {
            status,
            output,
            kvm_ready_uptime: kvm_ready_uptime(&q.console),
            console: q.console,
            kvm_ready_wall: q.kvm_ready_wall,
            qemu_wall: q.wall,
            l1_woken: q.woken,
            wall: started.elapsed(),
            initramfs_bytes,
        })
    })();
    if spec.keep_work_dir {
        tracing::info!(dir = %work.display(), "rig work directory kept");
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

/// The script's status and output, from the markers carrying `nonce`.
fn parse_console(console: &str, nonce: &str) -> Option<(i32, String)> {
    let begin = format!("{}begin {nonce}\n", l1::MARK);
    let end = format!("{}end {nonce} status=", l1::MARK);
    let start = console.find(&begin)? + begin.len();
    let end_at = start + console[start..].find(&end)?;
    let status_text = console[end_at + end.len()..].lines().next()?;
    let status = status_text.trim().parse().ok()?;
    // The end marker is at the start of a line unless the script's output lacked a final
    // newline; then the marker follows it on the same line.
    Some((status, console[start..end_at].to_owned()))
}

fn kvm_ready_uptime(console: &str) -> Option<f64> {
    console.lines().find_map(|l| {
        l.strip_prefix(&format!("{}kvm ready uptime=", l1::MARK))?
            .trim()
            .parse()
            .ok()
    })
}

/// Quotes a word for `sh`.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The workspace's static bulwark binary, for tests: `$BULWARK_BIN` when set; otherwise
/// `cargo build -p bulwark-cli` (a no-op when up to date) and
/// `<target>/x86_64-unknown-linux-gnu/debug/bulwark`, where `<target>` is `$CARGO_TARGET_DIR`
/// or the workspace's `target/`.
pub fn workspace_bulwark() -> Result<PathBuf, RigError> {
    if let Some(p) = std::env::var_os("BULWARK_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(p);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(RigError::NoBulwark {
                path,
                from: "BULWARK_BIN",
            })
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "bulwark-cli"])
        .current_dir(&workspace)
        .output()
        .map_err(|e| RigError::BuildBulwark {
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RigError::BuildBulwark {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let path = target.join("x86_64-unknown-linux-gnu/debug/bulwark");
    if path.is_file() {
        Ok(path)
    } else {
        Err(RigError::NoBulwark {
            path,
            from: "cargo build",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rig_console_parsed_between_markers_with_status() {
        let console = "noise\nbulwark-rig: kvm ready uptime=2.03\nbulwark-rig: begin n1\n=== a\nhello\nbulwark-rig: end n1 status=3\nreboot: Power down\n";
        let (status, output) = parse_console(console, "n1").unwrap();
        assert_eq!(status, 3);
        assert_eq!(output, "=== a\nhello\n");
        assert_eq!(kvm_ready_uptime(console), Some(2.03));
    }

    #[test]
    fn rig_console_markers_need_the_nonce() {
        let console = "bulwark-rig: begin n1\nbulwark-rig: end forged status=0\n";
        assert_eq!(parse_console(console, "n1"), None);
        assert_eq!(parse_console("no markers", "n1"), None);
        // Output without a final newline: the marker follows on the same line.
        let (s, out) = parse_console(
            "bulwark-rig: begin n\nabcbulwark-rig: end n status=0\n",
            "n",
        )
        .unwrap();
        assert_eq!((s, out.as_str()), (0, "abc"));
    }

    #[test]
    fn rig_shell_quote_keeps_words_whole() {
        assert_eq!(shell_quote("run"), "run");
        assert_eq!(
            shell_quote("--image=/images/default"),
            "--image=/images/default"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }
}
