//! `bulwark run`: turn flags and the config file into a VM, run it, and map how it ended to
//! the process exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bulwark_monitor::{
    ConsoleIo, DriveConfig, FunctionVmConfig, Isolation, LinuxVmConfig, NetConfig, RunReport,
    StopReason, VsockConfig, random_mac,
};

use crate::RunArgs;
use crate::config::{Backend, ConfigError, DriveSpec, FileConfig, parse_duration, parse_size};

/// Exit status when bulwark could not start the VM (bad config, no KVM, bad payload).
const EXIT_SETUP: u8 = 125;
/// Exit status when the `--timeout` ran out.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status when the user left the console with Ctrl-A x (as for an interrupt).
const EXIT_QUIT: u8 = 130;
/// Exit status when the guest crashed (fault, triple fault, kernel panic, KVM error).
const EXIT_CRASH: u8 = 123;

use bulwark_image::{
    BZIMAGE_FILE as IMAGE_BZIMAGE, INITRAMFS_FILE as IMAGE_INITRAMFS, JOB_MARKER, SYSTEM_MAP_FILE,
    VMLINUX_FILE as IMAGE_VMLINUX,
};

/// Kernel arguments every Linux guest gets: the console on COM1, reboot through the keyboard
/// controller (which ends the VM), an immediate reset on panic (pvpanic reports it first), no
/// PCI (devices come from ACPI), and no boot-time self-tests of the kernel's crypto algorithms
/// (a quarter of a stock kernel's boot in the rig, `bench/boot`; `--cmdline
/// cryptomgr.notests=0` brings them back).
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off cryptomgr.notests";
/// The line the guest image's init prints with its job's exit status.
pub const JOB_STATUS_MARKER: &str = "bulwark-guest: exit status ";
use bulwark_spec::DEFAULT_LINUX_MEMORY;
/// Tells the guest image's /init to switch to the root drive.
const ROOT_ARG: &str = "bulwark.root=/dev/vda";

/// What to run.
pub(crate) enum VmSpec {
    Function(FunctionVmConfig),
    Linux(LinuxVmConfig),
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// The kernel profile introspection needs, from an image: its System.map and the raw BTF of
/// its vmlinux. Read here, before the monitor's jail hides the image; parsed only when the
/// owner first asks.
fn introspection_profile(image: &Path) -> anyhow::Result<bulwark_monitor::IntrospectionConfig> {
    let hint = || {
        format!(
            "introspection needs the image's {SYSTEM_MAP_FILE} and {IMAGE_VMLINUX}; rebuild it with `bulwark image build --out {}`",
            image.display()
        )
    };
    let system_map =
        read(&image.join(SYSTEM_MAP_FILE), "the kernel's symbol map").with_context(hint)?;
    let vmlinux = read(&image.join(IMAGE_VMLINUX), "the kernel's vmlinux").with_context(hint)?;
    let elf = bulwark_image::elf::Elf::parse(&vmlinux).with_context(|| {
        format!(
            "{} is not an ELF vmlinux",
            image.join(IMAGE_VMLINUX).display()
        )
    })?;
    let btf = elf
        .section(".BTF")?
        .with_context(|| {
            format!(
                "{} has no .BTF section: its kernel was built without CONFIG_DEBUG_INFO_BTF, which introspection needs (Debian's cloud kernels have it)",
                image.join(IMAGE_VMLINUX).display()
            )
        })?
        .to_vec();
    Ok(bulwark_monitor::IntrospectionConfig { system_map, btf })
}

/// The guest job after `--`, as init arguments on the kernel command line.
pub fn job_cmdline(command: &[String]) -> Result<String, ConfigError> {
    let mut out = Vec::new();
    for a in command {
        if a.contains('"') || a.contains('\n') {
            return Err(ConfigError::BadCommand(format!(
                "guest command argument {a:?} contains a quote or newline, which the kernel command line cannot carry; use a script in the image"
            )));
        }
        if a.is_empty() || a.contains(' ') || a.contains('\t') {
            out.push(format!("\"{a}\""));
        } else {
            out.push(a.clone());
        }
    }
    Ok(out.join(" "))
}

/// The kernel command line. `image`: the guest's init is an image's `/init`, whose job follows
/// [`JOB_MARKER`] (always present, so that a word of `extra` the kernel does not know and hands
/// to init is never taken for the job); a user's own init gets the job alone after `--`.
fn linux_cmdline(
    extra: Option<&str>,
    command: &[String],
    quiet: bool,
    image: bool,
) -> Result<String, ConfigError> {
    let mut c = BASE_CMDLINE.to_string();
    if quiet {
        c.push_str(" quiet");
    }
    if let Some(e) = extra.filter(|e| !e.trim().is_empty()) {
        c.push(' ');
        c.push_str(e.trim());
    }
    let job = job_cmdline(command)?;
    let after: Vec<&str> = [image.then_some(JOB_MARKER), Some(job.as_str())]
        .into_iter()
        .flatten()
        .filter(|w| !w.is_empty())
        .collect();
    if !after.is_empty() {
        c.push_str(" -- ");
        c.push_str(&after.join(" "));
    }
    Ok(c)
}

/// Merges flags over the config file over defaults.
fn vm_spec(args: &RunArgs, verbose: bool) -> anyhow::Result<VmSpec> {
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    vm_spec_from(args, file, verbose)
}

/// Merges flags over a loaded spec over defaults.
pub(crate) fn vm_spec_from(
    args: &RunArgs,
    file: FileConfig,
    verbose: bool,
) -> anyhow::Result<VmSpec> {
    let size = |flag: Option<u64>, file: &Option<String>, default: u64| -> anyhow::Result<u64> {
        Ok(match (flag, file) {
            (Some(v), _) => v,
            (None, Some(s)) => parse_size(s)?,
            (None, None) => default,
        })
    };
    let timeout = match (args.timeout, &file.timeout) {
        (Some(t), _) => Some(t),
        (None, Some(s)) => Some(parse_duration(s)?),
        (None, None) => None,
    };
    let defaults = FunctionVmConfig::default();
    let console_limit = size(
        args.console_limit,
        &file.console_limit,
        defaults.console_limit,
    )?;
    let vcpus = args.vcpus.or(file.vcpus).unwrap_or(1);

    let payload = args.payload.clone().or(file.payload.clone());
    let image = args.image.clone().or(file.image.clone());
    let kernel = args.kernel.clone().or(file.kernel.clone());
    match (payload, image, kernel) {
        (Some(p), None, None) => Ok(VmSpec::Function(FunctionVmConfig {
            payload: read(&p, "payload")?,
            memory: size(args.memory, &file.memory, defaults.memory)?,
            vcpus,
            arg: args.arg.clone().or(file.arg.clone()).unwrap_or_default(),
            cpl0: args.cpl0 || file.cpl0.unwrap_or(false),
            timeout,
            console_limit,
            drives: drives(None, args, &file),
        })),
        (None, image, kernel) if image.is_some() != kernel.is_some() => {
            let pvh = args.pvh || file.pvh.unwrap_or(false);
            let introspection = match (&image, file.introspection) {
                (Some(dir), Some(true)) => Some(introspection_profile(dir)?),
                (None, Some(true)) => anyhow::bail!(
                    "introspection = true needs a guest from an `image` (its System.map and vmlinux describe the kernel), not a bare kernel"
                ),
                _ => None,
            };
            let from_image = image.is_some();
            let (kernel, initrd): (PathBuf, Option<PathBuf>) = match (image, kernel) {
                (Some(dir), _) => {
                    let k = dir.join(if pvh { IMAGE_VMLINUX } else { IMAGE_BZIMAGE });
                    if !dir.is_dir() {
                        anyhow::bail!(
                            "image directory {} does not exist; create it with `bulwark image build --out {}`",
                            dir.display(),
                            dir.display()
                        );
                    }
                    (
                        k,
                        Some(
                            args.initrd
                                .clone()
                                .or(file.initrd.clone())
                                .unwrap_or(dir.join(IMAGE_INITRAMFS)),
                        ),
                    )
                }
                (None, Some(k)) => (k, args.initrd.clone().or(file.initrd.clone())),
                (None, None) => return Err(ConfigError::NoPayload.into()),
            };
            let mut extra = args.cmdline.clone().or(file.cmdline.clone());
            let root = args.root.clone().or(file.root.clone());
            if root.is_some() {
                extra = Some(format!("{} {ROOT_ARG}", extra.unwrap_or_default()));
            }
            Ok(VmSpec::Linux(LinuxVmConfig {
                kernel: std::sync::Arc::new(
                    std::fs::File::open(&kernel)
                        .with_context(|| format!("cannot read kernel {}", kernel.display()))?,
                ),
                initrd: initrd.map(|p| read(&p, "initrd")).transpose()?,
                cmdline: linux_cmdline(
                    extra.as_deref(),
                    if args.command.is_empty() {
                        file.command.as_deref().unwrap_or_default()
                    } else {
                        &args.command
                    },
                    !verbose,
                    from_image,
                )?,
                memory: size(args.memory, &file.memory, DEFAULT_LINUX_MEMORY)?,
                vcpus,
                timeout,
                console_limit,
                console_marker: Some(JOB_STATUS_MARKER.to_string()),
                drives: drives(root, args, &file),
                nets: nets(args, &file)?,
                vsock: args
                    .vsock
                    .clone()
                    .or(file.vsock.clone())
                    .map(|v| VsockConfig {
                        cid: v.cid,
                        socket: v.socket,
                        isolation: isolation(v.backend),
                    }),
                introspection,
            }))
        }
        (None, None, None) => Err(ConfigError::NoPayload.into()),
        _ => Err(ConfigError::Conflict.into()),
    }
}

/// The root drive (first, as `/dev/vda`), then the drives from the flags, or else from the
/// config file; serials default to `bulwarkN`.
fn drives(root: Option<DriveSpec>, args: &RunArgs, file: &FileConfig) -> Vec<DriveConfig> {
    let specs = if args.drives.is_empty() {
        file.drive.clone().unwrap_or_default()
    } else {
        args.drives.clone()
    };
    root.into_iter()
        .chain(specs)
        .enumerate()
        .map(|(i, d)| DriveConfig {
            path: d.path,
            read_only: d.read_only,
            direct: d.direct,
            serial: d.serial.unwrap_or_else(|| format!("bulwark{i}")),
            isolation: isolation(d.backend),
        })
        .collect()
}

fn isolation(b: Backend) -> Isolation {
    match b {
        Backend::Process => Isolation::Process,
        Backend::Inline => Isolation::Inline,
    }
}

/// The network interfaces from the flags, or else from the config file; MAC addresses are
/// random (locally administered) unless given.
fn nets(args: &RunArgs, file: &FileConfig) -> Result<Vec<NetConfig>, ConfigError> {
    let specs = if args.nets.is_empty() {
        file.net.clone().unwrap_or_default()
    } else {
        args.nets.clone()
    };
    specs
        .into_iter()
        .map(|n| {
            let mac = match n.mac.as_deref() {
                Some(m) => crate::config::parse_mac(m).ok_or_else(|| {
                    ConfigError::BadNet(format!("mac={m}"), "mac must be six hex bytes, unicast")
                })?,
                None => random_mac(),
            };
            Ok(NetConfig {
                mac,
                tap: n.tap,
                isolation: isolation(n.backend.unwrap_or(Backend::Inline)),
            })
        })
        .collect()
}

/// The process exit status for how a VM ended (see `bulwark run --help`).
pub(crate) fn exit_status(report: &RunReport) -> u8 {
    match &report.reason {
        StopReason::Exited(status) => *status as u8,
        StopReason::PowerOff | StopReason::Reboot => report
            .console_marker
            .as_deref()
            .and_then(|s| s.parse::<u8>().ok())
            .unwrap_or(0),
        StopReason::Timeout(_) => EXIT_TIMEOUT,
        StopReason::ConsoleQuit => EXIT_QUIT,
        _ => EXIT_CRASH,
    }
}

fn exit_code(report: &RunReport) -> ExitCode {
    match &report.reason {
        StopReason::Exited(_) | StopReason::PowerOff | StopReason::Reboot => {}
        StopReason::Timeout(_) => eprintln!("bulwark: {}", report.reason),
        StopReason::ConsoleQuit => eprintln!("\r\nbulwark: {}", report.reason),
        other => {
            eprintln!("bulwark: {other}");
            let (code, n) = report.stats.postcode;
            if n > 0 {
                eprintln!("bulwark: last POST code {code:#x}");
            }
        }
    }
    ExitCode::from(exit_status(report))
}

pub fn run(args: &RunArgs, verbose: bool) -> ExitCode {
    let spec = match vm_spec(args, verbose) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // Linux guests need hardware virtualization; on a kvm_pvm host, go through the rig.
    let in_rig = matches!(spec, VmSpec::Linux(_))
        && !args.no_rig
        && args.image.is_some()
        && bulwark_monitor::kvm::is_software_virtualization();
    if in_rig
        && matches!(&spec, VmSpec::Linux(c) if !c.drives.is_empty() || c.vsock.is_some() || !c.nets.is_empty())
    {
        eprintln!(
            "bulwark: this host has only software virtualization (kvm_pvm), so Linux guests run in the nested rig, which does not carry --drive files, --vsock sockets or --net taps into it; run on a host with VT-x or AMD-V, or inside `bulwark rig`"
        );
        return ExitCode::from(EXIT_SETUP);
    }
    if matches!(spec, VmSpec::Linux(_))
        && !args.no_rig
        && args.image.is_some()
        && bulwark_monitor::kvm::is_software_virtualization()
    {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut tool_args = vec!["rerun-in-rig".to_string(), "--".to_string()];
        tool_args.extend(argv);
        return crate::tools::exec(tool_args);
    }
    if args.no_jail {
        eprintln!("{}", crate::jail::NO_JAIL_WARNING);
        if let Err(e) = crate::jail::start_backends(&spec) {
            eprintln!("bulwark: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    } else if let Err(e) = crate::jail::enter(&spec, None, &[]) {
        eprintln!("bulwark: {e:#}");
        return ExitCode::from(EXIT_SETUP);
    }
    let result = match &spec {
        VmSpec::Function(cfg) => bulwark_monitor::run_function(cfg, ConsoleIo::stdio()),
        VmSpec::Linux(cfg) => bulwark_monitor::run_linux(cfg, ConsoleIo::stdio()),
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let chain: Vec<String> = anyhow::Error::from(e)
                .chain()
                .map(|c| c.to_string())
                .collect();
            eprintln!("bulwark: {}", chain.join(": "));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if args.stats {
        eprintln!(
            "bulwark: stats: {} elapsed_us={}",
            report.stats,
            report.elapsed.as_micros()
        );
        for (name, c) in &report.devices {
            eprintln!("bulwark: device {name}: {c}");
        }
    }
    // A VM that ran out of time may be a guest waiting on a device: show where each queue
    // stood (a guest that offered nothing, a device that left work untaken, an interrupt
    // raised and never acknowledged).
    if args.stats || matches!(report.reason, bulwark_monitor::StopReason::Timeout(_)) {
        for (name, r) in &report.rings {
            eprintln!("bulwark: rings {name}: {r}");
        }
    }
    exit_code(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_arguments_are_quoted_for_the_kernel() {
        let c = |v: &[&str]| job_cmdline(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(c(&["uname", "-a"]).unwrap(), "uname -a");
        assert_eq!(c(&["sh", "-c", "echo hi"]).unwrap(), "sh -c \"echo hi\"");
        assert_eq!(c(&["x", ""]).unwrap(), "x \"\"");
        assert!(c(&["say \"hi\""]).is_err());
    }

    #[test]
    fn linux_cmdline_puts_job_after_double_dash() {
        let cmd = vec!["true".to_string()];
        let l = linux_cmdline(Some("loglevel=4"), &cmd, true, false).unwrap();
        assert_eq!(l, format!("{BASE_CMDLINE} quiet loglevel=4 -- true"));
        assert_eq!(
            linux_cmdline(None, &[], false, false).unwrap(),
            BASE_CMDLINE
        );
    }

    #[test]
    fn image_guests_get_their_job_after_the_marker_even_without_one() {
        let cmd = vec!["true".to_string()];
        let l = linux_cmdline(Some("nokaslr"), &cmd, false, true).unwrap();
        assert_eq!(l, format!("{BASE_CMDLINE} nokaslr -- {JOB_MARKER} true"));
        let l = linux_cmdline(Some("nokaslr"), &[], false, true).unwrap();
        assert_eq!(l, format!("{BASE_CMDLINE} nokaslr -- {JOB_MARKER}"));
    }
}
