//! `bulwark image build` and `bulwark rig`, and moving a Linux guest into the rig when this
//! host's KVM cannot run one.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_image::{ExtraFile, ImageSpec, KernelSource, build_image};
use bulwark_testrig::{GuestImage, RigSpec, run_command};

use crate::image_args::{ImageCommand, RigArgs};

pub fn image(cmd: &ImageCommand) -> ExitCode {
    let ImageCommand::Build {
        out,
        kernel_package,
        kernel_deb,
        add,
        no_agent,
        rootfs,
    } = cmd;
    let mut spec = ImageSpec::new(out);
    spec.rootfs = *rootfs;
    if !no_agent {
        match agent_binary() {
            Some(agent) => spec
                .extra_files
                .push(ExtraFile::host(AGENT_GUEST_PATH, agent, 0o755)),
            None => {
                eprintln!(
                    "bulwark: {AGENT_BINARY} is not beside this binary (build the workspace with `cargo build --release`), or pass --no-agent"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    for a in add {
        match extra_file(a) {
            Ok(f) => spec.extra_files.push(f),
            Err(e) => {
                eprintln!("bulwark: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(p) = kernel_package {
        spec.kernel = KernelSource::Package(p.clone());
    }
    if let Some(d) = kernel_deb {
        spec.kernel = KernelSource::Deb(d.clone());
    }
    match build_image(&spec) {
        Ok(m) => {
            eprintln!(
                "bulwark: wrote image {} (kernel {}, {} modules)",
                out.display(),
                m.kernel.release,
                m.initramfs.modules.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulwark: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The guest agent's file name, installed beside `bulwark` by the workspace build.
const AGENT_BINARY: &str = "bulwark-agent";
/// Where the image puts it; the guest's /init starts it when present.
const AGENT_GUEST_PATH: &str = "/usr/bin/bulwark-agent";

fn agent_binary() -> Option<std::path::PathBuf> {
    let me = std::env::current_exe().ok()?;
    Some(me.parent()?.join(AGENT_BINARY)).filter(|p| p.is_file())
}

/// Parses `HOST:GUEST` for `--add`.
fn extra_file(arg: &str) -> Result<ExtraFile, String> {
    use std::os::unix::fs::PermissionsExt;
    let Some((host, guest)) = arg.split_once(':') else {
        return Err(format!(
            "--add {arg}: use HOST:GUEST, such as ./tool:/usr/bin/tool"
        ));
    };
    if !guest.starts_with('/') || guest.ends_with('/') || guest.contains("/../") {
        return Err(format!(
            "--add {arg}: the guest path must be an absolute file path, such as /usr/bin/tool"
        ));
    }
    let meta =
        std::fs::metadata(host).map_err(|e| format!("--add {arg}: cannot read {host}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("--add {arg}: {host} is not a regular file"));
    }
    Ok(ExtraFile::host(
        guest,
        host,
        meta.permissions().mode() & 0o777,
    ))
}

fn rig_spec(images: Vec<GuestImage>, timeout: Duration) -> Result<RigSpec, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find the bulwark binary: {e}"))?;
    // The rig runs `bulwark` itself, which lives beside this tools binary.
    let bulwark = me.with_file_name("bulwark");
    let mut spec = RigSpec::new(bulwark);
    spec.images = images;
    spec.timeout = timeout;
    // The rig's own kernel stays silent; the guest's console is what the user asked for.
    spec.cmdline_extra = "loglevel=1".into();
    Ok(spec)
}

fn finish(result: Result<bulwark_testrig::RigRun, bulwark_testrig::RigError>) -> ExitCode {
    match result {
        Ok(run) => ExitCode::from(u8::try_from(run.status).unwrap_or(1)),
        Err(e) => {
            eprintln!("bulwark: rig: {e}");
            ExitCode::from(125)
        }
    }
}

pub fn rig(args: &RigArgs) -> ExitCode {
    let mut images = Vec::new();
    for i in &args.images {
        let Some((name, dir)) = i.split_once('=') else {
            eprintln!("bulwark: --image takes NAME=DIR, got `{i}`");
            return ExitCode::from(2);
        };
        images.push(GuestImage::new(name, dir));
    }
    let spec = match rig_spec(images, args.timeout) {
        Ok(mut s) => {
            s.cpus = args.cpus;
            if let Some(m) = args.memory {
                s.memory_mib = u32::try_from(m >> 20).unwrap_or(u32::MAX);
            }
            s
        }
        Err(e) => {
            eprintln!("bulwark: {e}");
            return ExitCode::from(125);
        }
    };
    match &args.script {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(script) => {
                if may_trace(&script) {
                    old_qemu_note(&spec.qemu);
                }
                let run = bulwark_testrig::run_script(&spec, &script);
                if let Ok(r) = &run {
                    print!("{}", r.output);
                }
                finish(run)
            }
            Err(e) => {
                eprintln!("bulwark: cannot read script {}: {e}", path.display());
                ExitCode::from(125)
            }
        },
        None => {
            if may_trace(&args.command.join(" ")) {
                old_qemu_note(&spec.qemu);
            }
            finish(run_command(&spec, &args.command))
        }
    }
}

/// Whether what the rig runs may set introspection breakpoints (`bulwark vm ... vmi trace`),
/// the one thing an old QEMU keeps from working: only then is the note worth printing.
fn may_trace(what: &str) -> bool {
    what.contains("vmi") && what.contains("trace")
}

/// Says so when the rig's QEMU is too old for introspection's breakpoints (everything else
/// works with it).
fn old_qemu_note(qemu: &Path) {
    use bulwark_testrig::qemu::{GUEST_DEBUG_SINCE, QEMU_PACKAGE, version};
    if let Some(v) = version(qemu).filter(|v| *v < GUEST_DEBUG_SINCE) {
        eprintln!(
            "bulwark: rig: note: QEMU {}.{} does not pass debug exceptions of L2 to L1's KVM, so \
             `vmi trace` breakpoints never fire in this rig; QEMU {}.{} or newer does (on \
             Debian 12: `apt-get install -t bookworm-backports {QEMU_PACKAGE}`, or point \
             BULWARK_RIG_QEMU at one)",
            v.0, v.1, GUEST_DEBUG_SINCE.0, GUEST_DEBUG_SINCE.1
        );
    }
}

/// Runs this `bulwark run` invocation again inside the rig, with the image directory (or
/// kernel and initrd files) made available there. `argv` is the original argument list after
/// the program name.
pub fn rerun_in_rig(argv: &[String], image: Option<&Path>) -> ExitCode {
    eprintln!(
        "bulwark: this host's KVM is software virtualization (kvm_pvm), which cannot run a Linux \
         guest in useful time; running it inside the nested rig (QEMU with emulated AMD SVM) \
         instead. Pass --no-rig to try directly."
    );
    let mut args = Vec::with_capacity(argv.len());
    let mut images = Vec::new();
    let mut it = argv.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--image" {
            if let (Some(_), Some(dir)) = (it.next(), image) {
                images.push(GuestImage::new("guest", dir));
                args.push("--image".to_string());
                args.push("/images/guest".to_string());
            }
        } else if let Some(_dir) = a.strip_prefix("--image=") {
            if let Some(dir) = image {
                images.push(GuestImage::new("guest", dir));
                args.push("--image=/images/guest".to_string());
            }
        } else {
            args.push(a.clone());
        }
    }
    // Inside the rig the guest runs directly.
    if let Some(pos) = args.iter().position(|a| a == "--") {
        args.insert(pos, "--no-rig".into());
    } else {
        args.push("--no-rig".into());
    }
    match rig_spec(images, Duration::from_secs(600)) {
        Ok(spec) => finish(run_command(&spec, &args)),
        Err(e) => {
            eprintln!("bulwark: {e}");
            ExitCode::from(125)
        }
    }
}
