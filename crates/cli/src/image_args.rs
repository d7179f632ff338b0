//! Arguments of `bulwark image` and `bulwark rig` (parsed by both binaries; the work is done by
//! `bulwark-tools`, see `image.rs`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Download a Debian cloud kernel and busybox, and write bzImage, vmlinux, an initramfs,
    /// System.map and a manifest into DIR.
    Build {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Kernel package [default: newest linux-image-6.1.0-*-cloud-amd64-unsigned].
        #[arg(long)]
        kernel_package: Option<String>,
        /// A kernel .deb file instead of a package name.
        #[arg(long, conflicts_with = "kernel_package")]
        kernel_deb: Option<PathBuf>,
        /// Add a host file to the initramfs: HOST:GUEST, e.g. ./tool:/usr/bin/tool (its
        /// permission bits are kept). Repeatable.
        #[arg(long = "add", value_name = "HOST:GUEST")]
        add: Vec<String>,
        /// Leave the guest agent (`bulwark-agent`, found beside this binary) out of the image.
        #[arg(long)]
        no_agent: bool,
        /// Also write rootfs.ext4, the same tree as an ext4 disk, for `bulwark run --root`.
        #[arg(long)]
        rootfs: bool,
    },
}

#[derive(Args, Debug)]
pub struct RigArgs {
    /// Guest image to make available in the rig as /images/NAME: NAME=DIR.
    #[arg(long = "image", value_name = "NAME=DIR")]
    pub(crate) images: Vec<String>,
    /// Bound on the whole rig run.
    #[arg(long, default_value = "600s", value_parser = crate::config::parse_duration)]
    pub(crate) timeout: Duration,
    /// CPUs of the rig's L1 (QEMU runs one TCG thread each).
    #[arg(long, default_value_t = 1)]
    pub(crate) cpus: u32,
    /// Memory of the rig's L1 [default: 2G]; guests run inside it.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub(crate) memory: Option<u64>,
    /// Run this shell script in the rig instead of one command (bulwark is on its PATH; it
    /// prints the script's output and exits with its status).
    #[arg(long, conflicts_with = "command")]
    pub(crate) script: Option<PathBuf>,
    /// The bulwark command to run inside the rig.
    #[arg(last = true, required_unless_present = "script")]
    pub(crate) command: Vec<String>,
}
