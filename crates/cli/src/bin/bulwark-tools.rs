//! `bulwark-tools`: guest image building, the nested test rig and the bulwarkd client.
//! `bulwark image ...`, `bulwark rig ...` and `bulwark vm ...` hand over to this
//! binary (see `crates/cli/src/tools.rs`).
#![forbid(unsafe_code)]

#[path = "../config.rs"]
#[allow(dead_code)]
mod config;
#[path = "../image.rs"]
mod image;
#[path = "../image_args.rs"]
mod image_args;
#[path = "../logging.rs"]
mod logging;
#[path = "../vm.rs"]
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bulwark-tools",
    version,
    about = "bulwark guest images and nested rig"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build guest images from Debian packages.
    #[command(subcommand)]
    Image(image_args::ImageCommand),
    /// Run a bulwark command inside the nested test rig.
    Rig(image_args::RigArgs),
    /// Manage VMs through bulwarkd.
    Vm(vm::VmArgs),
    /// Run a `bulwark run` argument list inside the rig (used by `bulwark run` on
    /// software-virtualization hosts).
    #[command(hide = true)]
    RerunInRig {
        #[arg(last = true)]
        argv: Vec<String>,
    },
}

fn main() -> ExitCode {
    logging::init(0);
    match Cli::parse().command {
        Command::Image(cmd) => image::image(&cmd),
        Command::Rig(args) => image::rig(&args),
        Command::Vm(args) => vm::vm(args),
        Command::RerunInRig { argv } => {
            let image = image_arg(&argv);
            image::rerun_in_rig(&argv, image.as_deref())
        }
    }
}

/// The directory after `--image` in a `bulwark run` argument list.
fn image_arg(argv: &[String]) -> Option<std::path::PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--image" {
            return it.next().map(Into::into);
        }
        if let Some(d) = a.strip_prefix("--image=") {
            return Some(d.into());
        }
    }
    None
}
