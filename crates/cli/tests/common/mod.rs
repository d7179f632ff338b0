//! Helpers for end-to-end tests: build payloads with `bulwark payload build` and run them with
//! `bulwark run` on the host's real /dev/kvm.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn bulwark() -> &'static str {
    env!("CARGO_BIN_EXE_bulwark")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// These tests run real VMs. Without KVM they must fail, loudly, never skip.
pub fn require_kvm() {
    static CHECK: OnceLock<()> = OnceLock::new();
    CHECK.get_or_init(|| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm");
        if let Err(e) = f {
            panic!(
                "these tests run real VMs and need /dev/kvm (read-write): {e}. \
                 Run on a KVM host as root or as a member of the kvm group."
            );
        }
    });
}

/// A directory for one test's files, removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("bulwark-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds `src` (relative to the repo root) into `dir`; assembly gets no C start-up code.
pub fn build_payload(dir: &TestDir, src: &str) -> PathBuf {
    let src = repo_root().join(src);
    let name = src.file_stem().unwrap().to_string_lossy().into_owned();
    let out = dir.path(&format!("{name}.elf"));
    let mut cmd = Command::new(bulwark());
    cmd.args(["payload", "build"]).arg(&src).arg("-o").arg(&out);
    if src.extension().is_some_and(|e| e == "S") {
        cmd.arg("--no-crt0");
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "building {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Runs `bulwark` with `args`, feeding `stdin`.
pub fn run(args: &[&str], stdin: &[u8]) -> Output {
    run_fed(args, stdin, false)
}

/// As [`run`], but input stays open (and silent) after `stdin` until bulwark exits: a guest
/// that reads more blocks until something else ends it.
pub fn run_with_open_input(args: &[&str], stdin: &[u8]) -> Output {
    run_fed(args, stdin, true)
}

fn run_fed(args: &[&str], stdin: &[u8], keep_open: bool) -> Output {
    let mut child = Command::new(bulwark())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        keep_open.then_some(input)
    });
    let out = child.wait_with_output().unwrap();
    drop(writer.join().unwrap());
    out
}

/// `tests/payloads/blk_io.c`'s 40 input bytes: the secret, then the rounds and blocks.
pub fn blk_io_input(secret: &[u8; 32], rounds: u32, blocks: u32) -> Vec<u8> {
    let mut v = secret.to_vec();
    v.extend_from_slice(&rounds.to_le_bytes());
    v.extend_from_slice(&blocks.to_le_bytes());
    v
}

/// Runs a payload file with extra flags.
pub fn run_payload(payload: &Path, extra: &[&str], stdin: &[u8]) -> Output {
    let p = payload.to_str().unwrap();
    let mut args = vec!["run", "--payload", p, "--stats"];
    args.extend_from_slice(extra);
    run(&args, stdin)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `key=N` from the `bulwark: device NAME: ...` line of `--stats` output.
pub fn device_counter(out: &str, device: &str, key: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("bulwark: device {device}:")))
        .unwrap_or_else(|| panic!("no stats for {device}:\n{out}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Value of `key=` in the `--stats` line.
pub fn stat(o: &Output, key: &str) -> Option<String> {
    let err = stderr(o);
    let line = err.lines().find(|l| l.contains("bulwark: stats:"))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Builds the default guest image once per test binary (packages are cached under the user's
/// cache directory).
#[allow(dead_code)]
pub fn image_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| build_image("test-image", &[])).clone()
}

/// The newest Debian 12 cloud kernel of another series than the default image's 6.1 (6.12,
/// from bookworm's security and point-release updates), for the checks that introspection
/// works with more than one kernel.
#[allow(dead_code)]
pub const OTHER_KERNEL_SERIES: &str = "6.12.";

/// An image of the newest `linux-image-6.12.*-cloud-amd64-unsigned` apt knows.
#[allow(dead_code)]
pub fn other_kernel_image() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let prefix = format!("linux-image-{OTHER_KERNEL_SERIES}");
        let o = std::process::Command::new("apt-cache")
            .args(["pkgnames", &prefix])
            .output()
            .expect("apt-cache (Debian's apt) lists the kernel packages");
        let mut pkgs: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|p| p.ends_with("-cloud-amd64-unsigned"))
            .map(str::to_string)
            .collect();
        // Version order: 6.12.9 before 6.12.117.
        pkgs.sort_by_key(|p| {
            p[prefix.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let pkg = pkgs.pop().unwrap_or_else(|| {
            panic!(
                "apt knows no {prefix}*-cloud-amd64-unsigned: run `apt-get update` on Debian 12 \
                 (the package is in bookworm-security and bookworm-updates)"
            )
        });
        build_image("test-image-6.12", &["--kernel-package", &pkg])
    })
    .clone()
}

/// Builds a guest image into `target/<name>` with extra `bulwark image build` arguments.
#[allow(dead_code)]
pub fn build_image(name: &str, extra: &[&str]) -> PathBuf {
    let dir = repo_root().join("target").join(name);
    let o = std::process::Command::new(bulwark())
        .args(["image", "build", "--out", dir.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "image build: {}", stderr(&o));
    dir
}

/// Compiles a C test program statically with the host's gcc.
#[allow(dead_code)]
pub fn build_static_c(dir: &TestDir, src: &str) -> PathBuf {
    let out = dir.path(
        std::path::Path::new(src)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap(),
    );
    let o = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(repo_root().join(src))
        .output()
        .expect("gcc is needed to build test programs (apt-get install gcc libc6-dev)");
    assert!(o.status.success(), "gcc {src}: {}", stderr(&o));
    out
}

/// bulwarkd comes from another package: build it (cargo builds only this package's binaries
/// for its tests).
#[allow(dead_code)]
pub fn bulwarkd() -> PathBuf {
    let dir = PathBuf::from(bulwark()).parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "bulwark-control", "--bins"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let o = cmd.current_dir(repo_root()).output().unwrap();
    assert!(
        o.status.success(),
        "cargo build -p bulwark-control: {}",
        stderr(&o)
    );
    dir.join("bulwarkd")
}

/// The number after `label=` on its line of a rig section's output.
#[allow(dead_code)]
pub fn num(out: &str, label: &str) -> i64 {
    out.lines()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{label}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}=` in:\n{out}"))
}

/// A rig for a test of bulwarkd with a Linux guest: the image as /images/NAME, bulwarkd and
/// bulwark-tools on L1's PATH, 2 GiB for L1, 20 minutes at most.
#[allow(dead_code)]
pub fn daemon_rig(image_name: &str, image: PathBuf) -> bulwark_testrig::RigSpec {
    use bulwark_testrig::{ExtraFile, GuestImage, RigSpec};
    let mut spec = RigSpec::new(bulwark());
    spec.images = vec![GuestImage::new(image_name, image)];
    spec.files = vec![
        ExtraFile::host("/bin/bulwarkd", bulwarkd(), 0o755),
        ExtraFile::host(
            "/bin/bulwark-tools",
            env!("CARGO_BIN_EXE_bulwark-tools"),
            0o755,
        ),
    ];
    spec.cmdline_extra = "loglevel=1".into();
    spec.memory_mib = 2048;
    spec.timeout = std::time::Duration::from_secs(1200);
    spec
}
