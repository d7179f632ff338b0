//! A back-end process: confine itself, say hello, serve requests until the monitor closes the
//! channel. Anything unexpected ends the process; the monitor sees the channel close and starts
//! another.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::disk::{Disk, Punch};
use crate::launcher::{FLAG_DIRECT, Spawn};
use crate::proto::{Msg, Op, ZEROES_MAY_UNMAP};
use crate::sys;
use crate::window::Window;
use crate::{Kind, proto};

/// Exit status of a back-end that met a message it cannot act on.
const EXIT_PROTOCOL: i32 = 3;
/// Exit status of a back-end that could not set itself up.
const EXIT_SETUP: i32 = 4;

pub(crate) fn run(what: &Spawn, [channel, window, resource]: [OwnedFd; 3]) -> ! {
    sys::set_name(&format!("bw-{}", what.name));
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
    match what.kind {
        Kind::Block => {
            let disk = Disk::new(File::from(resource), what.flags & FLAG_DIRECT != 0);
            serve_block(&channel, &window, &disk, &mut probe)
        }
        Kind::Net => serve_net(&channel, &window, &resource, &mut probe),
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
/// message it may not act on.
fn next_request(channel: &OwnedFd, window: &Window) -> Msg {
    let mut buf = [0u8; proto::MSG_LEN + 1];
    let n = match sys::recv(channel.as_fd(), &mut buf) {
        Ok((0, _)) | Err(_) => sys::exit_now(0),
        Ok((n, _)) => n,
    };
    match Msg::decode(&buf[..n]) {
        Ok(m) if m.check_request(window.len()).is_ok() => m,
        _ => sys::exit_now(EXIT_PROTOCOL),
    }
}

fn reply(channel: &OwnedFd, m: Msg) {
    if sys::send(channel.as_fd(), &m.encode(), &[]).is_err() {
        sys::exit_now(0);
    }
}

fn errno(result: std::io::Result<()>) -> u32 {
    match result {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
    }
}

fn serve_block(channel: &OwnedFd, window: &Window, disk: &Disk, probe: &mut Probe) -> ! {
    loop {
        let m = next_request(channel, window);
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
        reply(channel, Msg::done(m.id, errno(result)));
        probe.served();
    }
}

/// A network back-end: frames to the tap as the monitor sends them; frames from the tap into
/// the receive slots the monitor posted, one frame per slot, and only while it has one (frames
/// wait in the tap otherwise, as they do for a guest that posts no buffers).
fn serve_net(channel: &OwnedFd, window: &Window, tap: &OwnedFd, probe: &mut Probe) -> ! {
    let mut slots: VecDeque<(u64, u64, u64)> = VecDeque::new();
    loop {
        let watch_tap = (!slots.is_empty()).then(|| tap.as_fd());
        let Ok(ready) = sys::wait_any(&[Some(channel.as_fd()), watch_tap]) else {
            sys::exit_now(EXIT_SETUP)
        };
        if ready[0] {
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
        if ready.get(1).copied().unwrap_or(false)
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
