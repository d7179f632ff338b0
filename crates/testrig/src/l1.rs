//! The L1 initramfs: what the rig's QEMU guest boots into.
//!
//! Layout inside L1:
//!
//! | path | what |
//! | --- | --- |
//! | `/init` | [`l1_init_script`]: mounts, `insmod`s irqbypass, kvm, kvm-amd (order from the kernel package's metadata), prints the markers, runs the script |
//! | `/bin/busybox` + applet links | busybox-static |
//! | `/bin/bulwark` | the caller's static bulwark binary |
//! | `/images/<name>/` | the files of each guest image directory (bzImage, vmlinux, initramfs.cpio, manifest.json, ...) |
//! | `/rig/script.sh` | the caller's script, after [`SCRIPT_PRELUDE`] |
//! | anything else | [`bulwark_image::ExtraFile`]s at their own paths |

use std::path::{Path, PathBuf};

use bulwark_image::initramfs::{self, ExtraFile, Initramfs, InitramfsError};
use bulwark_image::modules::{ModuleSet, ModulesError};

/// Modules L1 loads (dependencies are added): kvm_amd gives it a `/dev/kvm` on the emulated
/// AMD CPU; tun (tap devices for virtio-net) and loop (block devices for O_DIRECT benchmarks)
/// serve the device tests.
pub const KVM_MODULES: &[&str] = &["kvm_amd", "tun", "loop"];
/// Where the bulwark binary lands in L1 (on `PATH`).
pub const BULWARK_PATH: &str = "/bin/bulwark";
/// Where image directories land in L1: `/images/<name>`.
pub const IMAGES_DIR: &str = "/images";
/// The script's path in L1.
pub const SCRIPT_PATH: &str = "/rig/script.sh";

/// Prepended to every script: a `section` helper for [`crate::Sections`].
pub const SCRIPT_PRELUDE: &str = "# bulwark rig prelude\nsection() { echo \"=== $*\"; }\ncd /\n";

/// Where L1's `/init` keeps the process id of its heartbeat loop (which writes L1's uptime to
/// `/dev/ttyS1` every 2 s, for the host's wedge watch).
pub const HEARTBEAT_PID: &str = "/run/bulwark-rig-heartbeat.pid";

/// Marker lines printed by L1's `/init` (all start with this).
pub const MARK: &str = "bulwark-rig: ";

#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error(
        "cannot read the bulwark binary {path}: build it (`cargo build -p bulwark-cli`) or pass another path"
    )]
    Bulwark {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "image name {0:?} is not usable as a directory name: use letters, digits, `-`, `_`, `.`"
    )]
    BadImageName(String),
    #[error(
        "{0} is not an image directory (no manifest.json): build it with `bulwark image build --out DIR`"
    )]
    NotAnImage(PathBuf),
}

/// A guest image directory to put at `/images/<name>` in L1.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub name: String,
    pub dir: PathBuf,
    /// Only these files of the directory (plus `manifest.json`); all when `None`. The ~55 MiB
    /// `vmlinux` costs L1 about 0.3 s of boot, so tests that boot only the bzImage can leave it
    /// out.
    pub only: Option<Vec<String>>,
}

impl GuestImage {
    pub fn new(name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            dir: dir.into(),
            only: None,
        }
    }

    /// Carries only `files` (and the manifest).
    pub fn only(mut self, files: &[&str]) -> Self {
        self.only = Some(files.iter().map(|f| (*f).to_owned()).collect());
        self
    }
}

/// Everything L1's archive is made of.
pub struct L1Contents<'a> {
    pub busybox: &'a Path,
    pub kvm_modules: &'a ModuleSet,
    pub bulwark: &'a Path,
    pub images: &'a [GuestImage],
    pub files: &'a [ExtraFile],
    pub script: &'a str,
    /// Unique per run; the markers carry it so that no script output can fake them.
    pub nonce: &'a str,
}

/// Writes L1's initramfs to `path`; returns its size in bytes.
pub fn write_l1_initramfs(path: &Path, c: &L1Contents<'_>) -> Result<u64, L1Error> {
    check_images(c.images)?;
    let mut ir = Initramfs::create(path)?;
    ir.busybox(c.busybox)?;
    ir.modules(c.kvm_modules)?;
    let bulwark = std::fs::read(c.bulwark).map_err(|source| L1Error::Bulwark {
        path: c.bulwark.to_owned(),
        source,
    })?;
    initramfs::check_static(c.bulwark, &bulwark)?;
    ir.cpio()
        .file(BULWARK_PATH, 0o755, &bulwark)
        .map_err(InitramfsError::from)?;
    drop(bulwark);
    for image in c.images {
        let guest = format!("{IMAGES_DIR}/{}", image.name);
        match &image.only {
            None => ir.host_dir(&image.dir, &guest)?,
            Some(files) => {
                let manifest = bulwark_image::manifest::MANIFEST_FILE;
                for f in files.iter().map(String::as_str).chain([manifest]) {
                    if f.contains('/') {
                        return Err(L1Error::BadImageName(format!("{}/{f}", image.name)));
                    }
                    ir.host_file(&image.dir.join(f), &format!("{guest}/{f}"), 0o644)?;
                }
            }
        }
    }
    for f in c.files {
        ir.extra(f)?;
    }
    let script = format!("{SCRIPT_PRELUDE}{}\n", c.script);
    ir.extra(&ExtraFile::bytes(SCRIPT_PATH, script, 0o755))?;
    ir.init(&l1_init_script(c.kvm_modules, c.nonce))?;
    let (_, len) = ir.finish()?;
    Ok(len)
}

/// Image names must be plain directory names, and image directories complete (have a manifest).
pub fn check_images(images: &[GuestImage]) -> Result<(), L1Error> {
    for image in images {
        let ok = !image.name.is_empty()
            && image.name != "."
            && image.name != ".."
            && image
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
        if !ok {
            return Err(L1Error::BadImageName(image.name.clone()));
        }
        if !image
            .dir
            .join(bulwark_image::manifest::MANIFEST_FILE)
            .is_file()
        {
            return Err(L1Error::NotAnImage(image.dir.clone()));
        }
    }
    Ok(())
}

/// L1's `/init`. Markers, each on its own line:
/// - `bulwark-rig: kvm ready uptime=<s>` (or `bulwark-rig: no kvm uptime=<s>`),
/// - `bulwark-rig: begin <nonce>` just before the script,
/// - `bulwark-rig: end <nonce> status=<N>` with the script's exit status; then L1 powers off.
///
/// Before the script it starts a heartbeat on the second serial port (pid in
/// [`HEARTBEAT_PID`]).
///
/// The script runs as `setsid cttyhack sh /rig/script.sh`: its own session with the console as
/// controlling terminal, so that programs that put the terminal in raw mode (bulwark's console)
/// and Ctrl-C work.
pub fn l1_init_script(kvm: &ModuleSet, nonce: &str) -> String {
    let mut loads = String::new();
    for m in &kvm.modules {
        loads.push_str(&format!(
            "insmod /lib/modules/{}/{} || echo \"{MARK}cannot load {}\"\n",
            kvm.release, m.path, m.name
        ));
    }
    format!(
        r#"#!/bin/sh
# /init of the bulwark nested test rig's L1 (generated by bulwark-testrig; see crates/testrig/src/l1.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${{TERM:-linux}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
{loads}read -r uptime _ </proc/uptime
if [ -c /dev/kvm ]; then
    echo "{MARK}kvm ready uptime=$uptime"
else
    echo "{MARK}no kvm uptime=$uptime"
fi
# A heartbeat on the second serial port: the host takes L1 for wedged when it stops.
# Raw and without echo: the host's nudges (a byte now and then) are not sent back.
stty -F /dev/ttyS1 raw -echo 2>/dev/null
(while :; do read -r up _ </proc/uptime; echo "$up"; sleep 2; done) >/dev/ttyS1 2>/dev/null &
echo $! >{HEARTBEAT_PID}
echo "{MARK}begin {nonce}"
setsid cttyhack sh {SCRIPT_PATH}
status=$?
echo "{MARK}end {nonce} status=$status"
sync
poweroff -f
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_image::modules::Module;

    fn kvm_set() -> ModuleSet {
        let m = |name: &str, path: &str| Module {
            name: name.into(),
            path: path.into(),
            data: vec![],
            depends: vec![],
        };
        ModuleSet {
            release: "6.1.0-99-cloud-amd64".into(),
            modules: vec![
                m("irqbypass", "kernel/virt/lib/irqbypass.ko"),
                m("kvm", "kernel/arch/x86/kvm/kvm.ko"),
                m("kvm_amd", "kernel/arch/x86/kvm/kvm-amd.ko"),
            ],
            builtin: vec![],
        }
    }

    #[test]
    fn l1_init_loads_kvm_in_order_and_prints_markers_with_nonce() {
        let s = l1_init_script(&kvm_set(), "abc123");
        let a = s.find("irqbypass.ko").unwrap();
        let b = s.find("kvm/kvm.ko").unwrap();
        let c = s.find("kvm-amd.ko").unwrap();
        assert!(a < b && b < c);
        assert!(s.contains("echo \"bulwark-rig: begin abc123\""));
        assert!(s.contains("echo \"bulwark-rig: end abc123 status=$status\""));
        assert!(s.contains("setsid cttyhack sh /rig/script.sh"));
        assert!(s.ends_with("poweroff -f\n"));
    }

    #[test]
    fn l1_bad_image_names_and_non_images_are_refused() {
        let dir = std::env::temp_dir().join(format!("bulwark-l1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["", ".", "..", "../x", "a/b", "a b"] {
            assert!(
                matches!(
                    check_images(&[GuestImage::new(name, &dir)]),
                    Err(L1Error::BadImageName(_))
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            check_images(&[GuestImage::new("default", &dir)]),
            Err(L1Error::NotAnImage(_))
        ));
        std::fs::write(dir.join("manifest.json"), "{}").unwrap();
        check_images(&[GuestImage::new("debian-6.1_x", &dir)]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
