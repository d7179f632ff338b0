//! Runs one bulwark command inside the nested rig with the console on this terminal, until the
//! CLI has `bulwark rig`:
//!
//! ```text
//! cargo run -p bulwark-testrig --example rig -- [--image NAME=DIR]... [--timeout SECS] -- run --image /images/NAME
//! ```
//!
//! Ctrl-A X leaves QEMU. The bulwark binary is `$BULWARK_BIN` or the workspace's debug build.

use std::time::Duration;

use bulwark_testrig::{GuestImage, RigSpec, run_command, workspace_bulwark};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut images = Vec::new();
    let mut timeout = Duration::from_secs(3600);
    let mut command = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--image" => {
                let v = args.next().ok_or("--image needs NAME=DIR")?;
                let (name, dir) = v.split_once('=').ok_or("--image needs NAME=DIR")?;
                images.push(GuestImage::new(name, dir));
            }
            "--timeout" => {
                timeout = Duration::from_secs(args.next().ok_or("--timeout needs SECS")?.parse()?);
            }
            "--" => {
                command.extend(args.by_ref());
            }
            other => {
                return Err(format!("unknown argument {other:?}; see the example's doc").into());
            }
        }
    }
    let mut spec = RigSpec::new(workspace_bulwark()?);
    spec.images = images;
    spec.timeout = timeout;
    let run = run_command(&spec, &command)?;
    eprintln!(
        "bulwark rig: status {}; /dev/kvm ready {:.1?} after QEMU start, whole run {:.1?}",
        run.status,
        run.kvm_ready_wall.unwrap_or_default(),
        run.wall
    );
    std::process::exit(run.status.clamp(0, 255));
}
