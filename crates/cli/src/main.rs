//! `bulwark`: the command-line front end.
#![forbid(unsafe_code)]

mod config;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bulwark_monitor::{ConsoleIo, FunctionVmConfig, StopReason};
use clap::{Args, Parser, Subcommand};

use config::{FileConfig, parse_duration, parse_size};

/// Exit status when bulwark could not start the VM (bad config, no KVM, bad payload).
const EXIT_SETUP: u8 = 125;
/// Exit status when the `--timeout` ran out.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the guest crashed (fault, triple fault, KVM error).
const EXIT_CRASH: u8 = 123;

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
    /// Run a function micro-VM: a payload with no OS.
    ///
    /// Exit status: the payload's own status when it exits; 123 when the guest crashed
    /// (fault, triple fault, KVM error); 124 on --timeout; 125 when the VM could not start.
    Run(RunArgs),
    /// Build payloads from C or assembly with the bulwark SDK.
    #[command(subcommand)]
    Payload(PayloadCommand),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Payload file: a flat binary (entered at its first byte) or a static ELF.
    #[arg(long)]
    payload: Option<PathBuf>,
    /// Guest memory, a multiple of 2 MiB: 16M, 256M, 1G [default: 16M].
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Number of vCPUs; each enters the payload with its index in rdi [default: 1].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Argument string, visible to the payload in its info page.
    #[arg(long)]
    arg: Option<String>,
    /// Run the payload at CPL0 instead of CPL3 (emulated, so slow, on kvm_pvm hosts).
    #[arg(long)]
    cpl0: bool,
    /// Stop the VM after this long: 500ms, 10s, 2m.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Guest console output passed through before the rest is dropped [default: 64M].
    #[arg(long, value_parser = parse_size)]
    console_limit: Option<u64>,
    /// TOML file with the same fields (payload, memory, vcpus, arg, cpl0, timeout,
    /// console_limit); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print exit and device counters to stderr when the VM ends.
    #[arg(long)]
    stats: bool,
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

/// Logs go to stderr, warnings only unless `-v`/`-vv` or `BULWARK_LOG=error|warn|info|debug|trace`.
fn init_logging(verbose: u8) {
    use tracing::Level;
    let from_env = std::env::var("BULWARK_LOG")
        .ok()
        .and_then(|v| v.parse::<Level>().ok());
    let level = from_env.unwrap_or(match verbose {
        0 => Level::WARN,
        1 => Level::INFO,
        _ => Level::DEBUG,
    });
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Merges flags over the config file over defaults.
fn vm_config(args: &RunArgs) -> anyhow::Result<FunctionVmConfig> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let defaults = FunctionVmConfig::default();
    let payload_path = args
        .payload
        .clone()
        .or(file.payload)
        .ok_or(config::ConfigError::NoPayload)?;
    let payload = std::fs::read(&payload_path)
        .with_context(|| format!("cannot read payload {}", payload_path.display()))?;
    let size = |flag: Option<u64>, file: Option<String>, default: u64| -> anyhow::Result<u64> {
        Ok(match (flag, file) {
            (Some(v), _) => v,
            (None, Some(s)) => parse_size(&s)?,
            (None, None) => default,
        })
    };
    let timeout = match (args.timeout, file.timeout) {
        (Some(t), _) => Some(t),
        (None, Some(s)) => Some(parse_duration(&s)?),
        (None, None) => None,
    };
    Ok(FunctionVmConfig {
        payload,
        memory: size(args.memory, file.memory, defaults.memory)?,
        vcpus: args.vcpus.or(file.vcpus).unwrap_or(defaults.vcpus),
        arg: args.arg.clone().or(file.arg).unwrap_or_default(),
        cpl0: args.cpl0 || file.cpl0.unwrap_or(false),
        timeout,
        console_limit: size(
            args.console_limit,
            file.console_limit,
            defaults.console_limit,
        )?,
    })
}

fn run(args: &RunArgs) -> ExitCode {
    let cfg = match vm_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let report = match bulwark_monitor::run_function(&cfg, ConsoleIo::stdio()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "bulwark: {}",
                anyhow::Error::from(e)
                    .chain()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ")
            );
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if args.stats {
        eprintln!(
            "bulwark: stats: {} elapsed_us={}",
            report.stats,
            report.elapsed.as_micros()
        );
    }
    match &report.reason {
        StopReason::Exited(status) => ExitCode::from(*status as u8),
        StopReason::Timeout(_) => {
            eprintln!("bulwark: {}", report.reason);
            ExitCode::from(EXIT_TIMEOUT)
        }
        other => {
            eprintln!("bulwark: {other}");
            let (code, n) = report.stats.postcode;
            if n > 0 {
                eprintln!("bulwark: last POST code {code:#x}");
            }
            ExitCode::from(EXIT_CRASH)
        }
    }
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
    init_logging(cli.verbose);
    match &cli.command {
        Command::Run(args) => run(args),
        Command::Payload(cmd) => match payload(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bulwark: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
