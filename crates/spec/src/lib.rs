//! The VM description shared by `bulwark run` flags and `--config vm.toml`, and the parsers for
//! human sizes (`256M`) and durations (`10s`).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("bad size `{0}`: use a number with an optional K, M or G suffix, such as 256M")]
    BadSize(String),
    #[error("bad duration `{0}`: use a number with ms, s or m, such as 10s or 500ms")]
    BadDuration(String),
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("config file {path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error(
        "nothing to run: pass --payload FILE, --image DIR or --kernel FILE (or set one in the config file)"
    )]
    NoPayload,
    #[error("give one of payload, image and kernel, not several")]
    Conflict,
    #[error("{0}")]
    BadCommand(String),
    #[error(
        "bad --drive `{0}`: {1}; use path=FILE[,ro=on][,direct=on][,serial=NAME][,backend=process|inline] or just FILE"
    )]
    BadDrive(String, &'static str),
    #[error(
        "bad --vsock `{0}`: {1}; use cid=N,socket=PATH[,backend=process|inline] or just PATH (CID 3)"
    )]
    BadVsock(String, &'static str),
    #[error("bad --net `{0}`: {1}; use tap=NAME[,mac=02:00:00:00:00:01] or just NAME")]
    BadNet(String, &'static str),
    #[error(
        "{field} path `{path}` is relative; a spec sent to bulwarkd needs absolute paths (the CLI resolves them against the config file)"
    )]
    RelativePath { field: &'static str, path: String },
    #[error("{field} = {value}: {why}")]
    BadValue {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("bad spec: {0}; the fields are those of `bulwark run --config` (docs/api.md)")]
    Syntax(String),
}

/// Memory of a function micro-VM when the spec gives none.
pub const DEFAULT_FUNCTION_MEMORY: u64 = 16 << 20;
/// Memory of a Linux guest when the spec gives none.
pub const DEFAULT_LINUX_MEMORY: u64 = 256 << 20;
/// Largest vCPU count a spec may ask for (the host's KVM may allow fewer).
pub const MAX_VCPUS: u32 = 254;
/// Smallest and largest guest memory a spec may ask for.
pub const MEMORY_RANGE: (u64, u64) = (1 << 20, 1 << 40);

/// What kind of VM a spec describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// A payload at CPL3 without an OS.
    Function,
    /// A Linux guest from an image directory or a kernel.
    Linux,
}

/// What a checked spec asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecSummary {
    pub kind: VmKind,
    pub memory: u64,
    pub vcpus: u32,
}

/// A network interface: `--net tap=tap0,mac=02:..` or `[[net]]` in the config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<String>,
    /// Where the tap is read and written; inline (the monitor's device thread) unless given:
    /// with two CPUs in the rig a guest -> host stream through the back-end stalled once
    /// (open bug, docs/devices.md).
    #[serde(default)]
    pub backend: Option<Backend>,
}

/// Parses `02:00:00:00:00:01`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    // Unicast only: a multicast source address breaks the guest's networking.
    (parts.next().is_none() && m[0] & 1 == 0).then_some(m)
}

/// Parses a `--net` value.
pub fn parse_net(s: &str) -> Result<NetSpec, ConfigError> {
    let bad = |why| ConfigError::BadNet(s.to_string(), why);
    let mut n = NetSpec::default();
    if !s.contains('=') {
        n.tap = s.to_string();
    } else {
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad("every option needs a value"))?;
            match k {
                "tap" | "ifname" => n.tap = v.to_string(),
                "mac" => {
                    parse_mac(v).ok_or_else(|| bad("mac must be six hex bytes, unicast"))?;
                    n.mac = Some(v.to_string());
                }
                "backend" => {
                    n.backend = Some(
                        Backend::parse(v).ok_or_else(|| bad("backend takes process or inline"))?,
                    );
                }
                _ => return Err(bad("unknown option (known: tap, mac, backend)")),
            }
        }
    }
    if n.tap.is_empty() || n.tap.len() > 15 || n.tap.contains('/') {
        return Err(bad("the tap name must be 1 to 15 bytes without '/'"));
    }
    Ok(n)
}

/// The vsock device: `--vsock cid=3,socket=/run/vm.vsock`, or `[vsock]` in the config file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    #[serde(default = "default_cid")]
    pub cid: u64,
    pub socket: PathBuf,
    /// Who holds the host streams.
    #[serde(default)]
    pub backend: Backend,
}

fn default_cid() -> u64 {
    3
}

/// Parses a `--vsock` value.
pub fn parse_vsock(s: &str) -> Result<VsockSpec, ConfigError> {
    let bad = |why| ConfigError::BadVsock(s.to_string(), why);
    if !s.contains('=') {
        if s.is_empty() {
            return Err(bad("no socket path given"));
        }
        return Ok(VsockSpec {
            cid: default_cid(),
            socket: s.into(),
            backend: Backend::default(),
        });
    }
    let (mut cid, mut socket, mut backend) = (default_cid(), None, Backend::default());
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad("every option needs a value"))?;
        match k {
            "cid" | "guest_cid" => cid = v.parse().map_err(|_| bad("cid must be a number"))?,
            "socket" | "path" | "uds_path" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            "backend" => {
                backend =
                    Backend::parse(v).ok_or_else(|| bad("backend takes process or inline"))?;
            }
            _ => return Err(bad("unknown option (known: cid, socket, backend)")),
        }
    }
    Ok(VsockSpec {
        cid,
        socket: socket.ok_or_else(|| bad("no socket=PATH"))?,
        backend,
    })
}

/// A virtio-blk drive: `--drive path=disk.img,ro=on,direct=on,serial=data`, or `[[drive]]` in
/// the config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// O_DIRECT: bypass the host page cache.
    #[serde(default)]
    pub direct: bool,
    /// Up to 20 bytes; the guest reads it from /sys/block/vdX/serial.
    pub serial: Option<String>,
    /// Where the drive's file I/O runs.
    #[serde(default)]
    pub backend: Backend,
}

/// Where a device's host side runs (a drive's file I/O, a network interface's tap):
/// `backend=process` (default) or `backend=inline`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A jailed back-end process of its own that never sees guest memory; restarted if it dies.
    #[default]
    Process,
    /// The monitor's device thread, straight into guest memory (faster for small requests,
    /// less isolated).
    Inline,
}

impl Backend {
    fn parse(v: &str) -> Option<Self> {
        match v {
            "process" => Some(Backend::Process),
            "inline" => Some(Backend::Inline),
            _ => None,
        }
    }
}

fn parse_switch(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses a `--drive` value.
pub fn parse_drive(s: &str) -> Result<DriveSpec, ConfigError> {
    let bad = |why| ConfigError::BadDrive(s.to_string(), why);
    if !s.contains('=') {
        if s.is_empty() {
            return Err(bad("no file given"));
        }
        return Ok(DriveSpec {
            path: s.into(),
            ..DriveSpec::default()
        });
    }
    let mut d = DriveSpec::default();
    let mut path = None;
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad("every option needs a value"))?;
        match k {
            "path" | "file" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "ro" | "readonly" | "read_only" => {
                d.read_only = parse_switch(v).ok_or_else(|| bad("ro takes on or off"))?;
            }
            "direct" => d.direct = parse_switch(v).ok_or_else(|| bad("direct takes on or off"))?,
            "serial" => d.serial = Some(v.to_string()),
            "backend" => {
                d.backend =
                    Backend::parse(v).ok_or_else(|| bad("backend takes process or inline"))?;
            }
            _ => {
                return Err(bad(
                    "unknown option (known: path, ro, direct, serial, backend)",
                ));
            }
        }
    }
    d.path = path.ok_or_else(|| bad("no path=FILE"))?;
    Ok(d)
}

/// Parses `256M`, `1G`, `4096`, `512k`, `16MiB`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parses `10s`, `500ms`, `2m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::BadDuration(s.to_string());
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit.trim() {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// `vm.toml`: the same fields as the `run` flags. Unknown keys are errors.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub payload: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub pvh: Option<bool>,
    pub memory: Option<String>,
    pub vcpus: Option<u32>,
    pub arg: Option<String>,
    pub cpl0: Option<bool>,
    pub timeout: Option<String>,
    pub console_limit: Option<String>,
    /// `[[drive]]` tables.
    pub drive: Option<Vec<DriveSpec>>,
    /// `[root]` table: the root filesystem drive.
    pub root: Option<DriveSpec>,
    /// `[vsock]` table.
    pub vsock: Option<VsockSpec>,
    /// `[[net]]` tables.
    pub net: Option<Vec<NetSpec>>,
    /// The guest job for a Linux guest image (what `bulwark run ... -- CMD` gives).
    pub command: Option<Vec<String>>,
    /// Let the VM's owner introspect it: read its kernel's process and module lists from
    /// outside. Only for a Linux guest from an `image`, whose System.map and vmlinux (BTF) are
    /// the kernel's profile.
    pub introspection: Option<bool>,
}

impl FileConfig {
    /// Parses a spec in JSON (the API's form). Unknown fields are errors.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Parses a spec in TOML (a config file's form). Unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Checks everything that can be checked without opening files or KVM: one thing to run,
    /// sane sizes, well-formed devices, absolute paths (a spec travels to another process).
    pub fn check(&self) -> Result<SpecSummary, ConfigError> {
        let kind = match (&self.payload, &self.image, &self.kernel) {
            (Some(_), None, None) => VmKind::Function,
            (None, Some(_), None) | (None, None, Some(_)) => VmKind::Linux,
            (None, None, None) => return Err(ConfigError::NoPayload),
            _ => return Err(ConfigError::Conflict),
        };
        let files = [
            ("payload", &self.payload),
            ("image", &self.image),
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
        ];
        let drives = self.drive.iter().flatten().chain(self.root.as_ref());
        let paths = files
            .into_iter()
            .filter_map(|(f, p)| p.as_deref().map(|p| (f, p)))
            .chain(drives.map(|d| ("drive", d.path.as_path())))
            .chain(
                self.vsock
                    .as_ref()
                    .map(|v| ("vsock socket", v.socket.as_path())),
            );
        for (field, path) in paths {
            if path.is_relative() {
                return Err(ConfigError::RelativePath {
                    field,
                    path: path.display().to_string(),
                });
            }
        }
        let memory = match &self.memory {
            Some(m) => parse_size(m)?,
            None if kind == VmKind::Function => DEFAULT_FUNCTION_MEMORY,
            None => DEFAULT_LINUX_MEMORY,
        };
        if memory < MEMORY_RANGE.0 || memory > MEMORY_RANGE.1 {
            return Err(ConfigError::BadValue {
                field: "memory",
                value: self.memory.clone().unwrap_or_default(),
                why: "guest memory must be between 1M and 1024G",
            });
        }
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(ConfigError::BadValue {
                field: "vcpus",
                value: vcpus.to_string(),
                why: "a VM has between 1 and 254 vCPUs",
            });
        }
        if let Some(t) = &self.timeout {
            parse_duration(t)?;
        }
        if let Some(l) = &self.console_limit {
            parse_size(l)?;
        }
        for n in self.net.iter().flatten() {
            let text = format!("tap={}", n.tap);
            parse_net(&text)?;
            if let Some(m) = &n.mac {
                parse_mac(m).ok_or_else(|| {
                    ConfigError::BadNet(format!("mac={m}"), "mac must be six hex bytes, unicast")
                })?;
            }
        }
        if self.introspection == Some(true) && self.image.is_none() {
            return Err(ConfigError::BadValue {
                field: "introspection",
                value: "true".into(),
                why: "introspection needs a Linux guest from an `image`: its System.map and vmlinux describe the kernel",
            });
        }
        if kind == VmKind::Function && self.command.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(ConfigError::BadValue {
                field: "command",
                value: format!("{:?}", self.command),
                why: "a function micro-VM has no guest job; pass its argument with `arg`",
            });
        }
        Ok(SpecSummary {
            kind,
            memory,
            vcpus,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
        // Relative paths are relative to the config file.
        if let Some(dir) = path.parent() {
            for p in [
                &mut cfg.payload,
                &mut cfg.image,
                &mut cfg.kernel,
                &mut cfg.initrd,
            ] {
                if let Some(rel) = p.as_ref().filter(|p| p.is_relative()) {
                    *p = Some(dir.join(rel));
                }
            }
            for d in cfg.drive.iter_mut().flatten().chain(cfg.root.as_mut()) {
                if d.path.is_relative() {
                    d.path = dir.join(&d.path);
                }
            }
            if let Some(v) = cfg.vsock.as_mut().filter(|v| v.socket.is_relative()) {
                v.socket = dir.join(&v.socket);
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_suffixes_parse() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        for bad in ["", "M", "12X", "-1M", "1.5G", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn drive_specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_drive("disk.img").unwrap().path,
            PathBuf::from("disk.img")
        );
        let d = parse_drive("path=/d.img,ro=on,direct=on,serial=data1").unwrap();
        assert_eq!(
            d,
            DriveSpec {
                path: "/d.img".into(),
                read_only: true,
                direct: true,
                serial: Some("data1".into()),
                backend: Backend::Process,
            }
        );
        let inline = parse_drive("path=/d.img,backend=inline").unwrap();
        assert_eq!(inline.backend, Backend::Inline);
        for (bad, why) in [
            ("path=x,backend=thread", "backend takes process or inline"),
            ("", "no file"),
            ("ro=on", "no path"),
            ("path=x,ro=maybe", "ro takes"),
            ("path=x,cache=none", "unknown option"),
            ("path=x,ro", "needs a value"),
        ] {
            let e = parse_drive(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn vsock_specs_parse() {
        assert_eq!(
            parse_vsock("/run/v.sock").unwrap(),
            VsockSpec {
                cid: 3,
                socket: "/run/v.sock".into(),
                backend: Backend::Process,
            }
        );
        assert_eq!(parse_vsock("cid=7,socket=v").unwrap().cid, 7);
        assert_eq!(
            parse_vsock("socket=v,backend=inline").unwrap().backend,
            Backend::Inline
        );
        for (bad, why) in [
            ("cid=x,socket=v", "must be a number"),
            ("socket=v,backend=thread", "backend takes process or inline"),
            ("cid=4", "no socket"),
            ("port=1,socket=v", "unknown option"),
        ] {
            let e = parse_vsock(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn net_specs_parse() {
        assert_eq!(parse_net("tap0").unwrap().tap, "tap0");
        let n = parse_net("tap=t1,mac=02:aa:bb:cc:dd:ee").unwrap();
        assert_eq!(
            parse_mac(n.mac.as_deref().unwrap()),
            Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])
        );
        for (bad, why) in [
            ("tap=t1,mac=01:00:00:00:00:00", "unicast"),
            ("tap=t1,mac=zz", "six hex"),
            ("tap=", "1 to 15"),
            ("averyveryverylongname", "1 to 15"),
            ("tap=t,vlan=3", "unknown option"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn duration_units_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn check_accepts_good_specs_and_names_what_is_wrong() {
        let ok = FileConfig::from_json(r#"{"payload":"/p.elf","memory":"32M","vcpus":2}"#).unwrap();
        assert_eq!(
            ok.check().unwrap(),
            SpecSummary {
                kind: VmKind::Function,
                memory: 32 << 20,
                vcpus: 2
            }
        );
        let linux = FileConfig::from_toml("image = \"/img\"\ncommand = [\"true\"]\n").unwrap();
        assert_eq!(linux.check().unwrap().memory, DEFAULT_LINUX_MEMORY);
        for (json, why) in [
            (r#"{}"#, "nothing to run"),
            (r#"{"payload":"/p","image":"/i"}"#, "not several"),
            (r#"{"payload":"p.elf"}"#, "relative"),
            (
                r#"{"payload":"/p","memory":"9999G"}"#,
                "between 1M and 1024G",
            ),
            (r#"{"payload":"/p","memory":"lots"}"#, "bad size"),
            (r#"{"payload":"/p","vcpus":0}"#, "between 1 and 254"),
            (r#"{"payload":"/p","timeout":"1h"}"#, "bad duration"),
            (r#"{"payload":"/p","command":["ls"]}"#, "no guest job"),
            (r#"{"image":"/i","drive":[{"path":"d.img"}]}"#, "relative"),
            (
                r#"{"image":"/i","net":[{"tap":"averyveryverylongname"}]}"#,
                "1 to 15",
            ),
        ] {
            let e = FileConfig::from_json(json)
                .unwrap()
                .check()
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
        let e = FileConfig::from_json(r#"{"payload":"/p","memroy":"1M"}"#).unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
    }

    #[test]
    fn config_file_rejects_unknown_keys_and_resolves_paths() {
        let dir = std::env::temp_dir().join(format!("bulwark-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(&f, "payload = \"p.elf\"\nmemory = \"32M\"\nvcpus = 2\n").unwrap();
        let c = FileConfig::load(&f).unwrap();
        assert_eq!(c.payload, Some(dir.join("p.elf")));
        assert_eq!(c.vcpus, Some(2));
        std::fs::write(
            &f,
            "image = \"img\"\n[[drive]]\npath = \"a.img\"\nread_only = true\n",
        )
        .unwrap();
        let c = FileConfig::load(&f).unwrap();
        let drives = c.drive.unwrap();
        assert_eq!(drives[0].path, dir.join("a.img"));
        assert!(drives[0].read_only);
        std::fs::write(&f, "payload = \"p.elf\"\nmemroy = \"32M\"\n").unwrap();
        let e = FileConfig::load(&f).unwrap_err().to_string();
        assert!(e.contains("memroy"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
