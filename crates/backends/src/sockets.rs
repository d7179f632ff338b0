//! The monitor's side of a vsock back-end ([`crate::Kind::Vsock`]): the host ends of the
//! device's streams live in the back-end process, and the device moves bytes to and from them
//! through the window, one synchronous request at a time.
//!
//! The monitor still accepts host clients and connects to host listeners (it owns the device's
//! listening socket, which must outlive any back-end), and hands each new stream over at once
//! ([`RemoteSockets::adopt`]); from then on only the back-end holds it. Readiness is one-shot:
//! [`RemoteSockets::watch`] asks for one [`SockEvent::Ready`], and a back-end may send no news
//! it was not asked for, so what it can queue for the monitor is bounded by what the monitor
//! asked.
//!
//! A stream's state (bytes in the kernel's buffers, a half-close) dies with the back-end that
//! held it, so a dead back-end cannot be replayed the way a block request is: its streams are
//! reported [`SockEvent::Lost`] (the device resets those connections, as a host peer that
//! crashed would), and a new back-end takes the streams that come after.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::client::{BackEnd, BackEndStats, Death};
use crate::proto::{Msg, Op, SOCK_READABLE, SOCK_WRITABLE};

/// The window of a vsock back-end: the largest piece of one stream's data moved per request.
pub const SOCK_WINDOW: u64 = 256 << 10;
/// Times a new stream is offered to a new back-end when the last one died taking it.
const ADOPT_TRIES: usize = 4;

/// News of the back-end's streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockEvent {
    /// A watched stream is ready (a hang-up or an error counts as both).
    Ready {
        conn: u64,
        readable: bool,
        writable: bool,
    },
    /// The stream died with its back-end.
    Lost(u64),
}

fn reset() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::ConnectionReset)
}

/// The host streams of one vsock device, held by a back-end process.
#[derive(Debug)]
pub struct RemoteSockets {
    backend: BackEnd,
    /// Streams the live back-end holds.
    open: BTreeSet<u64>,
    /// Watches sent per stream that may still be answered with news.
    armed: BTreeMap<u64, u32>,
    events: VecDeque<SockEvent>,
}

impl RemoteSockets {
    /// Takes over a started back-end of kind [`crate::Kind::Vsock`] with a window of
    /// [`SOCK_WINDOW`] bytes.
    pub fn new(backend: BackEnd) -> Self {
        Self {
            backend,
            open: BTreeSet::new(),
            armed: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    pub fn stats(&self) -> &BackEndStats {
        self.backend.stats()
    }

    /// The live back-end's channel (readable when there is news or the back-end died) and its
    /// incarnation (see [`BackEnd::channel_fd`]).
    pub fn channel_fd(&self) -> Option<(RawFd, u32)> {
        self.backend.channel_fd()
    }

    /// The back-end died: every stream it held is lost.
    fn lost_all(&mut self) {
        for conn in std::mem::take(&mut self.open) {
            self.events.push_back(SockEvent::Lost(conn));
        }
        self.armed.clear();
    }

    /// A message that is not the reply waited for: news of a watched stream.
    fn note(&mut self, m: Msg) -> Result<(), Death> {
        let armed = self.armed.get_mut(&m.offset).filter(|n| **n > 0);
        let (Op::SockReady, Some(n)) = (m.op, armed) else {
            return Err(Death::Gone(format!(
                "protocol violation: {:?} of stream {} that was not watched",
                m.op, m.offset
            )));
        };
        *n -= 1;
        if *n == 0 {
            self.armed.remove(&m.offset);
        }
        if self.open.contains(&m.offset) {
            self.events.push_back(SockEvent::Ready {
                conn: m.offset,
                readable: m.arg & SOCK_READABLE != 0,
                writable: m.arg & SOCK_WRITABLE != 0,
            });
        }
        Ok(())
    }

    /// Makes sure a back-end runs (a new one starts with no streams).
    fn live(&mut self) -> std::io::Result<()> {
        if self.backend.ensure_running()? {
            self.lost_all();
        }
        Ok(())
    }

    /// Sends `msg` (with `fd`) to a live back-end and returns its reply; `Err(None)`: the
    /// back-end died meanwhile (it is buried and its streams are lost).
    fn call(
        &mut self,
        msg: Msg,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Msg, Option<std::io::Error>> {
        self.live().map_err(Some)?;
        let mut noted = Vec::new();
        let r = self.backend.call_once(msg, fd, &mut |m| noted.push(m));
        let mut sane = true;
        for m in noted {
            if sane && let Err(d) = self.note(m) {
                self.backend.bury(d);
                sane = false;
            }
        }
        match r {
            Ok(reply) if sane => Ok(reply),
            _ => {
                self.lost_all();
                Err(None)
            }
        }
    }

    /// A request about open stream `conn`: its reply, or the stream is gone.
    fn call_open(&mut self, msg: Msg) -> std::io::Result<Msg> {
        if !self.open.contains(&msg.offset) {
            return Err(reset());
        }
        match self.call(msg, None) {
            Ok(reply) if reply.arg == 0 => Ok(reply),
            Ok(reply) => Err(std::io::Error::from_raw_os_error(reply.arg as i32)),
            Err(e) => Err(e.unwrap_or_else(reset)),
        }
    }

    /// Hands `stream` (a connected, non-blocking unix stream) to the back-end as `conn`; a
    /// back-end that dies meanwhile is replaced and the stream offered to the next.
    pub fn adopt(&mut self, conn: u64, stream: OwnedFd) -> std::io::Result<()> {
        if conn == 0 || self.open.contains(&conn) {
            return Err(std::io::Error::other(format!(
                "vsock stream {conn} is taken; this is a bug in bulwark"
            )));
        }
        let msg = Msg {
            offset: conn,
            ..Msg::new(Op::SockAdopt, 0)
        };
        for _ in 0..ADOPT_TRIES {
            match self.call(msg, Some(stream.as_fd())) {
                Ok(reply) if reply.arg == 0 => {
                    self.open.insert(conn);
                    return Ok(());
                }
                Ok(reply) => return Err(std::io::Error::from_raw_os_error(reply.arg as i32)),
                Err(Some(e)) => return Err(e),
                Err(None) => {}
            }
        }
        Err(std::io::Error::other(
            "the vsock back-end died every time it was handed a stream",
        ))
    }

    /// Writes what stream `conn` takes now of `data` (at most [`SOCK_WINDOW`] bytes); how many
    /// it took. `WouldBlock`: none.
    pub fn send(&mut self, conn: u64, data: &[u8]) -> std::io::Result<usize> {
        let len = data.len().min(SOCK_WINDOW as usize);
        if len == 0 {
            return Ok(0);
        }
        let Some(slot) = self.backend.window().slice(0, len as u64) else {
            return Err(std::io::Error::other("the vsock window is too small"));
        };
        slot.copy_from(&data[..len]);
        let reply = self.call_open(Msg {
            offset: conn,
            window: 0,
            len: len as u64,
            ..Msg::new(Op::SockSend, 0)
        })?;
        Ok(reply.len as usize)
    }

    /// Reads what stream `conn` has into `buf` (at most [`SOCK_WINDOW`] bytes); 0: the peer
    /// closed. `WouldBlock`: nothing yet. A read that finds the stream empty leaves it watched
    /// for readability ([`Msg::recv_armed`]); the second value says whether it did.
    pub fn recv(&mut self, conn: u64, buf: &mut [u8]) -> (std::io::Result<usize>, bool) {
        let len = buf.len().min(SOCK_WINDOW as usize);
        if len == 0 {
            return (Ok(0), false);
        }
        let r = self
            .call_open(Msg {
                offset: conn,
                window: 0,
                len: len as u64,
                arg: SOCK_READABLE,
                ..Msg::new(Op::SockRecv, 0)
            })
            .map(|reply| reply.len as usize);
        let armed = Msg::recv_armed(len as u64, &r);
        if armed {
            *self.armed.entry(conn).or_default() += 1;
        }
        if let Ok(n) = r
            && let Some(slot) = self.backend.window().slice(0, n as u64)
        {
            slot.copy_to(&mut buf[..n]);
        }
        (r, armed)
    }

    /// Shuts stream `conn` for writing.
    pub fn shutdown_write(&mut self, conn: u64) -> std::io::Result<()> {
        self.call_open(Msg {
            offset: conn,
            ..Msg::new(Op::SockShutdown, 0)
        })
        .map(drop)
    }

    /// Closes stream `conn` (nothing to do if it is already gone).
    pub fn close(&mut self, conn: u64) {
        if self.open.contains(&conn) {
            let _ = self.call_open(Msg {
                offset: conn,
                ..Msg::new(Op::SockClose, 0)
            });
        }
        self.open.remove(&conn);
        self.armed.remove(&conn);
    }

    /// Asks for one [`SockEvent::Ready`] when stream `conn` becomes readable or writable as
    /// asked (neither: stop watching).
    pub fn watch(&mut self, conn: u64, readable: bool, writable: bool) -> std::io::Result<()> {
        let bits =
            if readable { SOCK_READABLE } else { 0 } | if writable { SOCK_WRITABLE } else { 0 };
        self.call_open(Msg {
            offset: conn,
            arg: bits,
            ..Msg::new(Op::SockWatch, 0)
        })?;
        if bits != 0 {
            *self.armed.entry(conn).or_default() += 1;
        }
        Ok(())
    }

    /// What happened since the last call: news of watched streams, and streams lost with a
    /// back-end that died (a new one is started at once). Never blocks.
    pub fn events(&mut self) -> Vec<SockEvent> {
        while self.backend.channel_fd().is_some() {
            match self.backend.recv(Duration::ZERO) {
                Ok(Some(m)) => {
                    if let Err(d) = self.note(m) {
                        self.backend.bury(d);
                        self.lost_all();
                    }
                }
                Ok(None) => break,
                Err(d) => {
                    self.backend.bury(d);
                    self.lost_all();
                }
            }
        }
        if let Err(e) = self.live() {
            tracing::error!(error = %e, "vsock back-end cannot be restarted");
        }
        self.events.drain(..).collect()
    }
}
