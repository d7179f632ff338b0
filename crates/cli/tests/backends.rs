//! Device back-ends in processes of their own (`crates/backends`), on real processes and real
//! KVM: a function micro-VM (`tests/payloads/blk_io.c`) writes, flushes and reads back a
//! pattern on a virtio-blk drive while the tests kill its back-end, scan the back-end's memory
//! for a secret the guest holds, and force the back-end into calls its policy forbids.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The pattern blk_io.c writes: the u64 at disk byte offset `o` in round `r`.
fn pattern_word(o: u64, r: u64) -> u64 {
    let mut z = (o / 8 + (r << 40)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks that `image` holds round `round`'s pattern over `blocks` 64 KiB blocks.
fn assert_image_holds_round(image: &Path, round: u64, blocks: u64) {
    let data = std::fs::read(image).unwrap();
    let len = (blocks * 65536) as usize;
    assert!(data.len() >= len, "image too short");
    let bad = data[..len]
        .chunks_exact(8)
        .enumerate()
        .filter(|(i, w)| {
            u64::from_le_bytes((*w).try_into().unwrap()) != pattern_word(*i as u64 * 8, round)
        })
        .count();
    assert_eq!(bad, 0, "{bad} words of the image differ from round {round}");
}

fn random_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut s)
        .unwrap();
    s
}

fn ppid_and_comm(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let ppid = stat[close + 2..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// Processes named `comm` that descend from `root` (tests run in parallel: other tests'
/// back-ends have the same name).
fn descendants_named(root: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((_, c)) = ppid_and_comm(pid) else {
            continue;
        };
        if c != comm {
            continue;
        }
        let mut p = pid;
        for _ in 0..16 {
            match ppid_and_comm(p) {
                Some((pp, _)) if pp == root => {
                    out.push(pid);
                    break;
                }
                Some((pp, _)) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// Whether `pid`'s whole readable address space contains `needle`.
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (mut at, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        while at < end {
            // Overlap reads by the needle's length so a match across two reads is seen.
            let n = buf.len().min((end - at) as usize);
            let Ok(got) = mem.read_at(&mut buf[..n], at) else {
                break;
            };
            if got == 0 {
                break;
            }
            if buf[..got].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            if got < needle.len() || at + got as u64 >= end {
                break;
            }
            at += (got - needle.len() + 1) as u64;
        }
    }
    false
}

/// A running `bulwark run` of blk_io, its stdout read line by line.
struct Run {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: Vec<String>,
}

impl Run {
    fn start(payload: &Path, drive: &str, env: &[(&str, &str)], stdin: &[u8]) -> Self {
        let mut cmd = Command::new(bulwark());
        cmd.args(["run", "--stats", "--payload"])
            .arg(payload)
            .args(["--drive", drive])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.as_mut().unwrap().write_all(stdin).unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            stdout: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 120 s) for a stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.stdout.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no line {prefix:?}; stdout so far: {:?}", self.stdout),
            }
        }
    }

    /// Lets the payload end (one more input byte) and returns (exit code, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let _ = self.child.stdin.as_mut().unwrap().write_all(b"x");
        drop(self.child.stdin.take());
        let o = self.child.wait_with_output().unwrap();
        self.stdout.extend(self.lines.try_iter());
        (
            o.status.code(),
            self.stdout.join("\n"),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

fn image(dir: &TestDir, mib: u64) -> std::path::PathBuf {
    let p = dir.path("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

/// The guest holds a random secret in the page of its request headers but never in a buffer
/// it gives the device. While the guest writes and reads 64 MiB, the block back-end's whole
/// address space never holds the secret, nor the launcher's; the monitor's does (the scan
/// works); no back-end maps guest memory.
#[test]
fn a_block_backend_never_sees_guest_memory() {
    require_kvm();
    let dir = TestDir::new("backend-secrecy");
    let payload = build_payload(&dir, "tests/payloads/blk_io.c");
    let img = image(&dir, 8);
    let secret = random_secret();
    let mut run = Run::start(
        &payload,
        img.to_str().unwrap(),
        &[],
        &blk_io_input(&secret, 8, 128),
    );
    run.wait_line("blk_io: running");
    let backend = descendants_named(run.pid(), "bw-blk0");
    assert_eq!(backend.len(), 1, "one block back-end: {backend:?}");
    let launcher = descendants_named(run.pid(), "bw-launcher");
    assert_eq!(launcher.len(), 1, "one launcher: {launcher:?}");
    // Both are filtered, hold no capability and cannot gain one; the back-end adds its own
    // filters (no-open and its policy) under the launcher's.
    let status = |pid: u32, key: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    for pid in [backend[0], launcher[0]] {
        assert_eq!(status(pid, "Seccomp:"), "2", "pid {pid} filtered");
        assert_eq!(status(pid, "NoNewPrivs:"), "1");
        assert_eq!(status(pid, "CapEff:"), "0000000000000000");
    }
    let filters = |pid| status(pid, "Seccomp_filters:").parse::<u32>().unwrap();
    assert_eq!(filters(backend[0]), filters(launcher[0]) + 2);
    for _ in 0..5 {
        assert!(
            !memory_contains(backend[0], &secret),
            "the guest's secret is in the block back-end's memory"
        );
    }
    run.wait_line("blk_io: ok");
    run.wait_line("blk_io: waiting");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", backend[0])).unwrap();
    assert!(
        !maps.contains("bulwark-guest-ram"),
        "the back-end maps guest memory:\n{maps}"
    );
    assert!(
        maps.contains("bulwark-window-blk0"),
        "the back-end maps its window:\n{maps}"
    );
    for pid in [backend[0], launcher[0]] {
        assert!(
            !memory_contains(pid, &secret),
            "the guest's secret is in the memory of {pid}"
        );
    }
    // The control: the monitor's memory (guest RAM is mapped there) holds it.
    let monitors = descendants_named(run.pid(), "bulwark");
    assert!(
        monitors.iter().any(|&m| memory_contains(m, &secret)),
        "the scan does not find the secret in the monitor {monitors:?} either: it is broken"
    );
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
}

/// kill -9 of the block back-end every 150 ms while the guest writes, flushes and reads back
/// 160 MiB: every request completes, the guest's read-back checks hold, the image holds the
/// last round, the back-end was restarted each time it was killed.
#[test]
fn a_killed_block_backend_is_restarted_and_no_acknowledged_write_is_lost() {
    require_kvm();
    let dir = TestDir::new("backend-restart");
    let payload = build_payload(&dir, "tests/payloads/blk_io.c");
    let img = image(&dir, 8);
    let (rounds, blocks) = (20u32, 128u32);
    let mut run = Run::start(
        &payload,
        img.to_str().unwrap(),
        &[],
        &blk_io_input(&random_secret(), rounds, blocks),
    );
    run.wait_line("blk_io: running");
    let mut kills = 0u64;
    let mut killed = std::collections::BTreeSet::new();
    let stop = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(150));
        if let Ok(l) = run.lines.try_recv() {
            run.stdout.push(l.clone());
            if l.starts_with("blk_io: ok") || l.starts_with("blk_io: FAILED") {
                break;
            }
        }
        assert!(
            Instant::now() < stop,
            "the guest did not finish: {:?}",
            run.stdout
        );
        for pid in descendants_named(run.pid(), "bw-blk0") {
            if killed.insert(pid) {
                // SAFETY-free: kill(1) rather than libc in a test.
                let ok = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap()
                    .success();
                kills += u64::from(ok);
            }
        }
    }
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("blk_io: ok"), "{out}");
    assert!(
        kills >= 3,
        "only {kills} kills landed: the guest finished too fast"
    );
    let restarts = device_counter(&err, "blk0", "restarts");
    assert!(
        restarts >= kills.saturating_sub(1) && restarts <= kills,
        "{restarts} restarts for {kills} kills\n{err}"
    );
    assert_eq!(device_counter(&err, "blk0", "io_errors"), 0, "{err}");
    assert_eq!(device_counter(&err, "blk0", "violations"), 0, "{err}");
    assert_image_holds_round(&img, u64::from(rounds) - 1, u64::from(blocks));
}

/// From inside a block back-end (the debug-build hook `BULWARK_BACKEND_PROBE=blk0:NR` makes
/// its first incarnation call NR after 20 requests): calls outside its policy stop it with a
/// report that names the call, the monitor starts another, and the guest never notices;
/// opening a file is refused without a kill.
#[test]
fn a_backend_that_breaks_its_seccomp_policy_is_reported_and_restarted() {
    require_kvm();
    let dir = TestDir::new("backend-seccomp");
    let payload = build_payload(&dir, "tests/payloads/blk_io.c");
    let img = image(&dir, 8);
    for (nr, name) in [
        (101, "ptrace"),
        (41, "socket"),
        (165, "mount"),
        (62, "kill"),
        (59, "execve"),
        (110, "getppid"),
    ] {
        let run = Run::start(
            &payload,
            img.to_str().unwrap(),
            &[("BULWARK_BACKEND_PROBE", &format!("blk0:{nr}"))],
            &blk_io_input(&random_secret(), 2, 16),
        );
        let (code, out, err) = run.finish();
        assert_eq!(code, Some(0), "{name}: {out}\n{err}");
        assert!(out.contains("blk_io: ok"), "{name}: {out}");
        assert!(
            err.contains(&format!(
                "seccomp: the blk0 back-end thread made the forbidden system call {nr} ({name}"
            )),
            "{name}: no report\n{err}"
        );
        assert!(
            err.contains("stopped by its seccomp policy"),
            "{name}: the monitor did not hear of it\n{err}"
        );
        assert_eq!(device_counter(&err, "blk0", "restarts"), 1, "{name}: {err}");
        assert_eq!(
            device_counter(&err, "blk0", "violations"),
            1,
            "{name}: {err}"
        );
        assert_eq!(
            device_counter(&err, "blk0", "io_errors"),
            0,
            "{name}: {err}"
        );
    }
    // openat: refused (EACCES) by the no-open filter and Landlock; the back-end goes on.
    let run = Run::start(
        &payload,
        img.to_str().unwrap(),
        &[("BULWARK_BACKEND_PROBE", "blk0:257")],
        &blk_io_input(&random_secret(), 2, 16),
    );
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("blk0 probe: system call 257 failed (13)"),
        "{err}"
    );
    assert_eq!(device_counter(&err, "blk0", "restarts"), 0, "{err}");
}

/// `backend=inline` keeps the I/O in the monitor: no back-end process, same results.
#[test]
fn an_inline_drive_has_no_backend_process() {
    require_kvm();
    let dir = TestDir::new("backend-inline");
    let payload = build_payload(&dir, "tests/payloads/blk_io.c");
    let img = image(&dir, 8);
    let drive = format!("path={},backend=inline", img.display());
    let mut run = Run::start(
        &payload,
        &drive,
        &[],
        &blk_io_input(&random_secret(), 2, 16),
    );
    run.wait_line("blk_io: waiting");
    assert!(descendants_named(run.pid(), "bw-blk0").is_empty());
    assert!(descendants_named(run.pid(), "bw-launcher").is_empty());
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_image_holds_round(&img, 1, 16);
}
