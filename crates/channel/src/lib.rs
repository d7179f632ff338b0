//! The control channel between bulwarkd and one VM monitor.
//!
//! The monitor listens on `control.sock` in its VM directory; bulwarkd connects, sends one
//! [`Request`] at a time and reads one [`Response`] for each. The message set is closed: what
//! the control plane can ask a monitor is exactly this enum, and none of it reads or writes
//! guest memory (a snapshot request names a file and carries the owner's key; the monitor
//! writes ciphertext there itself).
//!
//! # Wire format (version 1)
//!
//! ```text
//! frame = len:u32-le  version:u8  body        len = 1 + body length, at most MAX_FRAME_LEN
//! body  = one JSON object (UTF-8), a Request or a Response; unknown fields are refused
//! ```
//!
//! A frame with another version byte is refused with [`ChannelError::Version`] before its body
//! is looked at. Decoding never panics and never allocates more than the bytes that arrived.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The version byte of every frame this build writes and the only one it reads.
pub const CHANNEL_VERSION: u8 = 1;
/// Largest accepted frame (version byte + body).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The monitor's control socket, in its VM directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The monitor's console socket, in its VM directory: output (scroll-back first) to every
/// client, input from every client.
pub const CONSOLE_SOCKET: &str = "console.sock";
/// Where the monitor reports a long operation's progress, in its VM directory: one line,
/// `OPERATION DONE TOTAL` (`snapshot` or `restore`, bytes of guest memory), rewritten in place.
pub const PROGRESS_FILE: &str = "progress";

/// Parses the progress file's line.
pub fn parse_progress(text: &str) -> Option<(String, u64, u64)> {
    let mut it = text.split_whitespace();
    let (op, done, total) = (
        it.next()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    (op == "snapshot" || op == "restore").then(|| (op.to_string(), done, total))
}

/// Where the monitor writes how its VM ended, in its VM directory.
pub const EXIT_FILE: &str = "exit.json";
/// The VM spec the monitor runs, in its VM directory.
pub const SPEC_FILE: &str = "spec.json";

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("control channel I/O failed")]
    Io(#[from] io::Error),
    #[error("the peer closed the control channel")]
    Closed,
    #[error(
        "control channel version {found} is not the version {CHANNEL_VERSION} this bulwark speaks; run bulwarkd and the monitors from the same release"
    )]
    Version { found: u8 },
    #[error("control channel frame of {0} bytes is empty or larger than {MAX_FRAME_LEN}")]
    FrameSize(usize),
    #[error("malformed control channel message: {0}")]
    Malformed(String),
}

/// What bulwarkd may ask a monitor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "op",
    content = "args",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Request {
    /// State, sizes, uptime and counters.
    Describe,
    /// Stop the vCPUs where they are; devices keep their state.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Ask the guest to power off (ACPI power button); the monitor exits when it does.
    Shutdown,
    /// End the VM now.
    Kill,
    /// Write the whole VM state to `path`, encrypted with a fresh data key wrapped by `key`
    /// (64 hex digits, the owner's). The VM is paused while it is written and then resumed
    /// unless `leave_paused`.
    Snapshot {
        path: String,
        key: String,
        #[serde(default)]
        leave_paused: bool,
    },
    /// Read the guest kernel from outside (introspection): only where the VM's spec allows it
    /// (`introspection = true`). The vCPUs pause while the monitor reads and then run on; the
    /// answer goes to the VM's owner, and describe counts every one.
    Introspect {
        view: IntrospectView,
        /// For `trace`: the kernel function to stop at (default: the kernel's exec path); for
        /// `untrace`: the one to take out (default: all).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        symbol: Option<String>,
    },
}

/// What an introspection request lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntrospectView {
    /// The kernel's task list.
    Processes,
    /// The kernel's module list.
    Modules,
    /// Measure the kernel (text and rodata page hashes, system call table, every vCPU's IDT,
    /// GDT, system-call MSRs and CR0/CR4 protections) and keep it as the baseline.
    Baseline,
    /// Measure again and report every difference from the baseline, and modules hidden from
    /// the module list.
    Check,
    /// Guard kernel text and rodata: guest writes there exit to the monitor, which records
    /// them (writer and target named) and then performs them.
    Protect,
    /// The same, but a write is dropped and the VM paused before it lands.
    ProtectPause,
    /// The writes trapped so far.
    Traps,
    /// Put a breakpoint on a kernel function (KVM guest debug): every call is recorded with
    /// the process that made it and, for exec, the file name. Up to [`MAX_BREAKPOINTS`]
    /// functions at once.
    Trace,
    /// Take a breakpoint out (`symbol`), or all of them.
    Untrace,
    /// The calls recorded so far.
    Hits,
}

/// One breakpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracePoint {
    pub symbol: String,
    pub address: u64,
}

/// The breakpoints' state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceInfo {
    /// The functions stopped at (at most [`MAX_BREAKPOINTS`]).
    #[serde(default)]
    pub breakpoints: Vec<TracePoint>,
    /// Calls recorded since the VM started.
    pub hits: u64,
    /// Debug exceptions that were not a breakpoint's, given back to the guest, and the last.
    #[serde(default)]
    pub other_exits: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_other: Option<String>,
}

/// Most breakpoints at once: one per x86 debug address register (DR0-DR3).
pub const MAX_BREAKPOINTS: usize = 4;

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHit {
    pub vcpu: u32,
    pub symbol: String,
    /// The calling process (thread-group id) and its name.
    pub pid: i32,
    pub comm: String,
    /// For exec: the file name; otherwise the first arguments.
    pub detail: String,
    pub ago_ms: u64,
}

/// Write protection's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionInfo {
    pub armed: bool,
    /// Guest-virtual ranges guarded, [start, end).
    pub ranges: Vec<[u64; 2]>,
    /// Writes pause the VM instead of landing.
    pub pause: bool,
    /// Writes trapped since it was armed.
    pub writes: u64,
}

/// One trapped write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrapReport {
    pub vcpu: u32,
    /// Guest-virtual address written, and its symbol.
    pub address: u64,
    pub target: String,
    /// The writer's instruction pointer (just after the write), and what it is.
    pub rip: u64,
    pub writer: String,
    /// The bytes the guest wrote, in hex.
    pub bytes: String,
    /// The write was performed (protect); false: dropped and the VM paused (protect_pause).
    pub landed: bool,
    pub ago_ms: u64,
}

/// One integrity finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegrityFinding {
    /// `kernel_text`, `kernel_rodata`, `syscall_table`, `idt`, `gdt`, `msr`, `cr0_wp`,
    /// `cr4_smep`, `cr4_smap`, `hidden_module`.
    pub kind: String,
    /// The guest-virtual address concerned (0 when none).
    pub address: u64,
    pub detail: String,
}

/// What a baseline or check measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// Kernel text and rodata bytes hashed.
    pub bytes: u64,
    pub syscalls: u64,
    pub vcpus: u32,
    /// Time spent measuring (within the pause).
    pub measure_us: u64,
}

/// Most rows an introspection reply carries (a frame holds at most [`MAX_FRAME_LEN`] bytes);
/// a guest with more is reported partial.
pub const MAX_INTROSPECT_ROWS: usize = 2048;

/// One process as the guest kernel records it, read from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestProcess {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    pub uid: u32,
    /// The kernel's `__state` (0 runnable, 1 sleeping, 2 uninterruptible, ...).
    pub state: u32,
    /// Nanoseconds after the guest booted.
    pub start_time_ns: u64,
    pub kernel_thread: bool,
    /// The `task_struct`'s guest-virtual address.
    pub task: u64,
}

/// One loaded module as the guest kernel records it, read from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestModule {
    pub name: String,
    /// `live`, `coming`, `going`, `unformed`.
    pub state: String,
    /// Guest-virtual address and size of its code.
    pub base: u64,
    pub size: u32,
}

/// An introspection's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Introspection {
    /// The guest kernel's KASLR slide.
    pub slide: u64,
    /// How long the vCPUs were held (0 when the VM was already paused).
    pub paused_us: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<GuestProcess>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<GuestModule>,
    /// For a baseline or a check: what was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
    /// For a check: every difference from the baseline (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<IntegrityFinding>,
    /// For protect and traps: the write protection's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<ProtectionInfo>,
    /// For traps: the writes trapped (the last 1024).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traps: Vec<TrapReport>,
    /// For trace, untrace and hits: the breakpoints' state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TraceInfo>,
    /// For hits: the calls recorded (the last 2048 sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hits: Vec<TraceHit>,
    /// Set when the list is incomplete, and why (a broken or looping list in guest memory,
    /// more rows than a reply carries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<String>,
}

/// Run state as the monitor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    /// A stop was requested or the guest ended; the monitor is on its way out.
    Stopping,
}

/// Exit counters summed over the vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitCounts {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub hostcalls: u64,
}

/// One device's counters, by name (`blk0`, `net0`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    pub name: String,
    pub counters: BTreeMap<String, u64>,
}

/// A running VM as its monitor reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub state: RunState,
    /// `function` or `linux`.
    pub kind: String,
    pub vcpus: u32,
    pub memory: u64,
    pub uptime_ms: u64,
    /// Time the vCPU threads spent on a CPU, summed.
    pub vcpu_time_ns: u64,
    pub exits: ExitCounts,
    pub console_bytes: u64,
    pub devices: Vec<DeviceInfo>,
    /// The monitor's process id.
    pub pid: u32,
    /// How far a lazy restore has got, if the VM was restored lazily.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_restore: Option<LazyRestoreInfo>,
    /// Introspection requests served, so the owner sees every look inside the VM.
    #[serde(default)]
    pub introspections: u64,
}

/// A lazy restore's progress: memory blocks stored in the snapshot, and how many are in place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyRestoreInfo {
    /// 64 KiB blocks stored in the snapshot file.
    pub blocks: u64,
    /// Of those, authenticated, decrypted and in guest memory.
    pub placed: u64,
    /// Of those, placed because the guest (or a device) touched them first.
    pub on_demand: u64,
    /// Zero blocks touched while the restore ran.
    pub zero_faults: u64,
    /// Every block is in place and the file is closed.
    pub complete: bool,
    /// From the restore's start until complete (or until now).
    pub elapsed_ms: u64,
}

/// What a monitor answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "result",
    content = "value",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Response {
    Ok,
    Info(VmInfo),
    /// A snapshot was written: its size and how long the VM was paused for it.
    Snapshot {
        bytes: u64,
        paused_ms: u64,
    },
    Introspection(Introspection),
    /// The request cannot be served; `code` is stable (see [`error_code`]).
    Error {
        code: String,
        message: String,
    },
}

/// An error and its causes as one line (`outer: inner: innermost`), for errors that leave a
/// process as text (the channel's error replies, the daemon's HTTP error bodies).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Stable error codes a monitor returns.
pub mod error_code {
    /// The request does not fit the VM's state (resume a running VM).
    pub const WRONG_STATE: &str = "wrong_state";
    /// The VM cannot do this (power button on a VM without ACPI).
    pub const UNSUPPORTED: &str = "unsupported";
    /// The request's arguments are wrong (a malformed key).
    pub const INVALID: &str = "invalid_request";
    /// The monitor failed serving it (a write error).
    pub const FAILED: &str = "failed";
    /// The VM's spec does not allow it (introspection of a VM that did not opt in).
    pub const FORBIDDEN: &str = "forbidden";
}

impl Response {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(CHANNEL_VERSION);
    out.extend_from_slice(&body);
    out
}

/// Decodes a frame's bytes after the length field (version byte and body).
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, ChannelError> {
    let (&version, body) = frame.split_first().ok_or(ChannelError::FrameSize(0))?;
    if version != CHANNEL_VERSION {
        return Err(ChannelError::Version { found: version });
    }
    serde_json::from_slice(body).map_err(|e| ChannelError::Malformed(e.to_string()))
}

/// Writes one message.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ChannelError> {
    w.write_all(&encode(msg))?;
    w.flush()?;
    Ok(())
}

/// Reads one frame (version byte and body), refusing oversized frames before reading them.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ChannelError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ChannelError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(ChannelError::FrameSize(len));
    }
    let mut frame = Vec::new();
    r.take(len as u64).read_to_end(&mut frame)?;
    if frame.len() != len {
        return Err(ChannelError::Closed);
    }
    Ok(frame)
}

/// Reads and decodes one message.
pub fn read_message<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ChannelError> {
    decode(&read_frame(r)?)
}

/// Incremental frame assembly for a non-blocking reader (the monitor's event loop).
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    /// Adds bytes that arrived.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Takes the next complete frame, if one has arrived. A bad length is an error and the
    /// connection should be closed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ChannelError> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(ChannelError::FrameSize(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

/// A blocking client of one monitor's control socket.
#[derive(Debug)]
pub struct Client {
    stream: std::os::unix::net::UnixStream,
}

impl Client {
    /// Connects to `control.sock`; `timeout` bounds each request.
    pub fn connect(
        path: &std::path::Path,
        timeout: std::time::Duration,
    ) -> Result<Self, ChannelError> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self { stream })
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, req: &Request) -> Result<Response, ChannelError> {
        write_message(&mut self.stream, req)?;
        read_message(&mut self.stream)
    }

    /// Changes how long one request may take (snapshots of large guests take a while).
    pub fn set_timeout(&self, timeout: std::time::Duration) -> Result<(), ChannelError> {
        self.stream.set_read_timeout(Some(timeout))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_frames() {
        let reqs = [
            Request::Describe,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
            Request::Kill,
            Request::Snapshot {
                path: "/x".into(),
                key: "00".repeat(32),
                leave_paused: true,
            },
            Request::Introspect {
                view: IntrospectView::Modules,
                symbol: None,
            },
            Request::Introspect {
                view: IntrospectView::Trace,
                symbol: Some("bprm_execve".into()),
            },
        ];
        for r in reqs {
            let f = encode(&r);
            let back: Request = read_message(&mut f.as_slice()).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn decode_wrong_version_unknown_field_and_sizes_are_refused() {
        let mut f = encode(&Request::Pause);
        f[4] = 2;
        assert!(matches!(
            read_message::<Request>(&mut f.as_slice()),
            Err(ChannelError::Version { found: 2 })
        ));
        let body = br#"{"op":"pause","extra":1}"#;
        let mut f = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        f.push(CHANNEL_VERSION);
        f.extend_from_slice(body);
        assert!(matches!(
            read_message::<Request>(&mut f.as_slice()),
            Err(ChannelError::Malformed(_))
        ));
        let huge = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_message::<Request>(&mut huge.as_slice()),
            Err(ChannelError::FrameSize(_))
        ));
        let mut short = encode(&Request::Describe);
        short.pop();
        assert!(matches!(
            read_message::<Request>(&mut short.as_slice()),
            Err(ChannelError::Closed)
        ));
    }

    #[test]
    fn frame_buffer_assembles_split_frames() {
        let mut all = encode(&Request::Pause);
        all.extend(encode(&Request::Resume));
        let mut fb = FrameBuffer::default();
        let mut got = Vec::new();
        for b in &all {
            fb.extend(std::slice::from_ref(b));
            while let Some(f) = fb.next_frame().unwrap() {
                got.push(decode::<Request>(&f).unwrap());
            }
        }
        assert_eq!(got, vec![Request::Pause, Request::Resume]);
        let mut bad = FrameBuffer::default();
        bad.extend(&[0, 0, 0, 0]);
        assert!(bad.next_frame().is_err());
    }
}
