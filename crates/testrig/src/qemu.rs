//! Running QEMU (TCG with emulated SVM) on the L1 kernel and archive, with the serial console
//! captured (or attached to the caller's terminal), bounded in time.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::l1::MARK;

/// The Debian package that provides `qemu-system-x86_64`.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The default QEMU binary, looked up on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(
        "{qemu} not found: install the Debian package {QEMU_PACKAGE} (`apt-get install {QEMU_PACKAGE}`)"
    )]
    Missing {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {qemu}")]
    Spawn {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the rig ran longer than {after:?}: QEMU was killed. Raise the timeout if the script needs longer; last console lines:\n{tail}"
    )]
    Timeout { after: Duration, tail: String },
    #[error(
        "the rig's L1 froze: QEMU used no CPU time for {idle:?} (a hang of QEMU's emulated SVM seen now and then; nothing in L1 can end it), so it was killed; last console lines:\n{tail}"
    )]
    Frozen { idle: Duration, tail: String },
    #[error(
        "the rig's L1 stopped running its own processes: no heartbeat on its second serial port for {quiet:?} ({nudges} nudges on that port did not wake it; QEMU's emulated SVM now and then loses L1's interrupts), so it was sent an NMI for a backtrace and killed; last console lines:\n{tail}"
    )]
    Wedged {
        quiet: Duration,
        nudges: u32,
        tail: String,
    },
    #[error("QEMU failed ({status}):\n{stderr}")]
    Failed { status: ExitStatus, stderr: String },
    #[error("cannot wait for QEMU")]
    Wait(#[source] std::io::Error),
}

/// How QEMU is started.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Appended to the command line as is.
    pub extra_args: Vec<String>,
    /// QEMU is taken for frozen once its CPU time has not moved for this long (an L1 that
    /// waits for a timer still uses some; a frozen one uses none).
    pub freeze_after: Duration,
    /// L1's second serial port (`/dev/ttyS1`, where its `/init` writes a heartbeat) as a unix
    /// socket QEMU listens on at this path; none when `None`.
    pub heartbeat: Option<PathBuf>,
    /// L1 is taken for wedged once no heartbeat has come for this long (after the first one).
    /// Before that, at a third and at two thirds of it, a byte is sent to the port: its
    /// interrupt wakes an L1 whose timer interrupt QEMU lost.
    pub wedged_after: Duration,
    /// A QMP socket, through which a wedged L1 is sent an NMI (L1 runs with
    /// `unknown_nmi_panic`, so it prints a backtrace of where it is stuck).
    pub qmp: Option<PathBuf>,
}

/// The oldest QEMU seen to deliver L2 debug exceptions to L1's KVM (so that KVM guest debug,
/// introspection's breakpoints, works in the rig): 10.0 (Debian 12's bookworm-backports). 7.2
/// (Debian 12 itself) does not: a hardware breakpoint never fires, and an int3 goes straight
/// to L2.
pub const GUEST_DEBUG_SINCE: (u32, u32) = (10, 0);

/// Where `.ci/run` unpacks a QEMU from bookworm-backports beside the distribution's, for the
/// tests that need guest debug (the other rig tests keep Debian 12's QEMU 7.2, on which they
/// have run longest): a wrapper script that passes the unpacked firmware directories.
pub const GUEST_DEBUG_QEMU: &str = "/opt/bulwark/qemu-backports/bin/qemu-system-x86_64";

/// A QEMU that passes L2 debug exceptions to L1: the default one when it is new enough, else
/// the one `.ci/run` unpacks at [`GUEST_DEBUG_QEMU`]; None when neither is there.
pub fn guest_debug_qemu() -> Option<PathBuf> {
    [PathBuf::from(QEMU_BINARY), PathBuf::from(GUEST_DEBUG_QEMU)]
        .into_iter()
        .find(|q| version(q).is_some_and(|v| v >= GUEST_DEBUG_SINCE))
}

/// The version `qemu --version` prints, as (major, minor); None when it cannot be run or read.
pub fn version(qemu: &std::path::Path) -> Option<(u32, u32)> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// (major, minor) from `QEMU emulator version 10.0.2 (Debian ...)`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// The default [`QemuConfig::freeze_after`]: far longer than any idle wait in a rig script.
pub const FREEZE_AFTER: Duration = Duration::from_secs(90);

/// The default [`QemuConfig::wedged_after`]: L1's heartbeat comes every 2 s of its time; 60 s
/// without one is far beyond any scheduling delay of a loaded host.
pub const WEDGED_AFTER: Duration = Duration::from_secs(60);

/// Watches a counter (a process's CPU time, a heartbeat file's length) for a stretch in which
/// it does not move.
#[derive(Debug)]
struct FreezeWatch {
    last: Option<u64>,
    since: Instant,
}

impl FreezeWatch {
    fn new(now: Instant) -> Self {
        Self {
            last: None,
            since: now,
        }
    }

    /// Takes a sample of a counter that should keep moving (CPU time, heartbeat bytes; `None`:
    /// unreadable, which resets the watch) and returns how long it has been flat.
    fn sample(&mut self, cpu: Option<u64>, now: Instant) -> Duration {
        if cpu.is_none() || cpu != self.last {
            self.last = cpu;
            self.since = now;
        }
        now - self.since
    }
}

/// User plus system CPU time of process `pid`, all threads, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ... utime(14) stime(15): fields after the comm's closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ').skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

impl QemuConfig {
    /// The QEMU arguments: TCG with an EPYC CPU that has SVM and nested paging, so that L1's
    /// kvm_amd works; no default devices (no NIC or VGA to probe); the serial port on stdio
    /// (multiplexed with the QEMU monitor: Ctrl-A X quits); no reboot, so that a panic or
    /// `reboot` in L1 ends QEMU.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-cpu",
            "EPYC,+svm,+npt",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "mon:stdio",
            "-no-reboot",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.append.clone(),
        ]);
        if let Some(hb) = &self.heartbeat {
            a.extend([
                "-chardev".into(),
                format!(
                    "socket,id=heartbeat,path={},server=on,wait=off",
                    hb.display()
                ),
                "-serial".into(),
                "chardev:heartbeat".into(),
            ]);
        }
        if let Some(qmp) = &self.qmp {
            a.extend([
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", qmp.display()),
            ]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Where the console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Captured; also copied to stderr as it arrives when `echo` is set. QEMU's stdin is empty.
    Capture { echo: bool },
    /// The caller's terminal: stdin goes to L1's console, the console goes to stdout with the
    /// rig's marker lines left out.
    Attached,
}

/// What a QEMU run gave.
#[derive(Clone, Debug)]
pub struct QemuRun {
    /// Everything L1 printed on its console, `\r` removed.
    pub console: String,
    pub status: ExitStatus,
    /// From spawning QEMU to its exit.
    pub wall: Duration,
    /// From spawning QEMU to the `kvm ready` marker.
    pub kvm_ready_wall: Option<Duration>,
    /// Times L1 went quiet and a nudge on its heartbeat port woke it.
    pub woken: u32,
}

/// Runs QEMU until it exits or `timeout` passes (then it is killed).
pub fn run(cfg: &QemuConfig, mode: ConsoleMode, timeout: Duration) -> Result<QemuRun, QemuError> {
    let qemu = cfg.qemu.display().to_string();
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(cfg.args())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(match mode {
            ConsoleMode::Capture { .. } => Stdio::null(),
            ConsoleMode::Attached => Stdio::inherit(),
        });
    tracing::debug!(?cmd, "starting QEMU");
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            QemuError::Missing {
                qemu: qemu.clone(),
                source,
            }
        } else {
            QemuError::Spawn {
                qemu: qemu.clone(),
                source,
            }
        }
    })?;
    let console = Arc::new(Mutex::new(Console::default()));
    let stdout = child.stdout.take();
    let reader = {
        let console = Arc::clone(&console);
        std::thread::spawn(move || {
            let Some(mut stdout) = stdout else { return };
            let mut filter = MarkerFilter::default();
            let mut buf = [0u8; 8192];
            let mut forwarded = Vec::new();
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                match mode {
                    ConsoleMode::Capture { echo: true } => {
                        let _ = std::io::stderr().write_all(chunk);
                    }
                    ConsoleMode::Capture { echo: false } => {}
                    ConsoleMode::Attached => {
                        forwarded.clear();
                        filter.feed(chunk, &mut forwarded);
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&forwarded);
                        let _ = out.flush();
                    }
                }
                if let Ok(mut c) = console.lock() {
                    c.push(chunk, start);
                }
            }
        })
    };
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });

    let deadline = start + timeout;
    let mut watch = FreezeWatch::new(start);
    let mut heart = FreezeWatch::new(start);
    let pulse = cfg.heartbeat.clone().map(Pulse::start);
    let mut nudges = 0u32;
    let mut next_sample = start;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(QemuError::Wait)? {
            break status;
        }
        let now = Instant::now();
        let (mut idle, mut quiet) = (Duration::ZERO, Duration::ZERO);
        if now >= next_sample {
            idle = watch.sample(cpu_ticks(child.id()), now);
            // Not watched until the first beat: L1 boots first.
            let beats = pulse.as_ref().map(Pulse::beats).filter(|&n| n > 0);
            quiet = heart.sample(beats, now);
            if quiet.is_zero() {
                nudges = 0;
            } else if let Some(p) = &pulse
                && quiet >= cfg.wedged_after / 3 * (nudges + 1)
                && nudges < 2
            {
                nudges += 1;
                tracing::warn!(?quiet, "no heartbeat from L1: nudging it");
                p.nudge();
            }
            next_sample = now + Duration::from_secs(1);
        }
        if now >= deadline || idle >= cfg.freeze_after || quiet >= cfg.wedged_after {
            let wedged = now < deadline && idle < cfg.freeze_after;
            if wedged {
                nmi_for_backtrace(cfg, &mut child);
            }
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            let tail = console
                .lock()
                .map(|c| c.tail(TIMEOUT_TAIL_LINES))
                .unwrap_or_default();
            return Err(if now >= deadline {
                QemuError::Timeout {
                    after: timeout,
                    tail,
                }
            } else if wedged {
                QemuError::Wedged {
                    quiet,
                    nudges,
                    tail,
                }
            } else {
                QemuError::Frozen { idle, tail }
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let wall = start.elapsed();
    let woken = pulse.map_or(0, |p| p.woken());
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let console = std::mem::take(
        &mut *console
            .lock()
            .map_err(|_| QemuError::Wait(std::io::Error::other("console reader panicked")))?,
    );
    if !status.success() {
        return Err(QemuError::Failed { status, stderr });
    }
    Ok(QemuRun {
        console: console.text(),
        status,
        wall,
        kvm_ready_wall: console.kvm_ready,
        woken,
    })
}

/// The host's end of L1's heartbeat port: counts beats (lines holding L1's uptime), and
/// sends a byte when asked, whose receive interrupt wakes an L1 that lost its timer interrupt.
#[derive(Clone, Default)]
struct Pulse(Arc<PulseState>);

#[derive(Default)]
struct PulseState {
    beats: AtomicU64,
    /// Nudges after which a beat came again.
    woken: AtomicU32,
    nudged: AtomicBool,
    port: Mutex<Option<std::os::unix::net::UnixStream>>,
}

impl Pulse {
    /// Connects to QEMU's socket (retrying while QEMU starts) and reads beats on a thread,
    /// which ends when QEMU closes the socket.
    fn start(path: PathBuf) -> Self {
        let pulse = Self::default();
        let st = pulse.0.clone();
        std::thread::spawn(move || {
            let give_up = Instant::now() + Duration::from_secs(30);
            let stream = loop {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < give_up => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot connect to L1's heartbeat port");
                        return;
                    }
                }
            };
            if let Ok(mut port) = st.port.lock() {
                *port = stream.try_clone().ok();
            }
            for line in std::io::BufRead::lines(std::io::BufReader::new(stream)) {
                let Ok(line) = line else { break };
                if line.trim().parse::<f64>().is_ok() {
                    st.beats.fetch_add(1, Relaxed);
                    if st.nudged.swap(false, Relaxed) {
                        st.woken.fetch_add(1, Relaxed);
                    }
                }
            }
        });
        pulse
    }

    fn beats(&self) -> u64 {
        self.0.beats.load(Relaxed)
    }

    fn woken(&self) -> u32 {
        self.0.woken.load(Relaxed)
    }

    fn nudge(&self) {
        self.0.nudged.store(true, Relaxed);
        if let Ok(mut port) = self.0.port.lock()
            && let Some(s) = port.as_mut()
        {
            let _ = s.write_all(b"\n");
        }
    }
}

/// Sends a wedged L1 an NMI through QMP and gives it a few seconds to print the backtrace of
/// its `unknown_nmi_panic` (it then powers off, ending QEMU). Best effort: the caller kills
/// QEMU afterwards in any case.
fn nmi_for_backtrace(cfg: &QemuConfig, child: &mut std::process::Child) {
    let Some(path) = &cfg.qmp else { return };
    let sent = (|| -> std::io::Result<()> {
        let mut s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = std::io::BufReader::new(s.try_clone()?);
        let mut line = String::new();
        // The greeting, then one reply per command.
        std::io::BufRead::read_line(&mut reply, &mut line)?;
        for cmd in ["qmp_capabilities", "inject-nmi"] {
            writeln!(s, "{{\"execute\":\"{cmd}\"}}")?;
            line.clear();
            std::io::BufRead::read_line(&mut reply, &mut line)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot send the wedged L1 an NMI");
        return;
    }
    let until = Instant::now() + NMI_GRACE;
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long a wedged L1 gets to print its NMI backtrace.
const NMI_GRACE: Duration = Duration::from_secs(10);

/// Console lines a timeout error quotes.
const TIMEOUT_TAIL_LINES: usize = 60;

/// The console as it arrives: bytes, and when the `kvm ready` marker line was complete.
#[derive(Default)]
struct Console {
    bytes: Vec<u8>,
    /// Start of the line being received.
    line_start: usize,
    kvm_ready: Option<Duration>,
}

impl Console {
    fn push(&mut self, chunk: &[u8], start: Instant) {
        self.bytes.extend_from_slice(chunk);
        while let Some(i) = self.bytes[self.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let line = &self.bytes[self.line_start..self.line_start + i];
            if self.kvm_ready.is_none() && line.starts_with(format!("{MARK}kvm ready").as_bytes()) {
                self.kvm_ready = Some(start.elapsed());
            }
            self.line_start += i + 1;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).replace('\r', "")
    }

    fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Passes console bytes through except lines that start with the rig's marker prefix, and
/// everything after the `end` marker (L1's shutdown messages).
#[derive(Default)]
pub(crate) struct MarkerFilter {
    /// Bytes of the current line held back while they could still be a marker.
    pending: Vec<u8>,
    /// Inside a marker line: drop up to the newline; holds the marker's text.
    swallow: Option<Vec<u8>>,
    /// Not at the start of a line.
    mid_line: bool,
    /// The `end` marker has passed.
    closed: bool,
}

impl MarkerFilter {
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mark = MARK.as_bytes();
        for &b in data {
            if self.closed {
                return;
            }
            if let Some(text) = &mut self.swallow {
                if b == b'\n' {
                    self.closed = text.starts_with(b"end ");
                    self.swallow = None;
                    self.mid_line = false;
                } else {
                    text.push(b);
                }
                continue;
            }
            if !self.mid_line || !self.pending.is_empty() {
                self.pending.push(b);
                if mark.starts_with(&self.pending) {
                    self.mid_line = true;
                    if self.pending.len() == mark.len() {
                        self.pending.clear();
                        self.swallow = Some(Vec::new());
                    }
                    continue;
                }
                out.append(&mut self.pending);
                self.mid_line = b != b'\n';
                continue;
            }
            out.push(b);
            self.mid_line = b != b'\n';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_in_pieces(input: &str, piece: usize) -> String {
        let mut f = MarkerFilter::default();
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(piece) {
            f.feed(chunk, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn qemu_marker_lines_are_hidden_from_attached_console() {
        let input = "bulwark-rig: kvm ready uptime=1.2\r\nbulwark-rig: begin x\r\nhello\r\nbulwark is here\r\n  bulwark-rig: not at start\r\nbulwark-rig: end x status=0\r\n[    2.8] reboot: Power down\r\n";
        for piece in [1, 2, 3, 7, 1000] {
            assert_eq!(
                filter_in_pieces(input, piece),
                "hello\r\nbulwark is here\r\n  bulwark-rig: not at start\r\n",
                "piece {piece}"
            );
        }
    }

    #[test]
    fn qemu_console_records_kvm_ready_once_lines_complete() {
        let mut c = Console::default();
        let t = Instant::now();
        c.push(b"noise\r\nbulwark-rig: kvm rea", t);
        assert!(c.kvm_ready.is_none());
        c.push(b"dy uptime=2.01\r\nmore", t);
        assert!(c.kvm_ready.is_some());
        assert_eq!(c.text(), "noise\nbulwark-rig: kvm ready uptime=2.01\nmore");
        assert_eq!(c.tail(1), "more");
    }

    #[test]
    fn qemu_args_have_svm_cpu_no_reboot_and_serial_on_stdio() {
        let cfg = QemuConfig {
            qemu: QEMU_BINARY.into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            memory_mib: 2048,
            cpus: 1,
            extra_args: vec!["-s".into()],
            freeze_after: FREEZE_AFTER,
            heartbeat: None,
            wedged_after: WEDGED_AFTER,
            qmp: None,
        };
        let a = cfg.args().join(" ");
        for want in [
            "-accel tcg",
            "-cpu EPYC,+svm,+npt",
            "-no-reboot",
            "-serial mon:stdio",
            "-m 2048",
            "-smp 1",
            "-kernel /k",
            "-initrd /i",
            "-append console=ttyS0",
        ] {
            assert!(a.contains(want), "{want} missing from {a}");
        }
        assert!(a.ends_with(" -s"));
    }

    #[test]
    fn freeze_watch_counts_only_time_without_cpu() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut w = FreezeWatch::new(t0);
        assert_eq!(w.sample(Some(100), s(0)), Duration::ZERO);
        assert_eq!(w.sample(Some(100), s(30)), Duration::from_secs(30));
        // Any CPU used starts the count again.
        assert_eq!(w.sample(Some(101), s(31)), Duration::ZERO);
        assert_eq!(w.sample(Some(101), s(120)), Duration::from_secs(89));
        // An unreadable sample is not taken for a frozen one.
        assert_eq!(w.sample(None, s(200)), Duration::ZERO);
        assert_eq!(w.sample(Some(101), s(201)), Duration::ZERO);
    }

    #[test]
    fn cpu_time_of_this_process_is_readable_and_grows() {
        let me = std::process::id();
        let a = cpu_ticks(me).expect("this process's /proc stat");
        let until = Instant::now() + Duration::from_millis(200);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(
            cpu_ticks(me).unwrap() > a,
            "200 ms of spinning shows in utime"
        );
    }

    #[test]
    fn qemu_version_is_read_from_its_banner() {
        let v = |t| parse_version(t);
        assert_eq!(
            v("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some((10, 0))
        );
        assert_eq!(
            v("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2))
        );
        assert_eq!(v("qemu: unknown option"), None);
        assert_eq!(v("QEMU emulator version x.y"), None);
        assert!((7, 2) < GUEST_DEBUG_SINCE && (10, 0) >= GUEST_DEBUG_SINCE);
    }

    #[test]
    fn qemu_missing_binary_names_the_debian_package() {
        let cfg = QemuConfig {
            qemu: "/nonexistent/qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: String::new(),
            memory_mib: 64,
            cpus: 1,
            extra_args: vec![],
            freeze_after: FREEZE_AFTER,
            heartbeat: None,
            wedged_after: WEDGED_AFTER,
            qmp: None,
        };
        let e = run(
            &cfg,
            ConsoleMode::Capture { echo: false },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(e, QemuError::Missing { .. }));
        assert!(e.to_string().contains("qemu-system-x86"), "{e}");
    }
}
