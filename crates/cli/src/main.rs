//! `bulwark`: the command-line front end.
#![forbid(unsafe_code)]

mod agent;
mod config;
mod image_args;
mod jail;
mod logging;
mod monitor;
mod run;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use config::{parse_duration, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "bulwark",
    version,
    about = "A security-first virtual machine monitor for KVM"
)]
struct Cli {
    /// More logging (-v info, -vv debug). BULWARK_LOG=LEVEL overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a VM: a function micro-VM (--payload) or a Linux guest (--image, --kernel).
    ///
    /// Exit status: the payload's or guest job's own status when it ends (0 for a Linux guest
    /// that powers off or reboots without a job); 123 when the guest crashed (fault, triple
    /// fault, kernel panic, KVM error); 124 on --timeout; 125 when the VM could not start.
    Run(Box<RunArgs>),
    /// Build payloads from C or assembly with the bulwark SDK.
    #[command(subcommand)]
    Payload(PayloadCommand),
    /// Build guest images from Debian packages.
    #[command(subcommand)]
    Image(image_args::ImageCommand),
    /// Run a bulwark command inside the nested test rig (QEMU with emulated AMD SVM), for hosts
    /// without hardware virtualization: `bulwark rig --image default=DIR -- run --image
    /// /images/default -- uname -a`.
    Rig(image_args::RigArgs),
    /// Run a command in a running Linux guest through its agent (vsock) and exit with the
    /// command's status: `bulwark exec --vsock /run/vm.vsock -- uname -a`.
    Exec(agent::ExecArgs),
    /// Ask a running guest's agent: `bulwark agent ps --vsock /run/vm.vsock`.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Manage VMs through bulwarkd: create, start, pause, snapshot, console, ...
    #[command(disable_help_flag = true)]
    Vm(VmPassThrough),
    /// Introspect a VM under bulwarkd as its owner: `bulwark vmi --token OWNER ps NAME` (also
    /// modules, xview, baseline, check, protect, traps); the same as `bulwark vm vmi ...`.
    #[command(disable_help_flag = true)]
    Vmi(VmPassThrough),
    /// The monitor of one VM under bulwarkd (started by the daemon, not by people).
    #[command(hide = true)]
    Monitor(monitor::MonitorArgs),
}

/// `bulwark vm ...` runs in bulwark-tools; this only lets `--help` list it and passes every
/// argument (options before the subcommand, such as `--socket`, too) through.
#[derive(Args, Debug)]
struct VmPassThrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub(crate) struct RunArgs {
    /// Payload file: a flat binary (entered at its first byte) or a static ELF.
    #[arg(long, conflicts_with_all = ["kernel", "image"])]
    pub(crate) payload: Option<PathBuf>,
    /// Guest image directory from `bulwark image build` (bzImage, vmlinux, initramfs.cpio).
    #[arg(long, conflicts_with = "kernel")]
    pub(crate) image: Option<PathBuf>,
    /// Linux kernel: a bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long)]
    pub(crate) kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long)]
    pub(crate) initrd: Option<PathBuf>,
    /// Extra kernel command-line arguments (after bulwark's console and platform defaults).
    #[arg(long)]
    pub(crate) cmdline: Option<String>,
    /// With --image: boot the ELF vmlinux through PVH instead of the bzImage.
    #[arg(long)]
    pub(crate) pvh: bool,
    /// Never move a Linux guest into the nested rig, even on a software-virtualization host.
    #[arg(long)]
    pub(crate) no_rig: bool,
    /// Run the monitor without its jail (namespaces, minimal root, no capabilities, cgroup
    /// limits). Less safe: for debugging only.
    #[arg(long)]
    pub(crate) no_jail: bool,
    /// Guest memory: 16M, 256M, 1G [default: 16M for payloads (a multiple of 2 MiB), 256M for
    /// Linux].
    #[arg(long, value_parser = parse_size)]
    pub(crate) memory: Option<u64>,
    /// Number of vCPUs [default: 1]. Payloads get their index in rdi.
    #[arg(long)]
    pub(crate) vcpus: Option<u32>,
    /// Command to run in a Linux guest image as its job; the VM powers off when it ends and
    /// bulwark exits with its status. Without one, the image starts a shell.
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
    /// Argument string, visible to the payload in its info page.
    #[arg(long)]
    pub(crate) arg: Option<String>,
    /// Run the payload at CPL0 instead of CPL3 (emulated, so slow, on kvm_pvm hosts).
    #[arg(long)]
    cpl0: bool,
    /// Stop the VM after this long: 500ms, 10s, 2m.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// Guest console output passed through before the rest is dropped [default: 64M].
    #[arg(long, value_parser = parse_size)]
    pub(crate) console_limit: Option<u64>,
    /// TOML file with the same fields (payload, memory, vcpus, arg, cpl0, timeout,
    /// console_limit); flags override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Print exit and device counters to stderr when the VM ends.
    #[arg(long)]
    pub(crate) stats: bool,
    /// A virtio-blk drive (repeat for more): FILE or
    /// path=FILE[,ro=on][,direct=on][,serial=NAME]. A Linux guest sees /dev/vda, vdb, ...; a
    /// payload finds drive N's virtio-mmio registers at 0xd0001000 + N * 0x1000.
    #[arg(long = "drive", value_parser = crate::config::parse_drive)]
    pub(crate) drives: Vec<crate::config::DriveSpec>,
    /// Boot with the root filesystem on this ext4 drive (same syntax as --drive; it becomes
    /// /dev/vda, before the --drive ones), e.g. a copy of an image's rootfs.ext4 from
    /// `bulwark image build --rootfs`. The initramfs loads the modules, then switches to it.
    #[arg(long, value_parser = crate::config::parse_drive)]
    pub(crate) root: Option<crate::config::DriveSpec>,
    /// A virtio-vsock device for a Linux guest: PATH or cid=N,socket=PATH (CID 3 by default);
    /// backend=inline keeps its host streams in the monitor instead of a back-end process.
    /// Host programs connect to PATH and write `CONNECT <port>\n`; guest connections to CID 2
    /// port P reach a unix socket listening at PATH_P.
    #[arg(long, value_parser = crate::config::parse_vsock)]
    pub(crate) vsock: Option<crate::config::VsockSpec>,
    /// A virtio-net interface for a Linux guest on a tap (repeatable; the first is eth0):
    /// NAME or tap=NAME[,mac=02:00:00:00:00:01]. The tap is opened, or created when bulwark
    /// may (CAP_NET_ADMIN); bring it up and address it on the host side.
    #[arg(long = "net", value_parser = crate::config::parse_net)]
    pub(crate) nets: Vec<crate::config::NetSpec>,
}

#[derive(Subcommand, Debug)]
enum PayloadCommand {
    /// Compile and link .c/.S sources into a payload (static ELF at 0x100000).
    Build {
        /// Source files (.c, .S, .s).
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Output file [default: first source with .elf or .bin].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write a flat binary instead of an ELF.
        #[arg(long)]
        flat: bool,
        /// Do not link the C start-up code (the sources define `_start`).
        #[arg(long)]
        no_crt0: bool,
    },
}

fn payload(cmd: &PayloadCommand) -> anyhow::Result<()> {
    match cmd {
        PayloadCommand::Build {
            sources,
            output,
            flat,
            no_crt0,
        } => {
            let out = output
                .clone()
                .unwrap_or_else(|| bulwark_image::payload::default_output(&sources[0], *flat));
            let mut spec = bulwark_image::payload::BuildSpec::new(sources.clone(), out.clone());
            spec.flat = *flat;
            if *no_crt0 {
                spec.crt0 = false;
            }
            bulwark_image::payload::build(&spec)?;
            eprintln!("bulwark: wrote {}", out.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose);
    match &cli.command {
        Command::Run(args) => run::run(args, cli.verbose > 0),
        Command::Exec(args) => agent::exec(args),
        Command::Agent(cmd) => agent::agent(cmd),
        // Tooling lives in a separate binary, so the code that downloads packages and drives
        // QEMU is not part of the monitor that runs VMs.
        Command::Image(_) | Command::Rig(_) => tools::exec(std::env::args().skip(1).collect()),
        Command::Vm(VmPassThrough { rest }) => {
            let mut args = vec!["vm".to_string()];
            args.extend(rest.iter().cloned());
            tools::exec(args)
        }
        Command::Vmi(VmPassThrough { rest }) => {
            let mut args = vec!["vm".to_string(), "vmi".to_string()];
            args.extend(rest.iter().cloned());
            tools::exec(args)
        }
        Command::Monitor(args) => monitor::run(args, cli.verbose > 0),
        Command::Payload(cmd) => match payload(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulwark: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
