//! A back-end process: confine itself, say hello, serve requests until the monitor closes the
//! channel. Anything unexpected ends the process; the monitor sees the channel close and starts
//! another.

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
    match what.kind {
        Kind::Block => {
            let disk = Disk::new(File::from(resource), what.flags & FLAG_DIRECT != 0);
            serve_block(&channel, &window, &disk, what)
        }
    }
}

/// Test-only hook (debug builds): `BULWARK_BACKEND_PROBE=<name>:<nr>` makes the first
/// incarnation of back-end `<name>` call system call `<nr>` after 20 requests.
fn probe(what: &Spawn) -> Option<(u64, i64)> {
    if !cfg!(debug_assertions) || what.incarnation != 0 {
        return None;
    }
    let spec = std::env::var("BULWARK_BACKEND_PROBE").ok()?;
    let (name, nr) = spec.split_once(':')?;
    (name == what.name).then_some((20, nr.parse().ok()?))
}

fn serve_block(channel: &OwnedFd, window: &Window, disk: &Disk, what: &Spawn) -> ! {
    let probe = probe(what);
    let mut served = 0u64;
    let mut buf = [0u8; proto::MSG_LEN + 1];
    loop {
        let n = match sys::recv(channel.as_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => sys::exit_now(0),
            Ok((n, _)) => n,
        };
        let Ok(m) = Msg::decode(&buf[..n]) else {
            sys::exit_now(EXIT_PROTOCOL)
        };
        if m.check_request(window.len()).is_err() {
            sys::exit_now(EXIT_PROTOCOL);
        }
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
            Op::Hello | Op::Done => sys::exit_now(EXIT_PROTOCOL),
        };
        let errno = match result {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO) as u32,
        };
        if sys::send(channel.as_fd(), &Msg::done(m.id, errno).encode(), &[]).is_err() {
            sys::exit_now(0);
        }
        served += 1;
        if let Some((after, nr)) = probe
            && served == after
        {
            // A call the policy forbids ends the process here; one it answers (openat: EACCES)
            // is reported and the back-end goes on.
            match bulwark_sandbox::seccomp::forbidden_call(nr) {
                Ok(v) => eprintln!(
                    "bulwark: {} probe: system call {nr} returned {v}",
                    what.name
                ),
                Err(e) => eprintln!(
                    "bulwark: {} probe: system call {nr} failed ({})",
                    what.name,
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
    }
}
