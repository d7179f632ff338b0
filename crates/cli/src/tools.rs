//! Hand-off to `bulwark-tools`, the binary that builds guest images and drives the nested rig.
//!
//! Keeping that code out of `bulwark` keeps the monitor process small: it never maps the
//! package, decompression and QEMU code it does not run (about 0.5 MiB of resident memory per
//! VM), and none of it is in the trusted computing base of a running VM.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

pub const TOOLS_BINARY: &str = "bulwark-tools";

/// `bulwark-tools` beside this executable.
fn tools_path() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    Some(me.parent()?.join(TOOLS_BINARY))
}

/// Replaces this process with `bulwark-tools ARGS`; returns only on failure.
pub fn exec(args: Vec<String>) -> ExitCode {
    let Some(path) = tools_path().filter(|p| p.exists()) else {
        eprintln!(
            "bulwark: {TOOLS_BINARY} is not installed beside bulwark; build it with `cargo build --release` (it is part of the bulwark-cli package)"
        );
        return ExitCode::from(125);
    };
    let err = std::process::Command::new(&path).args(args).exec();
    eprintln!("bulwark: cannot run {}: {err}", path.display());
    ExitCode::from(125)
}
