//! Managed monitors, pause/resume and encrypted snapshots of function micro-VMs, end to end on
//! the host's real /dev/kvm: `bulwark monitor --dir` processes, their control and console
//! sockets, sealed snapshot files, and restores into new monitor processes.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_channel::{Client, Request, Response, RunState};
use common::*;

const KEY: &str = "6b6579206f662074686520766d206f776e6572206f6e6c792121212121212121";
const OTHER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A monitor process, killed when dropped.
struct Monitor {
    child: Child,
    dir: PathBuf,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Monitor {
    /// Starts `bulwark monitor --dir DIR` on DIR/spec.json.
    fn start(dir: &Path) -> Self {
        let child = Command::new(bulwark())
            .args(["monitor", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = Self {
            child,
            dir: dir.to_path_buf(),
        };
        m.wait_ready();
        m
    }

    /// Starts a monitor that restores `snapshot` with `key`; does not wait for it.
    fn restore(dir: &Path, snapshot: &Path, key: &str) -> Self {
        Self::restore_with(dir, snapshot, key, &[])
    }

    fn restore_with(dir: &Path, snapshot: &Path, key: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(bulwark())
            .args(["monitor", "--dir"])
            .arg(dir)
            .arg("--restore")
            .arg(snapshot)
            .arg("--key-stdin")
            .args(extra)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{key}").unwrap();
        drop(stdin);
        Self {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn wait_ready(&mut self) {
        let exit = self.dir.join("exit.json");
        let child = &mut self.child;
        wait_for("the control socket", || {
            if let Ok(Some(_)) = child.try_wait() {
                panic!(
                    "the monitor ended: {}",
                    std::fs::read_to_string(&exit).unwrap_or_default()
                );
            }
            Client::connect(&self.dir.join("control.sock"), Duration::from_secs(5))
                .and_then(|mut c| c.call(&Request::Describe))
                .is_ok()
        });
    }

    fn call(&self, req: &Request) -> Response {
        let mut c = Client::connect(&self.dir.join("control.sock"), Duration::from_secs(30))
            .expect("control socket");
        c.call(req).expect("control call")
    }

    fn state(&self) -> RunState {
        match self.call(&Request::Describe) {
            Response::Info(i) => i.state,
            other => panic!("describe: {other:?}"),
        }
    }

    fn console(&self) -> Console {
        let s = UnixStream::connect(self.dir.join("console.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Console {
            s,
            seen: Vec::new(),
        }
    }

    /// Waits for the process to end; its status and exit.json.
    fn wait_exit(mut self) -> (i32, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "monitor did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let text = std::fs::read_to_string(self.dir.join("exit.json"))
            .unwrap_or_else(|e| panic!("exit.json: {e}; stderr: {err}"));
        (
            status.code().unwrap_or(-1),
            serde_json::from_str(&text).unwrap(),
        )
    }
}

/// A console.sock client that accumulates output.
struct Console {
    s: UnixStream,
    seen: Vec<u8>,
}

impl Console {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads until the output contains `want`.
    fn expect(&mut self, want: &str) -> String {
        self.expect_after(0, want)
    }

    /// Reads until the output after byte `from` contains `want`; that output.
    fn expect_after(&mut self, from: usize, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&self.seen[from..]).into_owned();
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "console never showed {want:?}: {text:?}"
            );
            match self.s.read(&mut buf) {
                Ok(0) => panic!("console closed before {want:?}: {text:?}"),
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }

    /// What arrives within `wait`.
    fn quiet_for(&mut self, wait: Duration) -> String {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        let before = self.seen.len();
        while Instant::now() < end {
            if let Ok(n) = self.s.read(&mut buf) {
                self.seen.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&self.seen[before..]).into_owned()
    }
}

/// A VM directory with a spec for `tally.c` (see tests/payloads/tally.c).
fn tally_vm(t: &TestDir, name: &str, memory: &str) -> PathBuf {
    let payload = build_payload(t, "tests/payloads/tally.c");
    let dir = t.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = serde_json::json!({ "payload": payload, "memory": memory });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
    dir
}

fn snapshot(m: &Monitor, path: &Path, key: &str, leave_paused: bool) -> Response {
    m.call(&Request::Snapshot {
        path: path.display().to_string(),
        key: key.to_string(),
        leave_paused,
    })
}

#[test]
fn managed_monitor_pauses_resumes_and_keeps_scrollback() {
    require_kvm();
    let t = TestDir::new("managed");
    let m = Monitor::start(&tally_vm(&t, "vm", "8M"));
    let mut con = m.console();
    con.send(b"one\n");
    con.expect("line 1: ONE\n");
    assert_eq!(m.state(), RunState::Running);
    assert_eq!(m.call(&Request::Pause), Response::Ok);
    assert_eq!(m.state(), RunState::Paused);
    con.send(b"two\n");
    let during = con.quiet_for(Duration::from_millis(300));
    assert!(!during.contains("TWO"), "a paused VM answered: {during:?}");
    assert!(
        matches!(m.call(&Request::Pause), Response::Error { code, .. } if code == "wrong_state")
    );
    assert_eq!(m.call(&Request::Resume), Response::Ok);
    con.expect("line 2: TWO\n");
    // A late client gets the scroll-back first.
    let mut late = m.console();
    late.expect("line 1: ONE\nline 2: TWO\n");
    // Function micro-VMs have no power button: the control plane must kill them.
    assert!(
        matches!(m.call(&Request::Shutdown), Response::Error { code, .. } if code == "unsupported")
    );
    let Response::Info(info) = m.call(&Request::Describe) else {
        panic!("describe")
    };
    assert_eq!(
        (info.kind.as_str(), info.vcpus, info.memory),
        ("function", 1, 8 << 20)
    );
    assert!(
        info.exits.hostcalls > 0 && info.console_bytes > 0,
        "{info:?}"
    );
    assert_eq!(m.call(&Request::Kill), Response::Ok);
    let (code, exit) = m.wait_exit();
    assert_eq!(code, 123);
    assert_eq!(exit["reason"], "killed through the control plane");
}

#[test]
fn snapshot_restores_into_a_new_monitor_that_continues_the_guest() {
    require_kvm();
    let t = TestDir::new("snap-restore");
    let m = Monitor::start(&tally_vm(&t, "vm", "8M"));
    let mut con = m.console();
    // The guest holds "partial" in its memory, unanswered, when the snapshot is taken.
    con.send(b"hello\nworld\npartial");
    con.expect("line 2: WORLD\n");
    let file = t.path("vm/one.bwsnap");
    let bytes = match snapshot(&m, &file, KEY, false) {
        Response::Snapshot { bytes, .. } => bytes,
        other => panic!("snapshot failed: {other:?}"),
    };
    assert_eq!(bytes, std::fs::metadata(&file).unwrap().len());
    // Memory the guest never touched is one bit per 64 KiB block; the payload, its page
    // tables and stacks are there in full.
    assert!(
        bytes > 64 << 10 && bytes < 2 << 20,
        "an 8 MiB guest that touched little memory gave a {bytes}-byte snapshot"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The file is ciphertext: the guest's console text is nowhere in it.
    let raw = std::fs::read(&file).unwrap();
    assert!(!raw.windows(7).any(|w| w == b"PARTIAL" || w == b"partial"));
    // The original keeps running after the snapshot.
    con.send(b"\n");
    con.expect("line 3: PARTIAL\n");
    drop(m);

    let mut r = Monitor::restore(&t.path("restored"), &file, KEY);
    r.wait_ready();
    let mut con = r.console();
    con.send(b" again\n");
    // The count went on from the snapshot (not from the original's later line 3), and the
    // bytes the guest had buffered are still there.
    con.expect("line 3: PARTIAL AGAIN\n");
    con.send(b"exit\n");
    let (code, exit) = r.wait_exit();
    assert_eq!(code, 3, "{exit}");
    assert_eq!(exit["clean"], true);
}

#[test]
fn restore_refuses_tampered_truncated_and_wrong_key_files_and_resumes_nothing() {
    require_kvm();
    let t = TestDir::new("snap-tamper");
    let m = Monitor::start(&tally_vm(&t, "vm", "4M"));
    let mut con = m.console();
    con.send(b"x\n");
    con.expect("line 1: X\n");
    let good = t.path("vm/good.bwsnap");
    assert!(matches!(
        snapshot(&m, &good, KEY, false),
        Response::Snapshot { .. }
    ));
    drop(m);
    let raw = std::fs::read(&good).unwrap();
    let len = raw.len();
    // Every header byte, then positions spread over the whole file, and the tail.
    let mut positions: Vec<usize> = (0..160).collect();
    positions.extend((1..40).map(|i| i * len / 40));
    positions.extend(len - 40..len);
    let mut cases: Vec<(String, Vec<u8>, &str, &str)> = Vec::new();
    for &p in &positions {
        let mut bad = raw.clone();
        bad[p] ^= 0x20;
        cases.push((format!("byte {p} flipped"), bad, KEY, ""));
    }
    cases.push(("cut in half".into(), raw[..len / 2].to_vec(), KEY, "cut"));
    cases.push(("last byte cut".into(), raw[..len - 1].to_vec(), KEY, ""));
    cases.push(("empty".into(), Vec::new(), KEY, ""));
    cases.push(("wrong key".into(), raw.clone(), OTHER_KEY, "key"));
    let mut version = raw.clone();
    version[8] = 2;
    cases.push(("format version 2".into(), version, KEY, "version"));
    for (i, (what, bytes, key, says)) in cases.iter().enumerate() {
        let file = t.path(&format!("bad{i}.bwsnap"));
        std::fs::write(&file, bytes).unwrap();
        let dir = t.path(&format!("bad{i}"));
        let (code, exit) = Monitor::restore(&dir, &file, key).wait_exit();
        assert_eq!(code, 125, "{what}: {exit}");
        assert_eq!(exit["setup_error"], true, "{what}");
        let reason = exit["reason"].as_str().unwrap().to_lowercase();
        assert!(reason.contains(says), "{what}: {reason}");
        assert!(
            !dir.join("console.sock").exists(),
            "{what}: a refused restore must not start a VM"
        );
    }
    // The untouched file still restores.
    let mut r = Monitor::restore(&t.path("ok"), &good, KEY);
    r.wait_ready();
    let mut con = r.console();
    con.send(b"exit\n");
    assert_eq!(r.wait_exit().0, 1);
}

/// The hash `tally` prints for `sum`, read from the console.
fn memory_sum(con: &mut Console) -> String {
    let before = con.seen.len();
    con.send(b"sum\n");
    let text = con.expect_after(before, "\n");
    text.trim()
        .strip_prefix("sum ")
        .unwrap_or_else(|| panic!("no sum in {text:?}"))
        .to_string()
}

#[test]
fn lazy_restore_resumes_first_and_puts_every_byte_back() {
    require_kvm();
    let t = TestDir::new("snap-lazy");
    let m = Monitor::start(&tally_vm(&t, "vm", "32M"));
    let mut con = m.console();
    con.send(b"fill\n");
    con.expect("filled\n");
    let sum = memory_sum(&mut con);
    con.send(b"before\n");
    con.expect("line 1: BEFORE\n");
    let file = t.path("vm/dense.bwsnap");
    assert!(matches!(
        snapshot(&m, &file, KEY, false),
        Response::Snapshot { .. }
    ));
    drop(m);
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len > 28 << 20, "a filled 32 MiB guest gave {len} bytes");

    // Resumed lazily, the guest reads all of its memory back: every block arrives whole,
    // whether a fault asked for it or the background pass placed it first.
    let mut r = Monitor::restore_with(&t.path("lazy"), &file, KEY, &["--lazy"]);
    r.wait_ready();
    let mut con = r.console();
    assert_eq!(memory_sum(&mut con), sum);
    // Describe reports the restore's progress; it completes with every stored block placed.
    let lazy_info = || match r.call(&Request::Describe) {
        Response::Info(i) => i.lazy_restore.expect("a lazy restore reports its progress"),
        other => panic!("describe: {other:?}"),
    };
    wait_for("the lazy restore to complete", || lazy_info().complete);
    let info = lazy_info();
    assert!(info.blocks >= 448, "a filled 32 MiB guest stored {info:?}");
    assert_eq!(info.placed, info.blocks, "{info:?}");
    con.send(b"after\n");
    con.expect("line 2: AFTER\n");
    // A lazily restored VM snapshots again (once its memory is all in place), and that file
    // restores the ordinary way to the same memory.
    let again = t.path("lazy/again.bwsnap");
    assert!(matches!(
        snapshot(&r, &again, KEY, false),
        Response::Snapshot { .. }
    ));
    con.send(b"exit\n");
    assert_eq!(r.wait_exit().0, 2);
    let mut e = Monitor::restore(&t.path("eager"), &again, KEY);
    e.wait_ready();
    let mut con = e.console();
    assert_eq!(memory_sum(&mut con), sum);
    assert!(matches!(e.call(&Request::Describe), Response::Info(i) if i.lazy_restore.is_none()));
    con.send(b"exit\n");
    assert_eq!(e.wait_exit().0, 2);

    // Before the guest runs, a lazy restore still checks the key, the state records and the
    // file's sealed end: these resume nothing.
    let raw = std::fs::read(&file).unwrap();
    let mut state = raw.clone();
    state[200] ^= 1;
    let mut extended = raw.clone();
    extended.extend_from_slice(&[0; 100]);
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("state byte flipped", state, KEY),
        (
            "cut by one chunk",
            raw[..raw.len() - (64 << 10)].to_vec(),
            KEY,
        ),
        ("extended", extended, KEY),
        ("wrong key", raw.clone(), OTHER_KEY),
    ];
    for (i, (what, bytes, key)) in cases.into_iter().enumerate() {
        let bad = t.path(&format!("bad{i}.bwsnap"));
        std::fs::write(&bad, bytes).unwrap();
        let dir = t.path(&format!("bad{i}"));
        let (code, exit) = Monitor::restore_with(&dir, &bad, key, &["--lazy"]).wait_exit();
        assert_eq!(
            (code, &exit["setup_error"]),
            (125, &true.into()),
            "{what}: {exit}"
        );
        assert!(!dir.join("console.sock").exists(), "{what}: a VM started");
    }

    // A tampered memory block is found when it is needed (or the background pass reaches
    // it): the VM ends with the reason, and the guest never computes a sum over the bad byte.
    let mut tampered = raw;
    let at = tampered.len() * 3 / 4;
    tampered[at] ^= 0x40;
    let bad = t.path("tampered.bwsnap");
    std::fs::write(&bad, tampered).unwrap();
    let dir = t.path("tampered");
    let r = Monitor::restore_with(&dir, &bad, KEY, &["--lazy"]);
    let mut seen = String::new();
    if let Ok(s) = UnixStream::connect(dir.join("console.sock")) {
        let mut con = Console {
            s,
            seen: Vec::new(),
        };
        let _ = con.s.write_all(b"sum\n");
        seen = con.quiet_for(Duration::from_millis(500));
    }
    let (code, exit) = r.wait_exit();
    assert_eq!(code, 125, "{exit}");
    let reason = exit["reason"].as_str().unwrap();
    assert!(
        reason.contains("lazy restore failed") && reason.contains("failed authentication"),
        "{reason}"
    );
    assert!(
        !seen.contains("sum "),
        "the guest read tampered memory: {seen:?}"
    );
}

#[test]
fn snapshot_onto_a_full_disk_fails_and_keeps_the_old_snapshot() {
    require_kvm();
    let t = TestDir::new("snap-full");
    let dir = tally_vm(&t, "vm", "4M");
    // A filesystem with room for one snapshot of this VM but not a second beside it, inside
    // the VM's directory (all a jailed monitor sees), mounted before the monitor starts (its
    // jail does not see later mounts). A first monitor measures the snapshot's size.
    let probe = t.path("vm/probe.bwsnap");
    let m = Monitor::start(&dir);
    let r = snapshot(&m, &probe, KEY, false);
    assert!(matches!(r, Response::Snapshot { .. }), "{r:?}");
    drop(m);
    let room = (std::fs::metadata(&probe).unwrap().len() * 3 / 2).div_ceil(4096) * 4096;
    let small = t.path("vm/small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={room}"), "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs and needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let m = Monitor::start(&dir);
    let file = small.join("vm.bwsnap");
    let mut con = m.console();
    con.send(b"first\n");
    con.expect("line 1: FIRST\n");
    let r = snapshot(&m, &file, KEY, false);
    assert!(matches!(r, Response::Snapshot { .. }), "{r:?}");
    let before = std::fs::read(&file).unwrap();
    con.send(b"second\n");
    con.expect("line 2: SECOND\n");
    match snapshot(&m, &file, KEY, false) {
        Response::Error { code, message } => {
            assert_eq!(code, "failed");
            assert!(message.contains("runs on"), "{message}");
        }
        other => panic!("a snapshot onto a full disk succeeded: {other:?}"),
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the old snapshot changed"
    );
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    assert_eq!(left.len(), 1, "the partial file was not removed");
    // The VM kept running, and the old snapshot restores to the first line.
    con.send(b"third\n");
    con.expect("line 3: THIRD\n");
    drop(m);
    let mut r = Monitor::restore(&t.path("restored"), &file, KEY);
    r.wait_ready();
    let mut con = r.console();
    con.send(b"exit\n");
    assert_eq!(r.wait_exit().0, 1);
}

#[test]
fn snapshot_requests_with_bad_arguments_are_refused_and_leave_paused_holds() {
    require_kvm();
    let t = TestDir::new("snap-bad");
    let m = Monitor::start(&tally_vm(&t, "vm", "4M"));
    let code = |r: Response| match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error: {other:?}"),
    };
    assert_eq!(
        code(snapshot(&m, &t.path("a.bwsnap"), "not hex", false)),
        "invalid_request"
    );
    assert_eq!(
        code(snapshot(&m, Path::new("relative.bwsnap"), KEY, false)),
        "invalid_request"
    );
    assert_eq!(
        code(snapshot(&m, &t.path("no/such/dir/a.bwsnap"), KEY, false)),
        "failed"
    );
    // The jail shows the monitor its own VM directory only: a path beside it (which exists
    // on the host) is refused, and the message says where snapshots go.
    match snapshot(&m, &t.path("beside-the-vm.bwsnap"), KEY, false) {
        Response::Error { code, message } => {
            assert_eq!(code, "failed");
            assert!(message.contains("VM directory"), "{message}");
        }
        other => panic!("a snapshot outside the jail was written: {other:?}"),
    }
    assert!(!t.path("beside-the-vm.bwsnap").exists());
    assert_eq!(
        m.state(),
        RunState::Running,
        "failed snapshots resume the VM"
    );
    assert!(matches!(
        snapshot(&m, &t.path("vm/p.bwsnap"), KEY, true),
        Response::Snapshot { .. }
    ));
    assert_eq!(m.state(), RunState::Paused);
    assert_eq!(m.call(&Request::Resume), Response::Ok);
    drop(m);

    // A payload with a virtio drive cannot be snapshotted yet, and says so.
    let dir = t.path("drive");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = t.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let payload = t.path("tally.elf");
    let spec =
        serde_json::json!({ "payload": payload, "memory": "4M", "drive": [{ "path": disk }] });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
    let m = Monitor::start(&dir);
    match snapshot(&m, &t.path("vm/d.bwsnap"), KEY, false) {
        Response::Error { code, message } => {
            assert_eq!(code, "unsupported");
            assert!(message.contains("virtio drives"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn snapshot_and_restore_report_progress_in_the_vm_directory() {
    require_kvm();
    let t = TestDir::new("snap-progress");
    let dir = tally_vm(&t, "vm", "64M");
    let m = Monitor::start(&dir);
    let mut con = m.console();
    // Dense memory, so the operations take long enough to be watched.
    con.send(b"fill\n");
    con.expect("filled");
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Watches the progress file until `over` is set.
    let watch = |dir: PathBuf, want: &'static str, over: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !over.load(Ordering::Acquire) {
                if let Some((op, done, total)) = std::fs::read_to_string(dir.join("progress"))
                    .ok()
                    .and_then(|s| bulwark_channel::parse_progress(&s))
                {
                    assert_eq!(op, want);
                    seen.push((done, total));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        })
    };
    let over = Arc::new(AtomicBool::new(false));
    let watcher = watch(dir.clone(), "snapshot", over.clone());
    let file = t.path("vm/p.bwsnap");
    let r = snapshot(&m, &file, KEY, false);
    over.store(true, Ordering::Release);
    assert!(matches!(r, Response::Snapshot { .. }), "{r:?}");
    let seen = watcher.join().unwrap();
    assert!(!seen.is_empty(), "no snapshot progress was reported");
    assert!(
        seen.iter().all(|&(d, t)| d <= t && t == 64 << 20),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went back: {seen:?}"
    );
    assert!(
        !dir.join("progress").exists(),
        "the progress file outlived the snapshot"
    );
    drop(m);

    let rdir = t.path("restored");
    std::fs::create_dir_all(&rdir).unwrap();
    let over = Arc::new(AtomicBool::new(false));
    let watcher = watch(rdir.clone(), "restore", over.clone());
    let mut r = Monitor::restore(&rdir, &file, KEY);
    r.wait_ready();
    over.store(true, Ordering::Release);
    let seen = watcher.join().unwrap();
    assert!(!seen.is_empty(), "no restore progress was reported");
    assert!(!rdir.join("progress").exists());
    let mut con = r.console();
    con.send(b"exit\n");
    assert_eq!(r.wait_exit().0, 0);
}
