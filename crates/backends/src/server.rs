//! A back-end process: confine itself, say hello, serve requests until the monitor closes the
//! channel. Anything unexpected ends the process; the monitor sees the channel close and starts
//! another.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::disk::{Disk, Punch};
use crate::launcher::{FLAG_DIRECT, Spawn};
use crate::proto::{Msg, Op, SOCK_READABLE, SOCK_WRITABLE, ZEROES_MAY_UNMAP};
use crate::sys;
use crate::window::Window;
use crate::{Kind, proto};

/// Exit status of a back-end that met a message it cannot act on.
const EXIT_PROTOCOL: i32 = 3;
/// Exit status of a back-end that could not set itself up.
const EXIT_SETUP: i32 = 4;

/// A back-end's life, with its channel, its window and (by kind) its resource.
pub(crate) fn run(what: &Spawn, fds: Vec<OwnedFd>) -> ! {
    sys::set_name(&format!("bw-{}", what.name));
    let mut fds = fds.into_iter();
    let (Some(channel), Some(window)) = (fds.next(), fds.next()) else {
        sys::exit_now(EXIT_SETUP)
    };
    let resource = fds.next();
    if sys::die_with_parent().is_err() {
        sys::exit_now(EXIT_SETUP);
    }
    let Ok(window) = Window::open(window) else {
        sys::exit_now(EXIT_SETUP)
    };
    let label: &'static str = Box::leak(format!("{} back-end", what.name).into_boxed_str());
    if let Err(e) =
        bulwark_sandbox::seccomp::confine_backend(what.kind.policy(), label, channel.as_raw_fd())
    {
        eprintln!("bulwark: the {label} cannot confine itself: {e}");
        sys::exit_now(EXIT_SETUP);
    }
    let hello = Msg {
        arg: what.kind as u32,
        ..Msg::new(Op::Hello, 0)
    };
    if sys::send(channel.as_fd(), &hello.encode(), &[]).is_err() {
        sys::exit_now(0);
    }
    let mut probe = Probe::new(what);
    match (what.kind, resource) {
        (Kind::Block, Some(image)) => {
            let disk = Disk::new(File::from(image), what.flags & FLAG_DIRECT != 0);
            serve_block(&channel, &window, &disk, &mut probe)
        }
        (Kind::Net, Some(tap)) => serve_net(&channel, &window, &tap, &mut probe),
        (Kind::Vsock, None) => serve_vsock(&channel, &window, &mut probe),
        _ => sys::exit_now(EXIT_SETUP),
    }
}

/// Test-only hook (debug builds): `BULWARK_BACKEND_PROBE=<name>:<nr>` makes the first
/// incarnation of back-end `<name>` call system call `<nr>` after 20 requests.
struct Probe {
    at: Option<(u64, i64)>,
    name: String,
    served: u64,
}

impl Probe {
    fn new(what: &Spawn) -> Self {
        let at = (|| {
            if !cfg!(debug_assertions) || what.incarnation != 0 {
                return None;
            }
            let spec = std::env::var("BULWARK_BACKEND_PROBE").ok()?;
            let (name, nr) = spec.split_once(':')?;
            (name == what.name).then_some((20, nr.parse().ok()?))
        })();
        Self {
            at,
            name: what.name.clone(),
            served: 0,
        }
    }

    /// Whether the probe's call comes with the next [`Self::served`].
    fn fires_next(&self) -> bool {
        self.at.is_some_and(|(after, _)| self.served + 1 == after)
    }

    /// One more request served.
    fn served(&mut self) {
        self.served += 1;
        if let Some((after, nr)) = self.at
            && self.served == after
        {
            // A call the policy forbids ends the process here; one it answers (openat: EACCES)
            // is reported and the back-end goes on.
            match bulwark_sandbox::seccomp::forbidden_call(nr) {
                Ok(v) => eprintln!(
                    "bulwark: {} probe: system call {nr} returned {v}",
                    self.name
                ),
                Err(e) => eprintln!(
                    "bulwark: {} probe: system call {nr} failed ({})",
                    self.name,
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
    }
}

/// The next request from the monitor, checked; ends the process at the channel's end or on a
/// message it may not act on. Descriptors attached to it are closed.
fn next_request(channel: &OwnedFd, window: &Window) -> Msg {
    next_request_with_fds(channel, window).0
}

/// [`next_request`] with the descriptors that came with it.
fn next_request_with_fds(channel: &OwnedFd, window: &Window) -> (Msg, Vec<OwnedFd>) {
    let mut buf = [0u8; proto::MSG_LEN + 1];
    match sys::recv(channel.as_fd(), &mut buf) {
        Ok((0, _)) | Err(_) => sys::exit_now(0),
        Ok((n, fds)) => (checked(&buf[..n], window), fds),
    }
}

/// The next request and every further one already waiting, up to `most` in all.
fn next_requests(channel: &OwnedFd, window: &Window, most: usize) -> Vec<Msg> {
    let mut batch = vec![next_request(channel, window)];
    let mut buf = [0u8; proto::MSG_LEN + 1];
    while batch.len() < most {
        match sys::recv_now(channel.as_fd(), &mut buf) {
            Ok((0, _)) => sys::exit_now(0),
            Ok((n, _)) => batch.push(checked(&buf[..n], window)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => sys::exit_now(0),
        }
    }
    batch
}

/// A request decoded and checked against the window; anything else ends the process.
fn checked(raw: &[u8], window: &Window) -> Msg {
    match Msg::decode(raw) {
        Ok(m) if m.check_request(window.len()).is_ok() => m,
        _ => sys::exit_now(EXIT_PROTOCOL),
    }
}

fn reply(channel: &OwnedFd, m: Msg) {
    if sys::send(channel.as_fd(), &m.encode(), &[]).is_err() {
        sys::exit_now(0);
    }
}

/// Sends `replies` (and forgets them) in one go.
fn reply_all(channel: &OwnedFd, replies: &mut Vec<Msg>) {
    let encoded: Vec<_> = replies.iter().map(Msg::encode).collect();
    let each: Vec<&[u8]> = encoded.iter().map(|e| &e[..]).collect();
    if sys::send_many(channel.as_fd(), &each).is_err() {
        sys::exit_now(0);
    }
    replies.clear();
}

fn errno(result: std::io::Result<()>) -> u32 {
    match result {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
    }
}

/// A block back-end: takes every request waiting (the monitor sends a queue notification's
/// worth at once), runs them in order, and answers them together (large transfers at once),
/// so that it and the monitor wake each other once per batch rather than once per request.
fn serve_block(channel: &OwnedFd, window: &Window, disk: &Disk, probe: &mut Probe) -> ! {
    let mut replies = Vec::new();
    loop {
        for m in next_requests(channel, window, proto::MAX_BATCH) {
            let data = || {
                window
                    .slice(m.window, m.len)
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
            };
            let result = match m.op {
                Op::Read => data().and_then(|s| disk.read(m.offset, &[s])),
                Op::Write => data().and_then(|s| disk.write(m.offset, &[s])),
                Op::Flush => disk.flush(),
                Op::Discard => disk.punch(Punch::Discard, m.offset, m.len),
                Op::WriteZeroes if m.arg & ZEROES_MAY_UNMAP != 0 => {
                    disk.punch(Punch::ZeroUnmap, m.offset, m.len)
                }
                Op::WriteZeroes => disk.punch(Punch::Zero, m.offset, m.len),
                _ => sys::exit_now(EXIT_PROTOCOL),
            };
            replies.push(Msg::done(m.id, errno(result)));
            // A large transfer is answered at once: the monitor can copy it out while this
            // goes on with the next. What was done before the probe's call is answered, as it
            // would be had the back-end died of something else there.
            if m.len >= proto::STREAM_PIECE || probe.fires_next() {
                reply_all(channel, &mut replies);
            }
            probe.served();
        }
        reply_all(channel, &mut replies);
    }
}

/// A network back-end: frames to the tap as the monitor sends them; frames from the tap into
/// the receive slots the monitor posted, one frame per slot, and only while it has one (frames
/// wait in the tap otherwise, as they do for a guest that posts no buffers).
fn serve_net(channel: &OwnedFd, window: &Window, tap: &OwnedFd, probe: &mut Probe) -> ! {
    let mut slots: VecDeque<(u64, u64, u64)> = VecDeque::new();
    loop {
        let mut fds = vec![(channel.as_fd(), libc::POLLIN)];
        if !slots.is_empty() {
            fds.push((tap.as_fd(), libc::POLLIN));
        }
        let Ok(ready) = sys::wait_events(&fds) else {
            sys::exit_now(EXIT_SETUP)
        };
        if ready[0] != 0 {
            let m = next_request(channel, window);
            match m.op {
                Op::Transmit => {
                    let result = window
                        .slice(m.window, m.len)
                        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
                        .and_then(|s| sys::write_from(tap.as_fd(), &s))
                        .map(drop);
                    reply(channel, Msg::done(m.id, errno(result)));
                    probe.served();
                }
                Op::RxPost => slots.push_back((m.id, m.window, m.len)),
                Op::SetOffload => {
                    let result = sys::tap_set_offload(tap.as_fd(), m.arg);
                    reply(channel, Msg::done(m.id, errno(result)));
                }
                _ => sys::exit_now(EXIT_PROTOCOL),
            }
        }
        if ready.get(1).is_some_and(|&r| r != 0)
            && let Some(&(id, at, len)) = slots.front()
        {
            let Some(slot) = window.slice(at, len) else {
                sys::exit_now(EXIT_PROTOCOL)
            };
            match sys::read_into(tap.as_fd(), &slot) {
                Ok(n) if n > 0 => {
                    slots.pop_front();
                    reply(
                        channel,
                        Msg {
                            len: n as u64,
                            ..Msg::new(Op::Received, id)
                        },
                    );
                    probe.served();
                }
                // Nothing after all (another reader, a spurious wake-up), or the tap failed:
                // try again at the next wake-up.
                _ => {}
            }
        }
    }
}

/// Most streams a vsock back-end holds (more than the device ever opens).
const MAX_STREAMS: usize = 4096;

/// One host stream of a vsock back-end: its descriptor and what it is watched for.
struct Stream {
    fd: OwnedFd,
    watch: u32,
}

/// A vsock back-end: the host's ends of the device's streams, which the monitor accepted or
/// connected and handed over. It moves bytes between them and the window as asked, and says
/// once when a watched stream becomes ready. It never sees a packet header, a credit, a port or
/// a path, and opens nothing itself.
fn serve_vsock(channel: &OwnedFd, window: &Window, probe: &mut Probe) -> ! {
    let mut streams: BTreeMap<u64, Stream> = BTreeMap::new();
    loop {
        // The channel, then every watched stream; what each watched stream is ready for.
        let (request, ready) = {
            let watched: Vec<(&u64, &Stream)> =
                streams.iter().filter(|(_, s)| s.watch != 0).collect();
            let mut fds = vec![(channel.as_fd(), libc::POLLIN)];
            fds.extend(
                watched
                    .iter()
                    .map(|(_, s)| (s.fd.as_fd(), poll_events(s.watch))),
            );
            let Ok(revents) = sys::wait_events(&fds) else {
                sys::exit_now(EXIT_SETUP)
            };
            let ready: Vec<(u64, u32)> = watched
                .iter()
                .zip(&revents[1..])
                .filter(|(_, r)| **r != 0)
                .map(|(&(&conn, s), &r)| {
                    let bits = ready_bits(r) & s.watch;
                    (conn, if bits == 0 { s.watch } else { bits })
                })
                .collect();
            (revents[0] != 0, ready)
        };
        for (conn, ready) in ready {
            // The watch is spent.
            if let Some(s) = streams.get_mut(&conn) {
                s.watch = 0;
            }
            reply(
                channel,
                Msg {
                    offset: conn,
                    arg: ready,
                    ..Msg::new(Op::SockReady, 0)
                },
            );
        }
        if request {
            let (m, fds) = next_request_with_fds(channel, window);
            serve_stream_request(channel, window, &mut streams, m, fds, probe);
        }
    }
}

fn serve_stream_request(
    channel: &OwnedFd,
    window: &Window,
    streams: &mut BTreeMap<u64, Stream>,
    m: Msg,
    fds: Vec<OwnedFd>,
    probe: &mut Probe,
) {
    let conn = m.offset;
    if m.op == Op::SockAdopt {
        let Ok([fd]) = <[OwnedFd; 1]>::try_from(fds) else {
            sys::exit_now(EXIT_PROTOCOL)
        };
        if streams.contains_key(&conn) || streams.len() >= MAX_STREAMS {
            sys::exit_now(EXIT_PROTOCOL);
        }
        streams.insert(conn, Stream { fd, watch: 0 });
        return reply(channel, Msg::done(m.id, 0));
    }
    let Some(stream) = streams.get_mut(&conn) else {
        return reply(channel, Msg::done(m.id, libc::EBADF as u32));
    };
    let fd = stream.fd.as_fd();
    let moved = |r: std::io::Result<usize>| match r {
        Ok(n) => Msg {
            len: n as u64,
            ..Msg::done(m.id, 0)
        },
        Err(e) => Msg::done(m.id, errno(Err(e))),
    };
    let slice = || {
        window
            .slice(m.window, m.len)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let answer = match m.op {
        Op::SockSend => moved(slice().and_then(|s| sys::write_from(fd, &s))),
        Op::SockRecv => {
            let r = slice().and_then(|s| sys::read_into(fd, &s));
            if m.arg & SOCK_READABLE != 0 && Msg::recv_armed(m.len, &r) {
                stream.watch |= SOCK_READABLE;
            }
            moved(r)
        }
        Op::SockShutdown => Msg::done(m.id, errno(sys::shutdown_write(fd))),
        Op::SockWatch => {
            stream.watch = m.arg;
            Msg::done(m.id, 0)
        }
        Op::SockClose => {
            streams.remove(&conn);
            Msg::done(m.id, 0)
        }
        _ => sys::exit_now(EXIT_PROTOCOL),
    };
    reply(channel, answer);
    if matches!(m.op, Op::SockSend | Op::SockRecv) {
        probe.served();
    }
}

fn poll_events(watch: u32) -> i16 {
    let mut ev = 0;
    if watch & SOCK_READABLE != 0 {
        ev |= libc::POLLIN;
    }
    if watch & SOCK_WRITABLE != 0 {
        ev |= libc::POLLOUT;
    }
    ev
}

/// What poll's `revents` mean for the monitor: a hang-up or an error is news for a reader and a
/// writer alike (the next read or write says which).
fn ready_bits(revents: i16) -> u32 {
    let mut bits = 0;
    if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
        bits |= SOCK_READABLE;
    }
    if revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
        bits |= SOCK_WRITABLE;
    }
    bits
}
