//! Where the host ends of vsock's streams live: in a back-end process that never sees guest
//! memory (`backend=process`, [`RemoteSockets`]), or in the device's thread
//! (`backend=inline`). The device names a stream by its token either way and learns what a
//! stream is ready for as [`News`].

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use bulwark_backends::client::BackEndStats;
use bulwark_backends::sockets::{RemoteSockets, SockEvent};
use vmm_sys_util::epoll::EventSet;

use super::super::DeviceEvents;

/// What happened to a host stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum News {
    /// It is ready as the event set says (watched for it).
    Ready(u64, EventSet),
    /// It is gone (its back-end died).
    Lost(u64),
}

#[derive(Debug)]
enum Held {
    Inline(HashMap<u64, UnixStream>),
    Process {
        remote: Box<RemoteSockets>,
        /// The back-end channel registered in the event set, and its incarnation.
        watching: Option<(RawFd, u32)>,
    },
}

/// The host streams of one vsock device.
#[derive(Debug)]
pub(super) struct HostStreams {
    held: Held,
    events: DeviceEvents,
    /// The token the back-end's channel is watched with.
    channel_token: u64,
    /// What each stream is watched for now.
    interest: HashMap<u64, EventSet>,
}

fn gone() -> io::Error {
    io::Error::from(io::ErrorKind::ConnectionReset)
}

impl HostStreams {
    /// Streams kept in this process, watched in `events`.
    pub(super) fn inline(events: DeviceEvents) -> Self {
        Self {
            held: Held::Inline(HashMap::new()),
            events,
            channel_token: 0,
            interest: HashMap::new(),
        }
    }

    /// Streams held by a back-end, whose channel is watched in `events` as `channel_token`.
    pub(super) fn process(remote: RemoteSockets, events: DeviceEvents, channel_token: u64) -> Self {
        let mut h = Self {
            held: Held::Process {
                remote: Box::new(remote),
                watching: None,
            },
            events,
            channel_token,
            interest: HashMap::new(),
        };
        h.sync_channel();
        h
    }

    pub(super) fn backend_stats(&self) -> Option<&BackEndStats> {
        match &self.held {
            Held::Process { remote, .. } => Some(remote.stats()),
            Held::Inline(_) => None,
        }
    }

    /// Takes `stream` (connected, non-blocking) as `token`.
    pub(super) fn adopt(&mut self, token: u64, stream: UnixStream) -> io::Result<()> {
        match &mut self.held {
            Held::Inline(streams) => {
                streams.insert(token, stream);
                Ok(())
            }
            Held::Process { remote, .. } => remote.adopt(token, OwnedFd::from(stream)),
        }
    }

    pub(super) fn read(&mut self, token: u64, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.held {
            Held::Inline(streams) => streams.get_mut(&token).ok_or_else(gone)?.read(buf),
            Held::Process { remote, .. } => {
                let (r, armed) = remote.recv(token, buf);
                if armed {
                    // The back-end watches it for readability now (and for what it watched
                    // it for besides).
                    let now = self.interest.entry(token).or_insert(EventSet::empty());
                    *now |= EventSet::IN;
                }
                r
            }
        }
    }

    pub(super) fn write(&mut self, token: u64, buf: &[u8]) -> io::Result<usize> {
        match &mut self.held {
            Held::Inline(streams) => streams.get_mut(&token).ok_or_else(gone)?.write(buf),
            Held::Process { remote, .. } => remote.send(token, buf),
        }
    }

    /// Tells the host peer the guest sends no more (a failure shows on the next read).
    pub(super) fn shutdown_write(&mut self, token: u64) {
        let _ = match &mut self.held {
            Held::Inline(streams) => streams
                .get(&token)
                .map_or(Ok(()), |s| s.shutdown(std::net::Shutdown::Write)),
            Held::Process { remote, .. } => remote.shutdown_write(token),
        };
    }

    pub(super) fn close(&mut self, token: u64) {
        let watched = self.interest.remove(&token).is_some();
        match &mut self.held {
            Held::Inline(streams) => {
                if let Some(s) = streams.remove(&token)
                    && watched
                {
                    let _ = self.events.remove(s.as_raw_fd());
                }
            }
            Held::Process { remote, .. } => remote.close(token),
        }
    }

    /// Watches stream `token` for `want` (nothing: not at all). A back-end's watch is spent by
    /// the news it gives, so it is sent again only when the device still wants it.
    pub(super) fn watch(&mut self, token: u64, want: EventSet) {
        let now = self
            .interest
            .get(&token)
            .copied()
            .unwrap_or(EventSet::empty());
        if want == now {
            return;
        }
        let r = match &mut self.held {
            Held::Inline(streams) => {
                let Some(fd) = streams.get(&token).map(AsRawFd::as_raw_fd) else {
                    return;
                };
                if now.is_empty() {
                    self.events.add(fd, token, want)
                } else if want.is_empty() {
                    self.events.remove(fd)
                } else {
                    self.events.modify(fd, token, want)
                }
            }
            Held::Process { remote, .. } => remote.watch(
                token,
                want.contains(EventSet::IN),
                want.contains(EventSet::OUT),
            ),
        };
        if r.is_ok() {
            if want.is_empty() {
                self.interest.remove(&token);
            } else {
                self.interest.insert(token, want);
            }
        }
    }

    /// Whether `token` is the back-end channel's.
    pub(super) fn is_channel(&self, token: u64) -> bool {
        matches!(self.held, Held::Process { .. }) && token == self.channel_token
    }

    /// What the back-end reported since the last call (nothing for inline streams, whose
    /// readiness comes straight from the event set).
    pub(super) fn news(&mut self) -> Vec<News> {
        let Held::Process { remote, .. } = &mut self.held else {
            return Vec::new();
        };
        let news: Vec<News> = remote
            .events()
            .into_iter()
            .map(|e| match e {
                SockEvent::Ready {
                    conn,
                    readable,
                    writable,
                } => {
                    let mut ev = EventSet::empty();
                    if readable {
                        ev |= EventSet::IN;
                    }
                    if writable {
                        ev |= EventSet::OUT;
                    }
                    News::Ready(conn, ev)
                }
                SockEvent::Lost(conn) => News::Lost(conn),
            })
            .collect();
        for n in &news {
            // The watch is spent (or the stream gone).
            let (News::Ready(t, _) | News::Lost(t)) = *n;
            self.interest.remove(&t);
        }
        self.sync_channel();
        news
    }

    /// Keeps the live back-end's channel (a restarted one's is new) in the event set.
    pub(super) fn sync_channel(&mut self) {
        let Held::Process { remote, watching } = &mut self.held else {
            return;
        };
        let want = remote.channel_fd();
        if want == *watching {
            return;
        }
        if let Some((old, _)) = watching.take() {
            // Fails harmlessly when the descriptor was closed with its back-end.
            let _ = self.events.remove(old);
        }
        if let Some((fd, incarnation)) = want
            && self
                .events
                .add(fd, self.channel_token, EventSet::IN)
                .is_ok()
        {
            *watching = Some((fd, incarnation));
        }
    }
}
