//! The monitor's side of a back-end: start it through the launcher, send it requests whose data
//! sits in the device's I/O window, check its replies against the window's ownership table,
//! and when it dies (killed, crashed, stopped by its seccomp policy, or broke the protocol)
//! start another and send the request in flight again. Block requests are idempotent (a read
//! or write of the same bytes at the same place, a flush, a discard), and a reply is only
//! accepted from a live back-end, so a write the guest saw acknowledged was acknowledged by a
//! back-end that did it: a restart loses nothing the guest was told is done.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::Kind;
use crate::disk::{DiskOp, Punch};
use crate::launcher::{Launcher, Spawn};
use crate::ownership::WindowTable;
use crate::proto::{self, Msg, Op, ProtoError};
use crate::sys;
use crate::window::Window;

/// A reply must come within this (a back-end that takes longer is taken for hung, replaced,
/// and the request sent again). Generous: a flush of a large dirty image can take seconds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Whether the back-end can run while this thread spins (a spin on a one-CPU host only delays
/// it).
fn spare_cpu() -> bool {
    static SPARE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPARE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// How long [`expect`] looks for a reply without sleeping.
const SPIN: Duration = Duration::from_micros(100);
/// A new back-end must say hello within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-ends started for one request before the device gives up on it (the guest gets an I/O
/// error; the next request tries again). Bounds a request that kills every back-end it meets.
const MAX_STARTS_PER_REQUEST: u32 = 4;

/// What a back-end's monitor side counts (for `--stats`, describe and tests).
#[derive(Debug, Default)]
pub struct BackEndStats {
    /// Back-ends started after the first (each death costs one).
    pub restarts: AtomicU64,
    /// Seccomp violations the back-ends reported before they died.
    pub violations: AtomicU64,
    /// How long the last restart took, in µs: from noticing the back-end dead to the reply of a
    /// new one to the request in flight.
    pub last_restart_us: AtomicU64,
    /// Most requests in flight at once (sent, not yet answered).
    pub peak_in_flight: AtomicU64,
}

/// Why the current back-end is no longer used.
#[derive(Debug)]
pub(crate) enum Death {
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
    resource: Option<OwnedFd>,
    channel: Option<OwnedFd>,
    next_id: u64,
    /// Requests sent and not yet answered, by id.
    in_flight: BTreeMap<u64, Op>,
    /// When the last back-end was found dead, until a new one answers a request.
    died_at: Option<Instant>,
    stats: BackEndStats,
}

impl BackEnd {
    /// Starts back-end `name` of `kind` serving `resource` (if its kind has one), with a window
    /// of `window` bytes.
    pub fn start(
        launcher: Arc<Launcher>,
        kind: Kind,
        name: &str,
        flags: u16,
        resource: Option<OwnedFd>,
        window: u64,
    ) -> std::io::Result<Self> {
        let cname = std::ffi::CString::new(format!("bulwark-window-{name}"))
            .map_err(std::io::Error::other)?;
        let window = Window::create(&cname, window)?;
        // Learn it now, on the thread that builds the VM: the threads that later wait for
        // replies may not ask the kernel (their seccomp policies have no sched_getaffinity).
        spare_cpu();
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
            in_flight: BTreeMap::new(),
            died_at: None,
            stats: BackEndStats::default(),
        };
        b.launch()?;
        Ok(b)
    }

    /// [`Self::start`] through the process's launcher ([`Launcher::global`]), which a monitor
    /// installs before it builds its VM.
    pub fn start_here(
        kind: Kind,
        name: &str,
        flags: u16,
        resource: Option<OwnedFd>,
        window: u64,
    ) -> std::io::Result<Self> {
        let launcher = Launcher::global().ok_or_else(|| {
            std::io::Error::other(
                "this process has no back-end launcher (it starts before the VM is built)",
            )
        })?;
        Self::start(launcher, kind, name, flags, resource, window)
    }

    pub fn stats(&self) -> &BackEndStats {
        &self.stats
    }

    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The window range request `msg` names.
    fn window_range(&self, msg: &Msg) -> Result<VolatileSlice<'_>, Death> {
        self.window
            .slice(msg.window, msg.len)
            .ok_or_else(|| Death::Gone(format!("window range {}+{} outside", msg.window, msg.len)))
    }

    /// The live back-end's channel, for an event loop to watch, with the back-end's
    /// incarnation: a restarted back-end's channel may reuse the old descriptor number, but it
    /// is a new file that must be registered again.
    pub fn channel_fd(&self) -> Option<(RawFd, u32)> {
        self.channel
            .as_ref()
            .map(|c| (c.as_raw_fd(), self.what.incarnation))
    }

    /// Starts a back-end process and waits for its hello.
    fn launch(&mut self) -> std::io::Result<()> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let pid = self.launcher.spawn(
            &self.what,
            theirs.as_fd(),
            self.window.fd(),
            self.resource.as_ref().map(AsFd::as_fd),
        )?;
        drop(theirs);
        self.what.incarnation += 1;
        let hello = match expect(&ours, HELLO_TIMEOUT) {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(std::io::Error::other(format!(
                    "the {} back-end did not start: no hello in {HELLO_TIMEOUT:?}",
                    self.what.name
                )));
            }
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
        tracing::debug!(backend = %self.what.name, pid, "back-end started");
        self.channel = Some(ours);
        Ok(())
    }

    /// The back-end is gone or unusable: count it, forget it; every window range it held
    /// returns to the monitor and its requests are no longer in flight.
    pub(crate) fn bury(&mut self, death: Death) {
        self.channel = None;
        self.table.take_all_back();
        self.in_flight.clear();
        self.died_at.get_or_insert_with(Instant::now);
        match death {
            Death::Gone(why) => {
                tracing::warn!(backend = %self.what.name, "back-end lost ({why}); starting another");
            }
            Death::Violation(report) => {
                tracing::warn!(backend = %self.what.name, "back-end stopped by its seccomp policy: {report}; starting another");
                self.stats.violations.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Makes sure a back-end runs. `Ok(true)`: a new one was started (what the old one was
    /// told — offloads, receive slots — must be told again).
    pub(crate) fn ensure_running(&mut self) -> std::io::Result<bool> {
        if self.channel.is_some() {
            return Ok(false);
        }
        self.launch()?;
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Sends request `msg` (its id is filled in and returned), lending the window range it
    /// names.
    pub(crate) fn send(&mut self, msg: Msg) -> Result<u64, Death> {
        self.send_with(msg, None)
    }

    /// [`Self::send`] with a descriptor attached (a vsock stream handed over).
    pub(crate) fn send_with(
        &mut self,
        mut msg: Msg,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<u64, Death> {
        self.number(std::slice::from_mut(&mut msg))?;
        let fds: Vec<_> = fd.into_iter().collect();
        self.transmit(&[msg], |ch, _| sys::send(ch, &msg.encode(), &fds))?;
        Ok(msg.id)
    }

    /// Sends every request of `msgs` at once (one system call where the channel takes them
    /// all: the back-end wakes once for the lot), filling in their ids and lending the window
    /// ranges they name.
    pub(crate) fn send_all(&mut self, msgs: &mut [Msg]) -> Result<(), Death> {
        self.number(msgs)?;
        self.transmit(msgs, |ch, msgs| {
            let encoded: Vec<_> = msgs.iter().map(Msg::encode).collect();
            let each: Vec<&[u8]> = encoded.iter().map(|e| &e[..]).collect();
            sys::send_many(ch, &each)
        })
    }

    /// Gives `msgs` their ids and lends the window ranges they name.
    fn number(&mut self, msgs: &mut [Msg]) -> Result<(), Death> {
        if self.channel.is_none() {
            return Err(Death::Gone("not running".into()));
        }
        for msg in msgs {
            msg.id = self.next_id;
            self.next_id += 1;
            if msg.lends_window() {
                self.table
                    .lend(msg.window, msg.len, msg.id)
                    .map_err(|e| Death::Gone(format!("window: {e}")))?;
            }
        }
        Ok(())
    }

    /// Puts numbered `msgs` on the channel through `send`; they are in flight once it
    /// succeeds.
    fn transmit(
        &mut self,
        msgs: &[Msg],
        send: impl FnOnce(std::os::fd::BorrowedFd<'_>, &[Msg]) -> std::io::Result<()>,
    ) -> Result<(), Death> {
        let Some(ch) = self.channel.as_ref() else {
            return Err(Death::Gone("not running".into()));
        };
        if let Err(e) = send(ch.as_fd(), msgs) {
            // A back-end stopped by its policy wrote why before it died: that is the news.
            return Err(match expect(ch, Duration::ZERO) {
                Err(Death::Violation(r)) => Death::Violation(r),
                _ => Death::Gone(format!("sending failed: {e}")),
            });
        }
        for m in msgs {
            self.in_flight.insert(m.id, m.op);
        }
        self.stats
            .peak_in_flight
            .fetch_max(self.in_flight.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The back-end's next message (`None`: nothing within `timeout`), checked against what is
    /// in flight: a reply ends its request and returns its window range to the monitor.
    pub(crate) fn recv(&mut self, timeout: Duration) -> Result<Option<Msg>, Death> {
        let Some(ch) = self.channel.as_ref() else {
            return Err(Death::Gone("not running".into()));
        };
        let Some(m) = expect(ch, timeout)? else {
            return Ok(None);
        };
        let op = self.in_flight.get(&m.id).copied();
        let fits = match (m.op, op) {
            (Op::Done, Some(op)) => {
                op != Op::RxPost && (m.len == 0 || Msg::new(op, 0).counts_bytes())
            }
            (Op::Received, Some(Op::RxPost)) => true,
            // Unasked news of a stream, from a vsock back-end only; its client checks that the
            // stream was watched.
            (Op::SockReady, None) if self.what.kind == Kind::Vsock => return Ok(Some(m)),
            _ => false,
        };
        if !fits {
            return Err(Death::Gone(format!(
                "protocol violation: {:?} for request {} ({op:?})",
                m.op, m.id
            )));
        }
        self.in_flight.remove(&m.id);
        if op.is_some_and(|op| Msg::new(op, 0).lends_window()) {
            let (_, lent) = self
                .table
                .take_back(m.id)
                .map_err(|e| Death::Gone(format!("protocol violation: {e}")))?;
            if m.len > lent {
                return Err(Death::Gone(format!(
                    "protocol violation: {} bytes in a {lent}-byte window range",
                    m.len
                )));
            }
        }
        self.answered();
        Ok(Some(m))
    }

    /// A back-end answered: a restart (if one was under way) is over.
    fn answered(&mut self) {
        if let Some(t0) = self.died_at.take() {
            let us = t0.elapsed().as_micros() as u64;
            self.stats.last_restart_us.store(us, Ordering::Relaxed);
            tracing::warn!(
                backend = %self.what.name,
                restart_us = us,
                "a new back-end answered {us} µs after the old one was found dead"
            );
        }
    }

    /// Sends `msg` (with `fd` attached, if any) to the live back-end and waits for its reply,
    /// which it returns (`arg`: 0 or the errno). Other messages that arrive meanwhile go to
    /// `other`. `Err(Died)`: the back-end died (it is buried; start another and send again).
    pub(crate) fn call_once(
        &mut self,
        msg: Msg,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        other: &mut dyn FnMut(Msg),
    ) -> Result<Msg, Died> {
        let id = match self.send_with(msg, fd) {
            Ok(id) => id,
            Err(d) => {
                self.bury(d);
                return Err(Died);
            }
        };
        loop {
            match self.recv(REPLY_TIMEOUT) {
                Ok(Some(m)) if m.id == id && m.op == Op::Done => return Ok(m),
                Ok(Some(m)) => other(m),
                Ok(None) => {
                    self.bury(Death::Gone(format!("no answer in {REPLY_TIMEOUT:?}")));
                    return Err(Died);
                }
                Err(d) => {
                    self.bury(d);
                    return Err(Died);
                }
            }
        }
    }
}

fn gave_up(name: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "the {name} back-end died {MAX_STARTS_PER_REQUEST} times in a row under one request"
    ))
}

/// The back-end died during a call (and was buried).
#[derive(Debug)]
pub(crate) struct Died;

/// The next message on `ch` within `timeout` (`None`: none came); a violation report is
/// returned as such (the back-end is dead after it).
fn expect(ch: &OwnedFd, timeout: Duration) -> Result<Option<Msg>, Death> {
    let mut buf = [0u8; 256];
    // A reply usually comes within tens of microseconds. Sleeping in poll and being woken from
    // the back-end's CPU costs about as much again on a virtualised host, so look without
    // sleeping for a little while first.
    let spin = if spare_cpu() {
        SPIN.min(timeout)
    } else {
        Duration::ZERO
    };
    let spin_until = Instant::now() + spin;
    let got = loop {
        match sys::recv_now(ch.as_fd(), &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => break Some(other),
        }
        if Instant::now() >= spin_until {
            break None;
        }
        std::hint::spin_loop();
    };
    let got = match got {
        Some(r) => r,
        None => {
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            match sys::wait_readable(ch.as_fd(), ms) {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) => return Err(Death::Gone(format!("waiting failed: {e}"))),
            }
            sys::recv(ch.as_fd(), &mut buf)
        }
    };
    // A back-end that dies with a request of ours unread leaves the error ECONNRESET on the
    // channel, which the kernel reports (once) before what is still queued: its violation
    // report may be waiting behind it.
    let got = match got {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            match sys::recv_now(ch.as_fd(), &mut buf) {
                Ok(r) => Ok(r),
                Err(_) => Err(e),
            }
        }
        other => other,
    };
    match got {
        Ok((0, _)) => Err(Death::Gone("it exited".into())),
        Ok((n, _)) => match Msg::decode(&buf[..n]) {
            Ok(m) => Ok(Some(m)),
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

/// Window ranges start on this boundary (the back-end's `O_DIRECT` then needs no bounce
/// buffer for them).
const PIECE_ALIGN: u64 = 4096;

/// What one message to a block back-end does: a whole operation, or a window-sized piece of a
/// read or write.
struct Piece<'a> {
    /// The operation (index into the caller's list) it belongs to.
    op: usize,
    msg: Msg,
    /// The guest buffers of a read or write piece.
    bufs: Vec<VolatileSlice<'a>>,
    answered: bool,
}

impl Piece<'_> {
    fn data_len(&self) -> u64 {
        if self.msg.lends_window() {
            self.msg.len
        } else {
            0
        }
    }
}

impl RemoteDisk {
    pub fn new(backend: BackEnd) -> Self {
        Self { backend }
    }

    pub fn stats(&self) -> &BackEndStats {
        self.backend.stats()
    }

    /// Runs `ops` and returns each one's result, in order. As many are in flight at once as
    /// the window has room for (reads and writes larger than the window go in window-sized
    /// pieces), so the back-end serves a whole queue notification's requests in one wake-up.
    /// The back-end works through them in order; when it dies, a new one is sent those it had
    /// not answered (block operations are idempotent), at most [`MAX_STARTS_PER_REQUEST`]
    /// times per window-full.
    pub fn run(&mut self, ops: &[DiskOp<'_>]) -> Vec<std::io::Result<()>> {
        let cap = self.backend.window.len();
        let piece_cap = if spare_cpu() {
            proto::STREAM_PIECE.min(cap)
        } else {
            cap
        };
        let mut pieces = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let one = |msg: Msg| Piece {
                op: i,
                msg,
                bufs: Vec::new(),
                answered: false,
            };
            match op {
                DiskOp::Read(offset, bufs) | DiskOp::Write(offset, bufs) => {
                    let kind = if matches!(op, DiskOp::Read(..)) {
                        Op::Read
                    } else {
                        Op::Write
                    };
                    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
                    let mut done = 0;
                    while done < total {
                        let len = piece_cap.min(total - done);
                        pieces.push(Piece {
                            bufs: sub_slices(bufs, done, len),
                            ..one(Msg {
                                offset: offset + done,
                                len,
                                ..Msg::new(kind, 0)
                            })
                        });
                        done += len;
                    }
                }
                DiskOp::Flush => pieces.push(one(Msg::new(Op::Flush, 0))),
                DiskOp::Punch(how, offset, len) => {
                    let (op, arg) = match how {
                        Punch::Discard => (Op::Discard, 0),
                        Punch::Zero => (Op::WriteZeroes, 0),
                        Punch::ZeroUnmap => (Op::WriteZeroes, proto::ZEROES_MAY_UNMAP),
                    };
                    pieces.push(one(Msg {
                        offset: *offset,
                        len: *len,
                        arg,
                        ..Msg::new(op, 0)
                    }));
                }
            }
        }
        let mut results: Vec<std::io::Result<()>> = ops.iter().map(|_| Ok(())).collect();
        let mut rest = &mut pieces[..];
        while !rest.is_empty() {
            // As many pieces as the window holds (at most MAX_BATCH), each at its own range.
            let mut at = 0;
            let mut n = 0;
            for p in rest.iter_mut() {
                let len = p.data_len();
                if at + len > cap || n == proto::MAX_BATCH {
                    break;
                }
                if len > 0 {
                    p.msg.window = at;
                    at = (at + len).next_multiple_of(PIECE_ALIGN);
                }
                n += 1;
            }
            let (round, later) = rest.split_at_mut(n);
            self.round(round, &mut results);
            rest = later;
        }
        results
    }

    /// Sends `pieces` (which fit the window together) and collects their replies, restarting
    /// the back-end and sending again what it left unanswered as often as it dies.
    fn round(&mut self, pieces: &mut [Piece<'_>], results: &mut [std::io::Result<()>]) {
        for _ in 0..=MAX_STARTS_PER_REQUEST {
            if let Err(e) = self.backend.ensure_running() {
                return fail_open(pieces, results, &e);
            }
            match self.exchange(pieces, results) {
                Ok(()) => return,
                Err(d) => self.backend.bury(d),
            }
        }
        fail_open(pieces, results, &gave_up(&self.backend.what.name));
    }

    /// One back-end's part of a round: send every piece not yet answered (a write's data is
    /// copied into the window again: a back-end that died may have left anything there), then
    /// take replies until every piece is answered.
    fn exchange(
        &mut self,
        pieces: &mut [Piece<'_>],
        results: &mut [std::io::Result<()>],
    ) -> Result<(), Death> {
        let mut waiting = BTreeMap::new();
        let mut group: Vec<usize> = Vec::new();
        let mut copied = 0;
        let open: Vec<usize> = (0..pieces.len()).filter(|&i| !pieces[i].answered).collect();
        for (k, &i) in open.iter().enumerate() {
            let p = &pieces[i];
            if p.msg.op == Op::Write {
                copy_in(&self.backend.window_range(&p.msg)?, &p.bufs);
                copied += p.msg.len;
            }
            group.push(i);
            // With a CPU to spare the back-end starts on what is copied while the next piece
            // is; without, everything goes at once (each send would wake it only to wait).
            let last = k + 1 == open.len();
            if last || (spare_cpu() && copied >= proto::STREAM_PIECE) {
                let mut msgs: Vec<Msg> = group.iter().map(|&i| pieces[i].msg).collect();
                self.backend.send_all(&mut msgs)?;
                waiting.extend(msgs.iter().zip(group.drain(..)).map(|(m, i)| (m.id, i)));
                copied = 0;
            }
        }
        while !waiting.is_empty() {
            let m = self
                .backend
                .recv(REPLY_TIMEOUT)?
                .ok_or_else(|| Death::Gone(format!("no answer in {REPLY_TIMEOUT:?}")))?;
            let Some(i) = waiting.remove(&m.id) else {
                tracing::debug!("unexpected {:?} ignored", m.op);
                continue;
            };
            let p = &mut pieces[i];
            if m.arg != 0 {
                results[p.op] = Err(std::io::Error::from_raw_os_error(m.arg as i32));
            } else if p.msg.op == Op::Read {
                copy_out(&self.backend.window_range(&p.msg)?, &p.bufs);
            }
            p.answered = true;
        }
        Ok(())
    }
}

/// Every piece not yet answered fails with `e`.
fn fail_open(pieces: &[Piece<'_>], results: &mut [std::io::Result<()>], e: &std::io::Error) {
    for p in pieces.iter().filter(|p| !p.answered) {
        results[p.op] = Err(std::io::Error::new(e.kind(), e.to_string()));
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

/// One frame slot of a network window: a 12-byte virtio-net header plus a 64 KiB GSO frame and
/// its Ethernet header fit, rounded up to pages.
pub const NET_SLOT: u64 = 68 << 10;
/// Receive slots posted to a network back-end at a time.
pub const NET_RX_SLOTS: u64 = 8;
/// A network window: one transmit slot, then the receive slots.
pub const NET_WINDOW: u64 = NET_SLOT * (1 + NET_RX_SLOTS);

/// A tap served by a back-end process. Transmit is synchronous (the frame is in the window's
/// transmit slot until the back-end has written it to the tap); receive is asynchronous: the
/// back-end fills posted receive slots as frames arrive and says so on its channel, which the
/// device's event loop watches ([`Self::channel_fd`]).
#[derive(Debug)]
pub struct RemoteTap {
    backend: BackEnd,
    /// Received frames not yet taken: (slot offset, length). The monitor owns these slots.
    ready: std::collections::VecDeque<(u64, u64)>,
    /// Receive slots lent to the back-end, by request id → slot offset.
    posted: BTreeMap<u64, u64>,
    /// The offload flags the guest accepted, told again to every new back-end.
    offload: Option<u32>,
}

impl RemoteTap {
    /// Takes over a started back-end of kind [`Kind::Net`] (window of [`NET_WINDOW`] bytes)
    /// and posts its receive slots.
    pub fn new(backend: BackEnd) -> Self {
        let mut t = Self {
            backend,
            ready: Default::default(),
            posted: BTreeMap::new(),
            offload: None,
        };
        if let Err(d) = t.post_free_slots() {
            t.backend.bury(d);
        }
        t
    }

    pub fn stats(&self) -> &BackEndStats {
        self.backend.stats()
    }

    /// The live back-end's channel (readable when a frame arrived or the back-end died) and
    /// its incarnation (see [`BackEnd::channel_fd`]).
    pub fn channel_fd(&self) -> Option<(RawFd, u32)> {
        self.backend.channel_fd()
    }

    fn slot_offsets() -> impl Iterator<Item = u64> {
        (1..=NET_RX_SLOTS).map(|i| i * NET_SLOT)
    }

    /// Posts every receive slot that is neither lent nor holding a frame.
    fn post_free_slots(&mut self) -> Result<(), Death> {
        for at in Self::slot_offsets() {
            let busy =
                self.posted.values().any(|&p| p == at) || self.ready.iter().any(|&(r, _)| r == at);
            if !busy {
                self.post(at)?;
            }
        }
        Ok(())
    }

    fn post(&mut self, at: u64) -> Result<(), Death> {
        let id = self.backend.send(Msg {
            window: at,
            len: NET_SLOT,
            ..Msg::new(Op::RxPost, 0)
        })?;
        self.posted.insert(id, at);
        Ok(())
    }

    /// What a new back-end must be told: the offloads and the receive slots.
    fn restarted(&mut self) -> Result<(), Death> {
        self.posted.clear();
        if let Some(flags) = self.offload {
            let id = self.backend.send(Msg {
                arg: flags,
                ..Msg::new(Op::SetOffload, 0)
            })?;
            loop {
                match self.backend.recv(REPLY_TIMEOUT)? {
                    Some(m) if m.id == id => break,
                    Some(m) => self.note(m)?,
                    None => return Err(Death::Gone("no answer to set offloads".into())),
                }
            }
        }
        self.post_free_slots()
    }

    /// A message that is not the reply being waited for: a received frame.
    fn note(&mut self, m: Msg) -> Result<(), Death> {
        match (m.op, self.posted.remove(&m.id)) {
            (Op::Received, Some(at)) => {
                self.ready.push_back((at, m.len));
                Ok(())
            }
            _ => Err(Death::Gone(format!(
                "protocol violation: unexpected {:?}",
                m.op
            ))),
        }
    }

    /// Restarts the back-end if it is gone (and tells the new one what it must know). Errors
    /// when it cannot be started, or dies again at once, [`MAX_STARTS_PER_REQUEST`] times.
    fn live(&mut self) -> std::io::Result<()> {
        for _ in 0..MAX_STARTS_PER_REQUEST {
            if !self.backend.ensure_running()? {
                return Ok(());
            }
            match self.restarted() {
                Ok(()) => return Ok(()),
                Err(d) => self.backend.bury(d),
            }
        }
        Err(gave_up(&self.backend.what.name))
    }

    /// Sends one frame (virtio-net header first) to the tap. A frame the back-end could not
    /// write (a full tap queue) is an error, as it is for an inline tap.
    pub fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let len = frame.len() as u64;
        let Some(slot) = self.backend.window.slice(0, len.min(NET_SLOT)) else {
            return Err(std::io::Error::other("frame larger than a window slot"));
        };
        if len > NET_SLOT {
            return Err(std::io::Error::other("frame larger than a window slot"));
        }
        slot.copy_from(frame);
        let msg = Msg {
            window: 0,
            len,
            ..Msg::new(Op::Transmit, 0)
        };
        let errno = self.call(msg)?;
        if errno == 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(errno as i32))
        }
    }

    /// The next received frame (header first) into `buf`; its length, or `None` when none is
    /// waiting. Reads what the back-end sent without blocking, restarting it if it died.
    pub fn receive(&mut self, buf: &mut [u8]) -> Option<usize> {
        let mut deaths = 0;
        loop {
            if let Some((at, len)) = self.ready.pop_front() {
                let n = (len as usize).min(buf.len());
                if let Some(slot) = self.backend.window.slice(at, n as u64) {
                    slot.copy_to(&mut buf[..n]);
                }
                if self.backend.channel_fd().is_some()
                    && let Err(d) = self.post(at)
                {
                    self.backend.bury(d);
                }
                return Some(n);
            }
            if deaths > MAX_STARTS_PER_REQUEST || self.live().is_err() {
                return None;
            }
            match self.backend.recv(Duration::ZERO) {
                Ok(Some(m)) => {
                    if let Err(d) = self.note(m) {
                        deaths += 1;
                        self.backend.bury(d);
                    }
                }
                Ok(None) => return None,
                Err(d) => {
                    deaths += 1;
                    self.backend.bury(d);
                }
            }
        }
    }

    /// Sets the tap's offloads (and remembers them for the next back-end).
    pub fn set_offload(&mut self, flags: u32) -> std::io::Result<()> {
        self.offload = Some(flags);
        match self.call(Msg {
            arg: flags,
            ..Msg::new(Op::SetOffload, 0)
        })? {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e as i32)),
        }
    }

    /// `msg` to a live back-end (restarting it, with what it must be told, as often as it
    /// dies); frames that arrive meanwhile are kept.
    fn call(&mut self, msg: Msg) -> std::io::Result<u32> {
        for _ in 0..=MAX_STARTS_PER_REQUEST {
            self.live()?;
            let mut noted: Vec<Msg> = Vec::new();
            let r = self.backend.call_once(msg, None, &mut |m| noted.push(m));
            for m in noted {
                if let Err(d) = self.note(m) {
                    self.backend.bury(d);
                }
            }
            if let Ok(reply) = r {
                return Ok(reply.arg);
            }
        }
        Err(gave_up(&self.backend.what.name))
    }
}
