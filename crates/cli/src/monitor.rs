//! `bulwark monitor --dir DIR`: the monitor of one VM under bulwarkd.
//!
//! The daemon writes the VM's spec to `DIR/spec.json` and starts this in its own process
//! group, so the VM outlives the daemon. The monitor serves `control.sock` and `console.sock`
//! in DIR while the VM runs, and writes `DIR/exit.json` when it ends — the daemon reads it
//! even if it was not running at that moment.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bulwark_channel::{EXIT_FILE, SPEC_FILE};
use bulwark_monitor::{ConsoleIo, RunReport};
use bulwark_spec::FileConfig;
use clap::Args;
use serde::Serialize;

use crate::RunArgs;
use crate::run::{VmSpec, exit_status, vm_spec_from};

#[derive(Args, Debug)]
pub(crate) struct MonitorArgs {
    /// The VM's directory, holding spec.json.
    #[arg(long)]
    dir: PathBuf,
    /// Resume the VM from this sealed snapshot instead of booting it (its spec replaces
    /// spec.json). The owner's key is read from stdin.
    #[arg(long, requires = "key_stdin")]
    restore: Option<PathBuf>,
    /// Read the owner's key (64 hex digits) from stdin.
    #[arg(long)]
    key_stdin: bool,
    /// Resume the guest as soon as its state is back and restore memory as it is touched.
    #[arg(long, requires = "restore")]
    lazy: bool,
    /// Run without the jail (less safe: for debugging only).
    #[arg(long)]
    no_jail: bool,
}

/// Enters the jail (state directory writable, `extra` readable), unless told not to.
fn jail(
    spec: &VmSpec,
    dir: &Path,
    extra: &[std::path::PathBuf],
    no_jail: bool,
) -> anyhow::Result<()> {
    if no_jail {
        eprintln!("{}", crate::jail::NO_JAIL_WARNING);
        return crate::jail::start_backends(spec);
    }
    crate::jail::enter(spec, Some(dir), extra)
}

/// `exit.json`: how the VM ended.
#[derive(Debug, Serialize)]
struct ExitRecord {
    /// What ended the VM, in words.
    reason: String,
    /// The status `bulwark run` would have exited with.
    status: u8,
    /// Whether the guest ended the way it meant to (exit, poweroff, reboot).
    clean: bool,
    /// Set when the VM could not start at all.
    setup_error: bool,
    elapsed_ms: u64,
    exits: u64,
}

fn write_exit(dir: &Path, rec: &ExitRecord) {
    let path = dir.join(EXIT_FILE);
    let tmp = dir.join(format!("{EXIT_FILE}.tmp"));
    let text = serde_json::to_vec_pretty(rec).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        eprintln!("bulwark monitor: cannot write {}: {e}", path.display());
    }
}

/// Records in exit.json that the VM ended with `reason` outside the monitor's own control.
pub(crate) fn write_failure(dir: &Path, reason: &str, status: u8) {
    write_exit(
        dir,
        &ExitRecord {
            reason: reason.to_string(),
            status,
            clean: false,
            setup_error: false,
            elapsed_ms: 0,
            exits: 0,
        },
    );
}

/// Reads the owner's key from stdin: 64 hex digits and an optional newline.
fn key_from_stdin() -> anyhow::Result<bulwark_seal::OwnerKey> {
    let mut text = String::new();
    std::io::Read::take(std::io::stdin(), 256).read_to_string(&mut text)?;
    Ok(bulwark_seal::OwnerKey::from_hex(text.trim())?)
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn restore(
    dir: &Path,
    file: &Path,
    lazy: bool,
    no_jail: bool,
    verbose: bool,
) -> anyhow::Result<RunReport> {
    let key = key_from_stdin()?;
    // The whole file is authenticated before anything in it is used (lazily: the state and
    // the file's end before the guest runs, each memory block before the guest sees it).
    let mut snapshot = bulwark_monitor::snapshot::Restore::open(file, &key)?;
    if lazy {
        let dir = dir.to_path_buf();
        snapshot = snapshot.lazily(Box::new(move |reason| {
            let reason = format!("lazy restore failed: {reason}");
            eprintln!("bulwark monitor: {reason}");
            write_failure(&dir, &reason, 125);
            // The vCPU that wanted the block is stuck on it; nothing of this VM may go on.
            std::process::exit(125);
        }));
    }
    let total = snapshot.header.regions.iter().map(|r| r.1).sum();
    snapshot
        .reader
        .set_progress(bulwark_monitor::snapshot::Progress::start(
            dir, "restore", total,
        ));
    let spec = FileConfig::from_json(&snapshot.header.spec)?;
    spec.check()?;
    write_atomic(&dir.join(SPEC_FILE), snapshot.header.spec.as_bytes())?;
    let vm = vm_spec_from(&RunArgs::default(), spec, verbose)?;
    jail(&vm, dir, &[file.to_path_buf()], no_jail)?;
    let io = ConsoleIo::managed(dir)?;
    Ok(match &vm {
        VmSpec::Function(cfg) => bulwark_monitor::restore_function(cfg, snapshot, io)?,
        VmSpec::Linux(cfg) => bulwark_monitor::restore_linux(cfg, snapshot, io)?,
    })
}

fn start(dir: &Path, no_jail: bool, verbose: bool) -> anyhow::Result<RunReport> {
    let text = std::fs::read_to_string(dir.join(SPEC_FILE))?;
    let file = FileConfig::from_json(&text)?;
    file.check()?;
    let spec = vm_spec_from(&RunArgs::default(), file, verbose)?;
    if matches!(spec, VmSpec::Linux(_)) && bulwark_monitor::kvm::is_software_virtualization() {
        anyhow::bail!(
            "this host's KVM is software virtualization (kvm_pvm), which cannot run Linux guests in useful time; run bulwarkd on a host with VT-x or AMD-V, or inside `bulwark rig`"
        );
    }
    jail(&spec, dir, &[], no_jail)?;
    let io = ConsoleIo::managed(dir)?;
    Ok(match &spec {
        VmSpec::Function(cfg) => bulwark_monitor::run_function(cfg, io)?,
        VmSpec::Linux(cfg) => bulwark_monitor::run_linux(cfg, io)?,
    })
}

pub(crate) fn run(args: &MonitorArgs, verbose: bool) -> ExitCode {
    let _ = std::fs::remove_file(args.dir.join(EXIT_FILE));
    let result = match &args.restore {
        Some(file) => restore(&args.dir, file, args.lazy, args.no_jail, verbose),
        None => start(&args.dir, args.no_jail, verbose),
    };
    match result {
        Ok(report) => {
            let status = exit_status(&report);
            write_exit(
                &args.dir,
                &ExitRecord {
                    reason: report.reason.to_string(),
                    status,
                    clean: report.reason.is_clean_exit(),
                    setup_error: false,
                    elapsed_ms: report.elapsed.as_millis() as u64,
                    exits: report.stats.exits,
                },
            );
            ExitCode::from(status)
        }
        Err(e) => {
            let reason = format!("{e:#}");
            eprintln!("bulwark monitor: {reason}");
            write_exit(
                &args.dir,
                &ExitRecord {
                    reason,
                    status: 125,
                    clean: false,
                    setup_error: true,
                    elapsed_ms: 0,
                    exits: 0,
                },
            );
            ExitCode::from(125)
        }
    }
}
