//! The monitor's side of a back-end: start it through the launcher, send it requests whose data
//! sits in the device's I/O window, check its replies against the window's ownership table,
//! and when it dies (killed, crashed, stopped by its seccomp policy, or broke the protocol)
//! start another and send the request in flight again. Block requests are idempotent (a read
//! or write of the same bytes at the same place, a flush, a discard), and a reply is only
//! accepted from a live back-end, so a write the guest saw acknowledged was acknowledged by a
//! back-end that did it: a restart loses nothing the guest was told is done.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::launcher::{Launcher, Spawn};
use crate::ownership::WindowTable;
use crate::proto::{self, Msg, Op, ProtoError};
use crate::sys;
use crate::window::Window;
use crate::{Kind, disk::Punch};

/// A reply must come within this (a back-end that takes longer is taken for hung, replaced,
/// and the request sent again). Generous: a flush of a large dirty image can take seconds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// A new back-end must say hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-ends started for one request before the request fails (the device then answers the
/// guest with an I/O error and tries again on the next request).
const MAX_STARTS_PER_REQUEST: u32 = 4;

/// What a back-end's monitor side counts (for `--stats`, describe and tests).
#[derive(Debug, Default)]
pub struct BackEndStats {
    /// Back-ends started after the first (each death costs one).
    pub restarts: AtomicU64,
    /// Seccomp violations the back-ends reported before they died.
    pub violations: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// How long the last restart took, death noticed → new back-end said hello, in µs.
    pub last_restart_us: AtomicU64,
    /// The live back-end's pid (in the monitor's PID namespace), 0 while none runs.
    pub pid: AtomicI32,
    /// The last violation report, as the back-end wrote it.
    pub last_violation: Mutex<Option<String>>,
}

/// Why the current back-end is no longer used.
#[derive(Debug)]
enum Death {
    Gone(String),
    Violation(String),
}

/// A back-end process and its window, seen from the monitor.
#[derive(Debug)]
pub struct BackEnd {
    what: Spawn,
    launcher: Arc<Launcher>,
    window: Window,
    table: WindowTable,
    resource: OwnedFd,
    channel: Option<OwnedFd>,
    next_id: u64,
    stats: Arc<BackEndStats>,
}

impl BackEnd {
    /// Starts back-end `name` of `kind` serving `resource`, with a window of `window` bytes.
    pub fn start(
        launcher: Arc<Launcher>,
        kind: Kind,
        name: &str,
        flags: u16,
        resource: OwnedFd,
        window: u64,
    ) -> std::io::Result<Self> {
        let cname = std::ffi::CString::new(format!("bulwark-window-{name}"))
            .map_err(std::io::Error::other)?;
        let window = Window::create(&cname, window)?;
        let mut b = Self {
            what: Spawn {
                kind,
                flags,
                incarnation: 0,
                name: name.to_owned(),
            },
            launcher,
            table: WindowTable::new(window.len()),
            window,
            resource,
            channel: None,
            next_id: 1,
            stats: Arc::default(),
        };
        b.launch()?;
        Ok(b)
    }

    pub fn stats(&self) -> Arc<BackEndStats> {
        self.stats.clone()
    }

    pub fn window_len(&self) -> u64 {
        self.window.len()
    }

    /// Starts a back-end process and waits for its hello.
    fn launch(&mut self) -> std::io::Result<()> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let pid = self.launcher.spawn(
            &self.what,
            theirs.as_fd(),
            self.window.fd(),
            self.resource.as_fd(),
        )?;
        drop(theirs);
        self.what.incarnation += 1;
        let hello = match expect(&ours, HELLO_TIMEOUT) {
            Ok(m) => m,
            Err(Death::Gone(why) | Death::Violation(why)) => {
                return Err(std::io::Error::other(format!(
                    "the {} back-end did not start: {why}",
                    self.what.name
                )));
            }
        };
        if hello.op != Op::Hello || hello.arg != self.what.kind as u32 {
            return Err(std::io::Error::other(format!(
                "the {} back-end did not start: it answered {:?} instead of hello",
                self.what.name, hello.op
            )));
        }
        self.stats.pid.store(pid, Ordering::Relaxed);
        self.channel = Some(ours);
        Ok(())
    }

    /// The back-end is gone or unusable: count it, forget it.
    fn bury(&mut self, death: Death) {
        self.channel = None;
        self.stats.pid.store(0, Ordering::Relaxed);
        self.table.take_all_back();
        match death {
            Death::Gone(why) => {
                tracing::warn!(backend = %self.what.name, "back-end lost ({why}); starting another");
            }
            Death::Violation(report) => {
                tracing::warn!(backend = %self.what.name, "back-end stopped by its seccomp policy: {report}; starting another");
                self.stats.violations.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .last_violation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(report);
            }
        }
    }

    /// Sends `msg` (its `id` is filled in), restarting the back-end as needed; returns the
    /// errno of the reply (0: done).
    fn call(&mut self, mut msg: Msg) -> std::io::Result<u32> {
        let mut starts = 0;
        let mut died_at: Option<Instant> = None;
        loop {
            if self.channel.is_none() {
                if starts == MAX_STARTS_PER_REQUEST {
                    return Err(std::io::Error::other(format!(
                        "the {} back-end died {starts} times in one request",
                        self.what.name
                    )));
                }
                starts += 1;
                let t0 = died_at.unwrap_or_else(Instant::now);
                self.launch()?;
                self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .last_restart_us
                    .store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            msg.id = self.next_id;
            self.next_id += 1;
            if matches!(msg.op, Op::Read | Op::Write) {
                self.table
                    .lend(msg.window, msg.len, msg.id)
                    .map_err(std::io::Error::other)?;
            }
            match self.exchange(&msg) {
                Ok(errno) => {
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                    return Ok(errno);
                }
                Err(death) => {
                    died_at = Some(Instant::now());
                    self.bury(death);
                }
            }
        }
    }

    /// One request and its reply on the live channel.
    fn exchange(&mut self, msg: &Msg) -> Result<u32, Death> {
        let ch = self.channel.as_ref().expect("a live back-end");
        if let Err(e) = sys::send(ch.as_fd(), &msg.encode(), &[]) {
            // A back-end stopped by its policy wrote why before it died: that is the news.
            return Err(match expect(ch, Duration::ZERO) {
                Err(Death::Violation(r)) => Death::Violation(r),
                _ => Death::Gone(format!("sending failed: {e}")),
            });
        }
        let reply = expect(ch, REPLY_TIMEOUT)?;
        if reply.op != Op::Done || reply.id != msg.id {
            return Err(Death::Gone(format!(
                "protocol violation: {:?} for request {} while {} was in flight",
                reply.op, reply.id, msg.id
            )));
        }
        if matches!(msg.op, Op::Read | Op::Write) {
            self.table
                .take_back(reply.id)
                .map_err(|e| Death::Gone(format!("protocol violation: {e}")))?;
        }
        Ok(reply.arg)
    }
}

/// The next message on `ch` within `timeout`; a violation report is returned as such (the
/// back-end is dead after it).
fn expect(ch: &OwnedFd, timeout: Duration) -> Result<Msg, Death> {
    let mut buf = [0u8; 256];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    match sys::wait_readable(ch.as_fd(), ms) {
        Ok(true) => {}
        Ok(false) => return Err(Death::Gone(format!("no answer in {timeout:?}"))),
        Err(e) => return Err(Death::Gone(format!("waiting failed: {e}"))),
    }
    match sys::recv(ch.as_fd(), &mut buf) {
        Ok((0, _)) => Err(Death::Gone("it exited".into())),
        Ok((n, _)) => match Msg::decode(&buf[..n]) {
            Ok(m) => Ok(m),
            Err(ProtoError::Report(r)) => Err(Death::Violation(r)),
            Err(e) => Err(Death::Gone(format!("protocol violation: {e}"))),
        },
        Err(e) => Err(Death::Gone(format!("receiving failed: {e}"))),
    }
}

/// A virtio-blk image served by a back-end process.
#[derive(Debug)]
pub struct RemoteDisk {
    backend: BackEnd,
}

impl RemoteDisk {
    pub fn new(backend: BackEnd) -> Self {
        Self { backend }
    }

    pub fn stats(&self) -> Arc<BackEndStats> {
        self.backend.stats()
    }

    fn status(errno: u32) -> std::io::Result<()> {
        if errno == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(errno as i32))
        }
    }

    /// Reads into `bufs` (in order) from byte `offset`, a window-full at a time.
    pub fn read(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.pieces(offset, bufs, Op::Read)
    }

    /// Writes `bufs` (in order) at byte `offset`.
    pub fn write(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> std::io::Result<()> {
        self.pieces(offset, bufs, Op::Write)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let errno = self.backend.call(Msg::new(Op::Flush, 0))?;
        Self::status(errno)
    }

    pub fn punch(&mut self, how: Punch, offset: u64, len: u64) -> std::io::Result<()> {
        let (op, arg) = match how {
            Punch::Discard => (Op::Discard, 0),
            Punch::Zero => (Op::WriteZeroes, 0),
            Punch::ZeroUnmap => (Op::WriteZeroes, proto::ZEROES_MAY_UNMAP),
        };
        let errno = self.backend.call(Msg {
            offset,
            len,
            arg,
            ..Msg::new(op, 0)
        })?;
        Self::status(errno)
    }

    /// Moves `bufs` through the window in window-sized pieces: guest → window → back-end for
    /// writes, back-end → window → guest for reads.
    fn pieces(&mut self, offset: u64, bufs: &[VolatileSlice<'_>], op: Op) -> std::io::Result<()> {
        let cap = self.backend.window_len();
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let mut done = 0u64;
        while done < total {
            let len = cap.min(total - done);
            let piece = sub_slices(bufs, done, len);
            fn window(b: &BackEnd, len: u64) -> std::io::Result<VolatileSlice<'_>> {
                b.window
                    .slice(0, len)
                    .ok_or_else(|| std::io::Error::other("window too small"))
            }
            if op == Op::Write {
                copy_in(&window(&self.backend, len)?, &piece);
            }
            let errno = self.backend.call(Msg {
                offset: offset + done,
                window: 0,
                len,
                ..Msg::new(op, 0)
            })?;
            Self::status(errno)?;
            if op == Op::Read {
                copy_out(&window(&self.backend, len)?, &piece);
            }
            done += len;
        }
        Ok(())
    }
}

/// `len` bytes of the stream `bufs` from byte `start`.
fn sub_slices<'a>(
    bufs: &[VolatileSlice<'a>],
    mut start: u64,
    mut len: u64,
) -> Vec<VolatileSlice<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        let blen = b.len() as u64;
        if len == 0 {
            break;
        }
        if start >= blen {
            start -= blen;
            continue;
        }
        let take = (blen - start).min(len);
        if let Ok(s) = b.subslice(start as usize, take as usize) {
            out.push(s);
        }
        len -= take;
        start = 0;
    }
    out
}

/// Gathers `parts` into the start of `win`.
fn copy_in(win: &VolatileSlice<'_>, parts: &[VolatileSlice<'_>]) {
    let mut at = 0usize;
    for p in parts {
        if let Ok(dst) = win.subslice(at, p.len()) {
            p.copy_to_volatile_slice(dst);
        }
        at += p.len();
    }
}

/// Scatters the start of `win` into `parts`.
fn copy_out(win: &VolatileSlice<'_>, parts: &[VolatileSlice<'_>]) {
    let mut at = 0usize;
    for p in parts {
        if let Ok(src) = win.subslice(at, p.len()) {
            src.copy_to_volatile_slice(*p);
        }
        at += p.len();
    }
}
