//! Building initramfs archives: a busybox userland, kernel modules, extra files, and `/init`.
//!
//! [`Initramfs`] is shared by guest images ([`crate::build_image`]) and the nested test rig's L1
//! archive: both need the same skeleton (directories, `/dev/console`, busybox and its applet
//! links, modules with a `modules.dep`) and differ in their `/init` and payload files.
//!
//! Archives are written **uncompressed**: the kernel then copies the archive instead of inflating
//! it during boot (single-threaded, in the guest's ring 0, where time is the most expensive —
//! under the rig's emulated CPU especially); the monitor can check the `070701` magic of an initrd
//! directly; and the size cost is small (a guest image's archive is a few MiB and stays in the
//! host's page cache).

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{CpioError, CpioWriter};
use crate::elf::Elf;
use crate::modules::{Module, ModuleSet};

/// Directories every archive has.
const SKELETON: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("mnt", 0o755),
];

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("cannot write the initramfs")]
    Cpio(#[from] CpioError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a static x86-64 executable ({problem}); the initramfs has no shared libraries: use busybox-static / a statically linked build"
    )]
    NotStatic { path: PathBuf, problem: String },
    #[error("cannot run `{path} --list-full` to list busybox applets")]
    BusyboxList {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path} --list-full` listed no applets; is it really busybox?")]
    NoApplets { path: PathBuf },
    #[error("extra file {path:?}: {problem}")]
    BadExtraFile { path: String, problem: &'static str },
}

/// Where an extra file's bytes come from.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// A file on the host, read when the archive is written.
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// A file to put into an initramfs: the hook through which later components (the guest agent,
/// test programs) join an image.
#[derive(Clone, Debug)]
pub struct ExtraFile {
    /// Absolute path in the guest, e.g. `/usr/bin/bulwark-agent`.
    pub path: String,
    pub source: FileSource,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

impl ExtraFile {
    pub fn host(path: impl Into<String>, host: impl Into<PathBuf>, mode: u32) -> Self {
        Self {
            path: path.into(),
            source: FileSource::Host(host.into()),
            mode,
        }
    }

    pub fn bytes(path: impl Into<String>, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            source: FileSource::Bytes(data.into()),
            mode,
        }
    }
}

/// An initramfs being written.
pub struct Initramfs<W: Write> {
    cpio: CpioWriter<W>,
}

impl Initramfs<BufWriter<std::fs::File>> {
    /// Creates `path` with the skeleton already in it.
    pub fn create(path: &Path) -> Result<Self, InitramfsError> {
        let file = std::fs::File::create(path).map_err(|source| InitramfsError::Create {
            path: path.to_owned(),
            source,
        })?;
        Self::new(BufWriter::with_capacity(1 << 20, file))
    }
}

impl<W: Write> Initramfs<W> {
    /// Starts an archive with the directory skeleton and `/dev/console` (the kernel opens it for
    /// init's stdio before devtmpfs is mounted).
    pub fn new(out: W) -> Result<Self, InitramfsError> {
        let mut cpio = CpioWriter::new(out);
        for (dir, mode) in SKELETON {
            cpio.dir(dir, *mode)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        Ok(Self { cpio })
    }

    /// The underlying writer, for entries this type has no helper for.
    pub fn cpio(&mut self) -> &mut CpioWriter<W> {
        &mut self.cpio
    }

    /// `/bin/busybox` and a symlink for each applet it lists (`busybox --list-full`). Returns the
    /// number of applets.
    pub fn busybox(&mut self, busybox: &Path) -> Result<usize, InitramfsError> {
        let data = std::fs::read(busybox).map_err(|source| InitramfsError::Read {
            path: busybox.to_owned(),
            source,
        })?;
        check_static(busybox, &data)?;
        let out = Command::new(busybox)
            .arg("--list-full")
            .output()
            .map_err(|source| InitramfsError::BusyboxList {
                path: busybox.to_owned(),
                source,
            })?;
        let list = String::from_utf8_lossy(&out.stdout);
        let applets = applet_paths(&list);
        if applets.is_empty() {
            return Err(InitramfsError::NoApplets {
                path: busybox.to_owned(),
            });
        }
        self.cpio.file("bin/busybox", 0o755, &data)?;
        for a in &applets {
            if !self.cpio.contains(a) {
                self.cpio.symlink(a, "/bin/busybox")?;
            }
        }
        Ok(applets.len())
    }

    /// The modules under `lib/modules/<release>/` and a `modules.dep` for them.
    pub fn modules(&mut self, set: &ModuleSet) -> Result<(), InitramfsError> {
        let base = format!("lib/modules/{}", set.release);
        for m in &set.modules {
            self.cpio
                .file(&format!("{base}/{}", m.path), 0o644, &m.data)?;
        }
        self.cpio.file(
            &format!("{base}/modules.dep"),
            0o644,
            set.modules_dep().render().as_bytes(),
        )?;
        Ok(())
    }

    /// One extra file.
    pub fn extra(&mut self, f: &ExtraFile) -> Result<(), InitramfsError> {
        if !f.path.starts_with('/') {
            return Err(InitramfsError::BadExtraFile {
                path: f.path.clone(),
                problem: "give an absolute guest path",
            });
        }
        match &f.source {
            FileSource::Bytes(b) => self.cpio.file(&f.path, f.mode, b)?,
            FileSource::Host(p) => self.host_file(p, &f.path, f.mode)?,
        }
        Ok(())
    }

    /// A host file, streamed (it may be large: a vmlinux is ~55 MiB).
    pub fn host_file(&mut self, host: &Path, guest: &str, mode: u32) -> Result<(), InitramfsError> {
        let read_err = |source| InitramfsError::Read {
            path: host.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(host).map_err(read_err)?;
        let len = file.metadata().map_err(read_err)?.len();
        self.cpio.file_from_reader(guest, mode, len, &mut file)?;
        Ok(())
    }

    /// The regular files directly in `host` (not recursive), under `guest`.
    pub fn host_dir(&mut self, host: &Path, guest: &str) -> Result<(), InitramfsError> {
        let read_err = |source| InitramfsError::Read {
            path: host.to_owned(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(host)
            .map_err(read_err)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        self.cpio.dir(guest, 0o755)?;
        for f in files {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            self.host_file(
                &f,
                &format!("{}/{name}", guest.trim_end_matches('/')),
                0o644,
            )?;
        }
        Ok(())
    }

    /// `/init` with the given shell script.
    pub fn init(&mut self, script: &str) -> Result<(), InitramfsError> {
        self.cpio.file("init", 0o755, script.as_bytes())?;
        Ok(())
    }

    /// Ends the archive; returns the writer and the archive's size.
    pub fn finish(self) -> Result<(W, u64), InitramfsError> {
        Ok(self.cpio.finish_with_len()?)
    }
}

/// Refuses dynamically linked or non-x86-64 executables: the archive has no loader or libraries.
pub fn check_static(path: &Path, data: &[u8]) -> Result<(), InitramfsError> {
    let not_static = |problem: String| InitramfsError::NotStatic {
        path: path.to_owned(),
        problem,
    };
    let elf = Elf::parse(data).map_err(|e| not_static(e.to_string()))?;
    if elf.is_dynamic() {
        return Err(not_static(
            "it asks for a dynamic loader (PT_INTERP)".into(),
        ));
    }
    Ok(())
}

/// Applet paths from `busybox --list-full` (`usr/bin/awk`, ...), keeping only the usual
/// directories.
fn applet_paths(list: &str) -> Vec<String> {
    list.lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|l| {
            ["bin/", "sbin/", "usr/bin/", "usr/sbin/"]
                .iter()
                .any(|d| l.starts_with(d) && l.len() > d.len() && !l[d.len()..].contains('/'))
        })
        .filter(|l| *l != "bin/busybox")
        .map(str::to_owned)
        .collect()
}

/// The ready line's prefix; the line is `bulwark-guest: ready uptime=<seconds>`.
pub const READY_PREFIX: &str = "bulwark-guest: ready uptime=";
/// Prefix of the line giving the job's exit status: `bulwark-guest: exit status <N>`.
pub const EXIT_PREFIX: &str = "bulwark-guest: exit status ";
/// The first word after `--` on the kernel command line of a guest booted from an image: the
/// job is what follows it. The kernel also hands init every word of its command line it does
/// not know (`nokaslr`, `1`, `single`), ahead of the words after `--`; `/init` drops them.
pub const JOB_MARKER: &str = "bulwark.job";

/// Virtio device drivers that `/init` loads only when the VM has such a device: the module and
/// the virtio device ID it drives (as `/sys/bus/virtio/devices/*/device` shows it, `0x%04x`).
/// A VM without a network device loads no network stack modules, one without vsock no vsock.
pub const ON_DEMAND_DRIVERS: &[(&str, u16)] = &[
    ("virtio_net", 1),
    ("virtio_blk", 2),
    ("virtio_console", 3),
    ("virtio_rng", 4),
    ("virtio_balloon", 5),
    ("vmw_vsock_virtio_transport", 19),
];

/// How `/init` loads `set`: the modules to load at once (in set order), and for each on-demand
/// driver the device ID and what it brings (its dependencies that are not loaded at once, then
/// itself, in set order). A driver that another module needs is loaded at once.
fn load_plan(set: &ModuleSet) -> (Vec<&Module>, Vec<(u16, Vec<&Module>)>) {
    let by_name: HashMap<&str, &Module> =
        set.modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let needed: HashSet<&str> = set
        .modules
        .iter()
        .flat_map(|m| m.depends.iter().map(String::as_str))
        .collect();
    fn closure<'a>(by_name: &HashMap<&'a str, &'a Module>, root: &'a str) -> HashSet<&'a str> {
        let mut seen = HashSet::new();
        let mut todo = vec![root];
        while let Some(n) = todo.pop() {
            if seen.insert(n)
                && let Some(m) = by_name.get(n)
            {
                todo.extend(m.depends.iter().map(String::as_str));
            }
        }
        seen
    }
    let device_of = |name: &str| {
        ON_DEMAND_DRIVERS
            .iter()
            .find(|(d, _)| *d == name)
            .map(|(_, id)| *id)
    };
    let roots = set
        .modules
        .iter()
        .filter(|m| !needed.contains(m.name.as_str()));
    let mut at_once = HashSet::new();
    for m in roots.clone().filter(|m| device_of(&m.name).is_none()) {
        at_once.extend(closure(&by_name, &m.name));
    }
    let in_order = |pick: &dyn Fn(&str) -> bool| -> Vec<&Module> {
        set.modules.iter().filter(|m| pick(&m.name)).collect()
    };
    let first = in_order(&|n| at_once.contains(n));
    let drivers = roots
        .filter_map(|m| Some((device_of(&m.name)?, closure(&by_name, &m.name))))
        .map(|(id, brings)| {
            (
                id,
                in_order(&|n| brings.contains(n) && !at_once.contains(n)),
            )
        })
        .collect();
    (first, drivers)
}

/// The guest's `/init`: a busybox shell script that mounts proc, sys and devtmpfs, loads
/// `set`'s modules in order — the virtio device drivers of [`ON_DEMAND_DRIVERS`] only for the
/// devices the VM has (one that does not match the running kernel is reported, not fatal) —
/// prints the ready line, then runs its arguments (everything after `--` on the kernel command
/// line) as the job, prints the job's status and powers off; without arguments it runs a shell
/// on the console and powers off when it exits.
pub fn guest_init_script(set: &ModuleSet) -> String {
    let line = |m: &Module| format!("load {} /lib/modules/{}/{}", m.name, set.release, m.path);
    let (first, drivers) = load_plan(set);
    let mut loads = String::new();
    for m in first {
        loads.push_str(&format!("    {}\n", line(m)));
    }
    if !drivers.is_empty() {
        // virtio_mmio has found every device by now (its probe runs as it loads).
        loads.push_str(
            "    for dev in /sys/bus/virtio/devices/*; do\n        [ -r \"$dev/device\" ] || continue\n        read -r id <\"$dev/device\"\n        case \"$id\" in\n",
        );
        for (id, brings) in drivers {
            let cmds: Vec<String> = brings.into_iter().map(line).collect();
            loads.push_str(&format!("        0x{id:04x}) {} ;;\n", cmds.join("; ")));
        }
        loads.push_str("        esac\n    done\n");
    }
    if loads.is_empty() {
        loads.push_str("    :\n");
    }
    format!(
        r#"#!/bin/sh
# /init of a bulwark guest image (generated by bulwark-image; see crates/image/src/initramfs.rs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${{TERM:-linux}}
# First stage (from the initramfs): mounts and modules; then, when the kernel command line
# names a root disk (bulwark.root=/dev/vda), switch to it and run this same script there.
if [ -z "$BULWARK_ROOT_SWITCHED" ]; then
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd 2>/dev/null

release={release}
load() {{
    [ -d "/sys/module/$1" ] && return 0
    err=$(insmod "$2" 2>&1) && return 0
    case "$err" in
    *"File exists"*) return 0 ;;
    *"Invalid module format"*|*"Exec format error"*)
        echo "bulwark-guest: module $1 does not match kernel $(uname -r): rebuild the image from the kernel package that is booted" ;;
    *) echo "bulwark-guest: cannot load module $1: $err" ;;
    esac
}}
if [ "$(uname -r)" = "$release" ]; then
{loads}else
    echo "bulwark-guest: modules are for kernel $release but the running kernel is $(uname -r); not loading them: boot the kernel of the same image"
fi

root=$(sed -n 's/.*bulwark\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$root" ]; then
    mkdir -p /newroot
    if mount -t ext4 "$root" /newroot && [ -x /newroot/init ]; then
        for m in proc sys dev run; do mount --move /$m /newroot/$m; done
        export BULWARK_ROOT_SWITCHED=1
        exec switch_root /newroot /init "$@"
    fi
    echo "bulwark-guest: cannot use $root as the root filesystem; staying in the initramfs"
fi
fi

# The guest agent (bulwark exec / bulwark agent ps over vsock), when the image has it.
if [ -x /usr/bin/bulwark-agent ]; then
    /usr/bin/bulwark-agent >/run/bulwark-agent.log 2>&1 </dev/null &
fi

# The ACPI power button (bulwarkd's graceful stop): sync and power off when it is pressed.
for ev in /sys/class/input/event*; do
    [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (dd if="/dev/input/${{ev##*/}}" of=/dev/null bs=24 count=1 2>/dev/null && sync && poweroff -f) &
done

# Words before {job} are kernel arguments the kernel did not know, not the job.
for a in "$@"; do
    if [ "$a" = {job} ]; then
        while [ "$1" != {job} ]; do shift; done
        shift
        break
    fi
done

read -r uptime _ </proc/uptime
echo "{ready}$uptime"
if [ "$#" -gt 0 ]; then
    # The job runs in its own session on the console. Before it ends, wait for its output to
    # drain (stty sets with TCSADRAIN): the session's hangup would discard what is still queued.
    setsid cttyhack sh -c '"$@"; rc=$?; stty icrnl 2>/dev/null; exit $rc' job "$@"
    status=$?
    echo "{exit}$status"
else
    setsid cttyhack sh
fi
sync
poweroff -f
"#,
        release = set.release,
        ready = READY_PREFIX,
        exit = EXIT_PREFIX,
        job = JOB_MARKER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;
    use crate::modules::Module;

    #[test]
    fn initramfs_skeleton_console_and_extra_files() {
        let mut ir = Initramfs::new(Vec::new()).unwrap();
        ir.extra(&ExtraFile::bytes(
            "/usr/bin/agent",
            b"\x7fELF".to_vec(),
            0o755,
        ))
        .unwrap();
        ir.init("#!/bin/sh\n").unwrap();
        assert!(matches!(
            ir.extra(&ExtraFile::bytes("/init", b"x".to_vec(), 0o755)),
            Err(InitramfsError::Cpio(CpioError::DuplicatePath(_)))
        ));
        assert!(matches!(
            ir.extra(&ExtraFile::bytes("relative", b"x".to_vec(), 0o644)),
            Err(InitramfsError::BadExtraFile { .. })
        ));
        let (bytes, _) = ir.finish().unwrap();
        let entries = cpio::parse(&bytes).unwrap();
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("dev/console").mode, cpio::S_IFCHR | 0o600);
        assert_eq!(get("tmp").perm(), 0o1777);
        assert_eq!(get("usr/bin/agent").perm(), 0o755);
        assert_eq!(get("init").data, b"#!/bin/sh\n");
    }

    #[test]
    fn initramfs_modules_land_under_release_with_modules_dep() {
        let set = ModuleSet {
            release: "6.1.0-99-cloud-amd64".into(),
            modules: vec![
                Module {
                    name: "virtio".into(),
                    path: "kernel/drivers/virtio/virtio.ko".into(),
                    data: b"a".to_vec(),
                    depends: vec![],
                },
                Module {
                    name: "virtio_mmio".into(),
                    path: "kernel/drivers/virtio/virtio_mmio.ko".into(),
                    data: b"b".to_vec(),
                    depends: vec!["virtio".into()],
                },
            ],
            builtin: vec![],
        };
        let mut ir = Initramfs::new(Vec::new()).unwrap();
        ir.modules(&set).unwrap();
        let (bytes, _) = ir.finish().unwrap();
        let entries = cpio::parse(&bytes).unwrap();
        let dep = entries
            .iter()
            .find(|e| e.name == "lib/modules/6.1.0-99-cloud-amd64/modules.dep")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&dep.data),
            "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko\n"
        );
        assert!(
            entries.iter().any(|e| e.name
                == "lib/modules/6.1.0-99-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko")
        );

        let script = guest_init_script(&set);
        let virtio = script.find("load virtio /lib").unwrap();
        let mmio = script.find("load virtio_mmio /lib").unwrap();
        assert!(virtio < mmio);
        assert!(script.contains("release=6.1.0-99-cloud-amd64\n"));
        assert_eq!(script.matches(READY_PREFIX).count(), 1);
        assert!(script.contains("poweroff -f"));
    }

    #[test]
    fn initramfs_virtio_drivers_load_only_for_devices_present() {
        let m = |name: &str, deps: &[&str]| Module {
            name: name.into(),
            path: format!("kernel/{name}.ko"),
            data: vec![],
            depends: deps.iter().map(|d| (*d).to_owned()).collect(),
        };
        let set = ModuleSet {
            release: "6.1.0-99-cloud-amd64".into(),
            modules: vec![
                m("pvpanic", &[]),
                m("pvpanic_mmio", &["pvpanic"]),
                m("virtio", &[]),
                m("virtio_ring", &[]),
                m("virtio_mmio", &["virtio", "virtio_ring"]),
                m("virtio_blk", &["virtio", "virtio_ring"]),
                m("failover", &[]),
                m("net_failover", &["failover"]),
                m("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
                m("vsock", &[]),
                m("vmw_vsock_virtio_transport_common", &["vsock"]),
                m(
                    "vmw_vsock_virtio_transport",
                    &["vmw_vsock_virtio_transport_common", "vsock", "virtio"],
                ),
                m("button", &[]),
            ],
            builtin: vec![],
        };
        let (first, drivers) = load_plan(&set);
        let names = |ms: &[&Module]| ms.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&first),
            [
                "pvpanic",
                "pvpanic_mmio",
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "button"
            ]
        );
        let drivers: Vec<(u16, Vec<String>)> =
            drivers.iter().map(|(id, ms)| (*id, names(ms))).collect();
        assert_eq!(
            drivers,
            [
                (2, vec!["virtio_blk".to_owned()]),
                (
                    1,
                    vec![
                        "failover".to_owned(),
                        "net_failover".to_owned(),
                        "virtio_net".to_owned()
                    ]
                ),
                (
                    19,
                    vec![
                        "vsock".to_owned(),
                        "vmw_vsock_virtio_transport_common".to_owned(),
                        "vmw_vsock_virtio_transport".to_owned()
                    ]
                ),
            ]
        );
        let script = guest_init_script(&set);
        let mmio = script.find("load virtio_mmio /lib").unwrap();
        let scan = script.find("for dev in /sys/bus/virtio/devices/*").unwrap();
        let blk = script.find("0x0002) load virtio_blk /lib").unwrap();
        assert!(mmio < scan && scan < blk, "{script}");
        assert!(
            script
                .contains("0x0013) load vsock /lib/modules/6.1.0-99-cloud-amd64/kernel/vsock.ko;")
        );
        // A driver another module needs is not left to a device.
        let mut needy = set.clone();
        needy.modules.push(m("uses_blk", &["virtio_blk"]));
        let (first, _) = load_plan(&needy);
        assert!(names(&first).contains(&"virtio_blk".to_owned()));
    }

    #[test]
    fn initramfs_applet_list_keeps_bin_dirs_only() {
        let list = "bin/busybox\nbin/sh\nusr/bin/awk\nsbin/poweroff\nlinuxrc\nusr/sbin/x/y\n";
        assert_eq!(
            applet_paths(list),
            ["bin/sh", "usr/bin/awk", "sbin/poweroff"]
        );
    }

    #[test]
    fn initramfs_dynamic_executables_are_refused() {
        let data = crate::elf::synthetic_elf(2, &[(".text", 1, vec![0xc3])], false);
        check_static(Path::new("x"), &data).unwrap();
        let e = check_static(Path::new("y"), b"#!/bin/sh").unwrap_err();
        assert!(matches!(e, InitramfsError::NotStatic { .. }));
    }
}
