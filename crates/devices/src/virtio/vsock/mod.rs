//! virtio-vsock in user space, with the host side on unix sockets in the convention
//! Firecracker documents, so tools written for it work unchanged:
//!
//! - **host → guest**: connect to the device's socket and write `CONNECT <port>\n`; once the
//!   guest accepts, the device answers `OK <host port>\n` and the stream carries the data.
//!   A refused connection is closed without an answer.
//! - **guest → host**: a guest connecting to CID 2 port `P` reaches a unix socket listening at
//!   `<socket>_P`; if nothing listens there the guest gets a reset.
//!
//! Every packet header is guest-controlled: [`Header::parse`] reads it, and the device checks
//! addresses (the guest's CID to the host's), the socket type, lengths, and the credit the
//! guest claims, answering violations with a reset of that connection. Flow control is virtio's
//! credit scheme: each side advertises its receive buffer and how much it has consumed, and
//! the device reads from a host socket only what the guest has room for, and stops watching a
//! socket it cannot move data for (so a stalled peer costs nothing).
//!
//! The device's thread accepts host clients and connects to host listeners; each stream is then
//! held by a back-end process that never sees guest memory (`backend=process`, the default) or
//! by this thread (`backend=inline`), see [`host`]. A back-end that dies takes its streams
//! with it: the guest gets a reset for each of those connections, and the next ones go through
//! a new back-end.

#[doc(hidden)]
pub mod guest;
mod host;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::chain::{self, Streams, read_stream, stream_len, sub_stream, write_stream};
use super::{
    ActivateError, DeviceEvents, DeviceStats, HOST_TOKEN_BASE, Interrupt, Isolation, VirtioDevice,
    interrupt_if_wanted, serve_device_queue,
};
use bulwark_backends::client::BackEnd;
use bulwark_backends::sockets::{RemoteSockets, SOCK_WINDOW};
use host::{HostStreams, News};

/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Size of a packet header.
pub const HEADER_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
/// Receive buffer the device advertises per connection (bytes the guest may have in flight).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload the device accepts in one packet, or reads from a host socket at once.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Most simultaneous connections; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most packets without payload (responses, resets, credit updates) held for a guest that posts
/// no receive buffers; past it new ones are dropped, as a guest that does not receive loses
/// them. Without a bound, a guest sending packets that each earn a reply grows the queue
/// without end.
pub const MAX_PENDING_CONTROL: usize = 4 * MAX_CONNECTIONS;
/// Host-side ports for host-initiated connections count up from here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const LISTENER_TOKEN: u64 = HOST_TOKEN_BASE;
/// The back-end's channel (`backend=process`).
const CHANNEL_TOKEN: u64 = HOST_TOKEN_BASE + 1;
/// The event queue's one event: the transport was reset (all connections are gone).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Packet operations.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

/// A virtio-vsock packet header (all fields little-endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// How the device is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The host-side unix socket the device listens on.
    pub socket: PathBuf,
    /// Who holds the host streams.
    pub isolation: Isolation,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is invalid: use a number from 3 to 4294967294")]
    BadCid(u64),
    #[error(
        "vsock socket {0} already exists; remove it (a stale socket from an old VM?) or pick another path"
    )]
    SocketExists(PathBuf),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot watch the vsock socket: {0}")]
    Events(io::Error),
    #[error(
        "vsock: cannot start its back-end process: {0}; attach it with backend=inline to serve it in the monitor (less isolated)"
    )]
    BackEnd(String),
}

/// What a [`Vsock`] holds on behalf of its peers; each field is bounded whatever they do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockUsage {
    /// Connections, established or waiting for the guest (at most [`MAX_CONNECTIONS`]).
    pub connections: usize,
    /// Host clients that have not finished their `CONNECT` line.
    pub handshakes: usize,
    /// Packets without payload waiting for guest receive buffers (at most
    /// [`MAX_PENDING_CONTROL`]).
    pub pending_control: usize,
    /// Largest backlog of guest data for one host stream (at most [`BUF_ALLOC`]).
    pub max_to_host: usize,
    /// Largest backlog of host data for the guest on one connection (at most [`MAX_PAYLOAD`]).
    pub max_from_host: usize,
}

/// One stream connection: guest port ↔ host port, with its unix stream on the host side (held
/// in [`HostStreams`] under `token`).
#[derive(Debug)]
struct Conn {
    token: u64,
    /// False while a host-initiated connection waits for the guest's answer.
    established: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    rx_cnt: u32,
    /// Payload bytes from the guest written to the host socket.
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    fwd_cnt_told: u32,
    /// Guest data the host socket has not taken yet (bounded by `BUF_ALLOC`).
    to_host: VecDeque<u8>,
    /// Host data read but not yet placed in guest buffers.
    from_host: Vec<u8>,
    /// The host closed its side: a SHUTDOWN goes to the guest once `from_host` is delivered.
    host_eof: bool,
    shutdown_sent: bool,
    /// The guest closed: reset once `to_host` is flushed.
    guest_closed: bool,
    /// The guest will send no more: shut the host stream's write side once flushed.
    guest_send_done: bool,
    /// The host stream had nothing to read at the last try: it is read again only once it is
    /// reported readable (with a back-end every read is a round trip, and the device tries
    /// every connection whenever it fills receive buffers).
    host_quiet: bool,
}

impl Conn {
    fn new(token: u64, established: bool) -> Self {
        Self {
            token,
            established,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: VecDeque::new(),
            from_host: Vec::new(),
            host_eof: false,
            shutdown_sent: false,
            guest_closed: false,
            guest_send_done: false,
            host_quiet: false,
        }
    }

    /// Bytes the guest can still take on this connection.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        // Readiness is news only for a stream that came up empty at the last read; any other
        // is read again whenever the device fills receive buffers.
        if self.established && !self.host_eof && self.host_quiet && self.credit() > 0 {
            e |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Writes what the host stream takes now.
    fn flush_to_host(&mut self, host: &mut HostStreams) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match host.write(self.token, a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What a host file-descriptor token stands for.
#[derive(Debug)]
enum TokenUse {
    /// A host client that has not finished its `CONNECT` line: what it sent so far.
    Handshake(Vec<u8>),
    /// An established or connecting stream: (guest port, host port).
    Conn(u32, u32),
}

#[derive(Debug, Default)]
struct Active {
    mem: Option<GuestMemoryMmap>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    event: Option<Queue>,
    interrupt: Option<Interrupt>,
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    events: DeviceEvents,
    host: HostStreams,
    conns: HashMap<(u32, u32), Conn>,
    tokens: HashMap<u64, TokenUse>,
    next_token: u64,
    next_host_port: u32,
    /// Packets without payload waiting for guest receive buffers.
    control: VecDeque<Header>,
    active: Active,
    stats: Arc<DeviceStats>,
    /// After a restore: the transport reset was posted and the guest has not yet put a new
    /// event buffer back (which it does once it has dropped its connections). Host clients
    /// wait in the listener's backlog meanwhile, so none is caught by the reset.
    reset_pending: bool,
}

impl Vsock {
    /// Binds the host socket and starts watching it in `events`; with
    /// [`Isolation::Process`], starts the back-end that will hold the host streams.
    pub fn new(cfg: &VsockConfig, events: DeviceEvents) -> Result<Self, VsockError> {
        if cfg.cid < 3 || cfg.cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cfg.cid));
        }
        if cfg.socket.symlink_metadata().is_ok() {
            return Err(VsockError::SocketExists(cfg.socket.clone()));
        }
        let listener = UnixListener::bind(&cfg.socket).map_err(|source| VsockError::Bind {
            path: cfg.socket.clone(),
            source,
        })?;
        let bind_err = |source| VsockError::Bind {
            path: cfg.socket.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let host = match cfg.isolation {
            Isolation::Inline => HostStreams::inline(events.clone()),
            Isolation::Process => {
                let backend = BackEnd::start_here(
                    bulwark_backends::Kind::Vsock,
                    "vsock",
                    0,
                    None,
                    SOCK_WINDOW,
                )
                .map_err(|e| {
                    let _ = std::fs::remove_file(&cfg.socket);
                    VsockError::BackEnd(e.to_string())
                })?;
                HostStreams::process(RemoteSockets::new(backend), events.clone(), CHANNEL_TOKEN)
            }
        };
        events
            .add(listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)
            .map_err(VsockError::Events)?;
        Ok(Self {
            cid: cfg.cid,
            socket: cfg.socket.clone(),
            listener,
            events,
            host,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: CHANNEL_TOKEN + 1,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            active: Active::default(),
            reset_pending: false,
            stats: Arc::default(),
        })
    }

    /// The host socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the device holds right now (for diagnostics and the fuzz harness's bounds).
    pub fn usage(&self) -> VsockUsage {
        VsockUsage {
            connections: self.conns.len(),
            // Each connection holds one token; the other tokens are clients handshaking.
            handshakes: self.tokens.len().saturating_sub(self.conns.len()),
            pending_control: self.control.len(),
            max_to_host: self
                .conns
                .values()
                .map(|c| c.to_host.len())
                .max()
                .unwrap_or(0),
            max_from_host: self
                .conns
                .values()
                .map(|c| c.from_host.len())
                .max()
                .unwrap_or(0),
        }
    }

    fn is_active(&self) -> bool {
        self.active.mem.is_some()
    }

    /// A header from the host to the guest on connection (guest port, host port).
    fn header(&self, key: (u32, u32), op: u16, flags: u32) -> Header {
        let fwd = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.1,
            dst_port: key.0,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: fwd,
        }
    }

    fn send_control(&mut self, h: Header) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            tracing::debug!(op = h.op, "vsock control queue full; packet dropped");
            return;
        }
        if let Some(c) = self.conns.get_mut(&(h.dst_port, h.src_port)) {
            c.fwd_cnt_told = h.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn reset_packet(&self, to: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn remove_conn(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.remove(&key) {
            self.host.close(c.token);
            self.tokens.remove(&c.token);
        }
    }

    /// Makes what the host stream of `key` is watched for match what it can make progress on.
    fn sync_interest(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.get(&key) {
            self.host.watch(c.token, c.wanted_interest());
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Every token is a connection or a client still handshaking.
                    if !self.is_active() || self.tokens.len() >= MAX_CONNECTIONS {
                        continue; // dropped: the client sees the connection close
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    if let Err(e) = self.host.adopt(token, stream) {
                        tracing::debug!(error = %e, "vsock: a host client was dropped");
                        continue;
                    }
                    self.tokens.insert(token, TokenUse::Handshake(Vec::new()));
                    self.host.watch(token, EventSet::IN);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n`; then asks the guest to accept. Bytes the
    /// client sent after the line wait for the guest with the connection.
    fn continue_handshake(&mut self, token: u64) {
        let Some(TokenUse::Handshake(mut line)) = self.tokens.remove(&token) else {
            return;
        };
        let newline = loop {
            let mut chunk = [0u8; MAX_HANDSHAKE + 1];
            let room = MAX_HANDSHAKE + 1 - line.len();
            match self.host.read(token, &mut chunk[..room]) {
                Ok(n) if n > 0 => {
                    line.extend_from_slice(&chunk[..n]);
                    if let Some(at) = line.iter().position(|&b| b == b'\n') {
                        break at;
                    }
                    if line.len() > MAX_HANDSHAKE {
                        self.host.close(token); // an overlong line
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tokens.insert(token, TokenUse::Handshake(line));
                    self.host.watch(token, EventSet::IN);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EOF or an error: drop the client.
                _ => {
                    self.host.close(token);
                    return;
                }
            }
        };
        let early = line.split_off(newline + 1);
        line.truncate(newline);
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        self.host.watch(token, EventSet::empty());
        let Some(port) = port else {
            let _ = self.host.write(token, b"ERROR bad CONNECT line\n");
            self.host.close(token);
            return;
        };
        let host_port = self.next_host_port;
        self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (port, host_port);
        // The guest may have taken the last connections while this client handshook.
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.host.close(token);
            return;
        }
        self.tokens.insert(token, TokenUse::Conn(port, host_port));
        let mut c = Conn::new(token, false);
        c.from_host = early;
        self.conns.insert(key, c);
        let h = self.header(key, op::REQUEST, 0);
        self.send_control(h);
        self.sync_interest(key);
    }

    /// One packet from the guest's transmit queue.
    fn handle_tx(&mut self, h: Header, payload: &[u8]) {
        let key = (h.src_port, h.dst_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            DeviceStats::add(&self.stats.bad_requests, 1);
            if h.op != op::RST {
                let r = self.reset_packet(&h);
                self.send_control(r);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => self.guest_connect(h),
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if !c.established => {
                    c.established = true;
                    let ok = format!("OK {}\n", key.1);
                    // The stream is new and empty: its buffer takes the line whole.
                    if !matches!(self.host.write(c.token, ok.as_bytes()), Ok(n) if n == ok.len()) {
                        self.remove_conn(key);
                        let r = self.reset_packet(&h);
                        self.send_control(r);
                    }
                }
                _ => {
                    let r = self.reset_packet(&h);
                    self.send_control(r);
                }
            },
            op::RW => self.guest_data(h, key, payload),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    let u = self.header(key, op::CREDIT_UPDATE, 0);
                    self.send_control(u);
                }
            }
            op::SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&key) {
                    if h.flags & SHUTDOWN_SEND != 0 && h.flags & SHUTDOWN_RCV != 0 {
                        c.guest_closed = true;
                    } else if h.flags & SHUTDOWN_SEND != 0 {
                        c.guest_send_done = true;
                    }
                }
            }
            op::RST => self.remove_conn(key),
            _ => {
                DeviceStats::add(&self.stats.bad_requests, 1);
                let r = self.reset_packet(&h);
                self.remove_conn(key);
                self.send_control(r);
            }
        }
        self.after_host_io(key);
    }

    /// The guest connects to host port `dst_port`: the unix socket `<socket>_<port>`.
    fn guest_connect(&mut self, h: Header) {
        let key = (h.src_port, h.dst_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            let r = self.reset_packet(&h);
            self.send_control(r);
            return;
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        // Never block the device thread: a listener that does not accept (a full backlog)
        // refuses this connection instead of stalling every other one.
        let token = self.new_token();
        let connected = crate::sys::unix_connect_nonblocking(std::path::Path::new(&path))
            .and_then(|stream| self.host.adopt(token, stream));
        match connected {
            Ok(()) => {
                let mut c = Conn::new(token, true);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.tokens.insert(token, TokenUse::Conn(key.0, key.1));
                self.conns.insert(key, c);
                let resp = self.header(key, op::RESPONSE, 0);
                self.send_control(resp);
            }
            Err(e) => {
                tracing::debug!(port = h.dst_port, error = %e, "guest vsock connect refused");
                let r = self.reset_packet(&h);
                self.send_control(r);
            }
        }
    }

    fn guest_data(&mut self, h: Header, key: (u32, u32), payload: &[u8]) {
        let ok = match self.conns.get_mut(&key) {
            Some(c) if c.established && !c.guest_closed => {
                // The guest may not exceed the buffer we advertised.
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    false
                } else {
                    c.to_host.extend(payload);
                    DeviceStats::add(&self.stats.bytes_out, payload.len() as u64);
                    true
                }
            }
            _ => false,
        };
        if !ok {
            DeviceStats::add(&self.stats.bad_requests, 1);
            self.remove_conn(key);
            let r = self.reset_packet(&h);
            self.send_control(r);
        }
    }

    /// Moves guest data to the host socket and tells the guest about freed buffer space.
    fn after_host_io(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.flush_to_host(&mut self.host).is_err() {
            let h = self.header(key, op::RST, 0);
            self.remove_conn(key);
            self.send_control(h);
            return;
        }
        if c.guest_send_done && c.to_host.is_empty() {
            self.host.shutdown_write(c.token);
        }
        if c.guest_closed && c.to_host.is_empty() {
            let h = self.header(key, op::RST, 0);
            self.remove_conn(key);
            self.send_control(h);
            return;
        }
        let unreported = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told);
        if unreported > 0 && (unreported >= BUF_ALLOC / 4 || c.to_host.is_empty()) {
            let u = self.header(key, op::CREDIT_UPDATE, 0);
            self.send_control(u);
        }
        self.sync_interest(key);
    }

    /// A host stream is readable: take what the guest has room for.
    fn read_host(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if !c.established || c.host_eof || c.host_quiet || !c.from_host.is_empty() {
            return;
        }
        let want = c.credit().min(MAX_PAYLOAD) as usize;
        if want == 0 {
            return;
        }
        c.from_host.resize(want, 0);
        loop {
            match self.host.read(c.token, &mut c.from_host) {
                Ok(0) => {
                    c.from_host.clear();
                    c.host_eof = true;
                    break;
                }
                Ok(n) => {
                    // A stream read returns what is there, up to the size asked: a short read
                    // emptied it.
                    c.from_host.truncate(n);
                    c.host_quiet = n < want;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.from_host.clear();
                    c.host_quiet = true;
                    break;
                }
                Err(_) => {
                    c.from_host.clear();
                    c.host_eof = true;
                    break;
                }
            }
        }
    }

    /// Fills guest receive buffers: control packets first, then each connection's data and,
    /// after its data, its shutdown. Returns whether any buffer was used.
    fn deliver(&mut self) -> bool {
        let mut active = std::mem::take(&mut self.active);
        let used = match &mut active {
            Active {
                mem: Some(mem),
                rx: Some(rx),
                ..
            } => self.fill_rx(mem, rx),
            _ => false,
        };
        if used
            && let Active {
                mem: Some(mem),
                rx: Some(rx),
                interrupt: Some(irq),
                ..
            } = &mut active
        {
            interrupt_if_wanted(rx, mem, irq);
        }
        self.active = active;
        used
    }

    fn fill_rx(&mut self, mem: &GuestMemoryMmap, rx: &mut Queue) -> bool {
        let mut used = false;
        // Control packets.
        while let Some(h) = self.control.front().copied() {
            let Some(buf) = pop_rx(mem, rx) else {
                return used;
            };
            used = true;
            if complete_rx(mem, rx, buf, Some(h), &[]) {
                self.control.pop_front();
            } else {
                DeviceStats::add(&self.stats.bad_requests, 1);
            }
        }
        // Connection data, then (after all of it) the connection's shutdown.
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            loop {
                self.read_host(key);
                let Some(c) = self.conns.get(&key) else { break };
                let shutdown_due = c.host_eof && !c.shutdown_sent;
                // Bytes a host client sent with its CONNECT line wait for the guest's answer.
                if !c.established || (c.from_host.is_empty() && !shutdown_due) {
                    break;
                }
                let Some(buf) = pop_rx(mem, rx) else {
                    return used;
                };
                used = true;
                if c.from_host.is_empty() {
                    // EOF on the host stream says the host will send no more; it may still
                    // read (a half-close), and a write to a fully closed stream resets.
                    let h = self.header(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    if complete_rx(mem, rx, buf, Some(h), &[])
                        && let Some(c) = self.conns.get_mut(&key)
                    {
                        c.shutdown_sent = true;
                    }
                    continue;
                }
                let n = c.from_host.len().min(buf.room());
                if n == 0 {
                    DeviceStats::add(&self.stats.bad_requests, 1);
                    complete_rx(mem, rx, buf, None, &[]);
                    continue;
                }
                let mut h = self.header(key, op::RW, 0);
                h.len = n as u32;
                if complete_rx(mem, rx, buf, Some(h), &c.from_host[..n]) {
                    DeviceStats::add(&self.stats.bytes_in, n as u64);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.from_host.drain(..n);
                        c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                        c.fwd_cnt_told = h.fwd_cnt;
                    }
                }
            }
            self.sync_interest(key);
        }
        used
    }

    fn process_tx(&mut self) {
        let mut active = std::mem::take(&mut self.active);
        if let Active {
            mem: Some(mem),
            tx: Some(tx),
            interrupt: Some(irq),
            ..
        } = &mut active
        {
            let mut packets = Vec::new();
            let stats = &self.stats;
            let served = serve_device_queue(tx, mem, irq, stats, |c| {
                DeviceStats::add(&stats.requests, 1);
                match read_tx_packet(mem, &chain::descriptors(c)) {
                    Ok(p) => packets.push(p),
                    Err(e) => {
                        tracing::debug!(error = %e, "vsock packet dropped");
                        DeviceStats::add(&stats.bad_requests, 1);
                    }
                }
                0
            });
            if !served {
                active.tx = None;
            }
            self.active = active;
            for (h, payload) in packets {
                self.handle_tx(h, &payload);
            }
        } else {
            self.active = active;
        }
    }
}

/// Why a transmit chain was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadPacket {
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    #[error("the chain is shorter than a packet header")]
    Short,
    #[error("the header's length exceeds the payload or the device's limit")]
    Length,
    #[error("a buffer lies outside guest RAM")]
    OutsideRam,
}

/// Parses a transmit chain: the header, then `len` bytes of payload, all device-readable.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    descriptors: &[(vm_memory::GuestAddress, u32, bool)],
) -> Result<(Header, Vec<u8>), BadPacket> {
    let s = Streams::split(descriptors).ok_or(BadPacket::Order)?;
    let total = stream_len(&s.readable);
    if total < HEADER_LEN as u64 {
        return Err(BadPacket::Short);
    }
    let mut raw = [0u8; HEADER_LEN];
    read_stream(mem, &s.readable, &mut raw).map_err(|_| BadPacket::OutsideRam)?;
    let h = Header::parse(&raw);
    if h.len > MAX_PAYLOAD || u64::from(h.len) > total - HEADER_LEN as u64 {
        return Err(BadPacket::Length);
    }
    let mut payload = vec![0u8; h.len as usize];
    let body = sub_stream(&s.readable, HEADER_LEN as u64, u64::from(h.len));
    read_stream(mem, &body, &mut payload).map_err(|_| BadPacket::OutsideRam)?;
    Ok((h, payload))
}

/// A receive buffer taken from the queue: its head and its writable stream (`None` when the
/// chain is malformed).
struct RxBuf {
    head: u16,
    streams: Option<Streams>,
}

impl RxBuf {
    /// Payload bytes that fit after the header.
    fn room(&self) -> usize {
        self.streams.as_ref().map_or(0, |s| {
            stream_len(&s.writable)
                .saturating_sub(HEADER_LEN as u64)
                .min(u64::from(MAX_PAYLOAD)) as usize
        })
    }
}

fn pop_rx(mem: &GuestMemoryMmap, rx: &mut Queue) -> Option<RxBuf> {
    let chain = rx.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    Some(RxBuf {
        head,
        streams: Streams::split(&chain::descriptors(chain)),
    })
}

/// Writes a packet into `buf` (or returns it empty if it cannot hold one) and publishes it.
/// Returns whether the packet was written.
fn complete_rx(
    mem: &GuestMemoryMmap,
    rx: &mut Queue,
    buf: RxBuf,
    h: Option<Header>,
    payload: &[u8],
) -> bool {
    let written = match (h, &buf.streams) {
        (Some(h), Some(s)) if stream_len(&s.writable) >= (HEADER_LEN + payload.len()) as u64 => {
            let body = sub_stream(&s.writable, HEADER_LEN as u64, payload.len() as u64);
            write_stream(mem, &s.writable, &h.to_bytes()).is_ok()
                && write_stream(mem, &body, payload).is_ok()
        }
        _ => false,
    };
    let len = if written {
        (HEADER_LEN + payload.len()) as u32
    } else {
        0
    };
    // A used ring outside guest memory shows up as a broken queue on the next pass.
    let _ = rx.add_used(mem, buf.head, len);
    written
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        19
    }

    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0 // stream sockets only (implied without VIRTIO_VSOCK_F_SEQPACKET)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let mut q = super::take_queues(queues, 3, acked_features)?.into_iter();
        self.active = Active {
            mem: Some(mem),
            rx: q.next(),
            tx: q.next(),
            event: q.next(),
            interrupt: Some(interrupt),
        };
        Ok(())
    }

    /// After a restore every connection the guest had is gone with the old monitor's host
    /// sockets: `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue makes the guest drop
    /// them (its listening sockets stay), as the specification intends after migration.
    fn resumed(&mut self) {
        let Active {
            mem: Some(mem),
            event: Some(ev),
            interrupt: Some(irq),
            ..
        } = &mut self.active
        else {
            return;
        };
        let Some(chain) = ev.pop_descriptor_chain(&*mem) else {
            tracing::debug!("vsock: no event buffer for the transport reset after a restore");
            return;
        };
        let head = chain.head_index();
        let written = Streams::split(&chain::descriptors(chain))
            .filter(|s| stream_len(&s.writable) >= 4)
            .is_some_and(|s| {
                write_stream(mem, &s.writable, &EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok()
            });
        let _ = ev.add_used(mem, head, if written { 4 } else { 0 });
        super::interrupt_if_wanted(ev, mem, irq);
        if written && self.events.remove(self.listener.as_raw_fd()).is_ok() {
            self.reset_pending = true;
        }
    }

    fn process_queue(&mut self, index: u16) {
        match usize::from(index) {
            TX => self.process_tx(),
            RX => {} // new receive buffers: delivered below
            // The event queue carries nothing from the guest; a buffer put back after the
            // transport reset means the guest has dropped its old connections.
            _ => {
                if self.reset_pending {
                    self.reset_pending = false;
                    let fd = self.listener.as_raw_fd();
                    if let Err(e) = self.events.add(fd, LISTENER_TOKEN, EventSet::IN) {
                        tracing::error!(error = %e, "vsock: cannot watch the host socket again");
                    }
                }
            }
        }
        self.after_host_work();
    }

    fn reset(&mut self) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        for (token, t) in std::mem::take(&mut self.tokens) {
            if let TokenUse::Handshake(_) = t {
                self.host.close(token);
            }
        }
        self.control.clear();
        self.active = Active::default();
        if std::mem::take(&mut self.reset_pending) {
            let _ = self
                .events
                .add(self.listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN);
        }
        self.host.sync_channel();
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host_clients();
        } else if !self.host.is_channel(token) {
            self.stream_event(token, events);
        }
        // The back-end's news (its channel is readable) is read below.
        self.after_host_work();
    }
}

impl Vsock {
    /// What every entry point ends with: the back-end's news acted on, guest buffers filled,
    /// and the back-end's channel (a new one if the back-end was restarted during this call)
    /// watched. News a back-end sent while this thread waited for a reply was read off the
    /// channel then, and no event would announce it again: it is taken here, until there is
    /// none (each piece spends a watch, so this ends).
    fn after_host_work(&mut self) {
        loop {
            let news = self.host.news();
            if news.is_empty() {
                break;
            }
            for n in news {
                match n {
                    News::Ready(t, ev) => self.stream_event(t, ev),
                    News::Lost(t) => self.stream_lost(t),
                }
            }
        }
        if self.is_active() {
            self.deliver();
        }
        self.host.sync_channel();
        self.stats.copy_backend(self.host.backend_stats());
    }

    /// Host stream `token` is ready as `events` says.
    fn stream_event(&mut self, token: u64, events: EventSet) {
        match self.tokens.get(&token) {
            Some(TokenUse::Handshake(..)) => self.continue_handshake(token),
            Some(&TokenUse::Conn(g, h)) => {
                let key = (g, h);
                if events.contains(EventSet::OUT) {
                    self.after_host_io(key);
                }
                if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                    && let Some(c) = self.conns.get_mut(&key)
                {
                    // Read now (if the guest has room); delivery places it in guest buffers.
                    c.host_quiet = false;
                    self.read_host(key);
                }
                self.sync_interest(key);
            }
            None => {}
        }
    }

    /// Host stream `token` died with its back-end: a client still handshaking is forgotten, a
    /// connection is reset for the guest.
    fn stream_lost(&mut self, token: u64) {
        match self.tokens.get(&token) {
            Some(TokenUse::Handshake(_)) => {
                self.tokens.remove(&token);
            }
            Some(&TokenUse::Conn(g, h)) => {
                let rst = self.header((g, h), op::RST, 0);
                self.remove_conn((g, h));
                self.send_control(rst);
            }
            None => {}
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    //! The device between a guest driver's rings (a [`SplitRing`] in real guest memory) and
    //! real unix sockets on the host, woken by its real epoll set. No KVM, no privileges.

    use super::guest::GuestVsock;
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    const CID: u64 = 42;
    const RX_BUF: u32 = 4096;
    const GUEST_PORT: u32 = 7000;
    const WAIT: Duration = Duration::from_secs(5);

    struct Rig {
        dev: Vsock,
        events: DeviceEvents,
        /// The guest's driver: rings, buffers and packets in guest memory.
        g: GuestVsock,
        dir: PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulwark-vsock-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rig(tag: &str) -> Rig {
        let dir = temp_dir(tag);
        let events = DeviceEvents::new().unwrap();
        let cfg = VsockConfig {
            cid: CID,
            socket: dir.join("v.sock"),
            isolation: Isolation::Inline,
        };
        let mut dev = Vsock::new(&cfg, events.clone()).unwrap();
        let g = GuestVsock::activate(&mut dev, CID, RX_BUF);
        Rig {
            dev,
            events,
            g,
            dir,
        }
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            ..Header::default()
        }
    }

    impl Rig {
        fn socket(&self) -> PathBuf {
            self.dev.socket().to_path_buf()
        }

        fn port_path(&self, port: u32) -> PathBuf {
            let mut p = self.dev.socket().as_os_str().to_owned();
            p.push(format!("_{port}"));
            p.into()
        }

        /// Posts `n` receive buffers and tells the device.
        fn post_rx(&mut self, n: usize) {
            self.g.post_rx(&mut self.dev, n);
        }

        /// Puts `bufs` on the transmit queue as one chain and notifies the device.
        fn send_chain(&mut self, bufs: &[crate::virtio::driver::Buf]) {
            self.g.send_chain(&mut self.dev, bufs);
        }

        /// Writes a packet (header, then `payload`) and sends it in one buffer.
        fn send(&mut self, h: Header, payload: &[u8]) {
            self.g.send(&mut self.dev, h, payload);
        }

        /// Runs the device on ready host descriptors, as its worker thread would, until none
        /// is ready for a short while.
        fn pump(&mut self) {
            for _ in 0..1000 {
                if GuestVsock::pump_once(&mut self.dev, &self.events, 50) == 0 {
                    return;
                }
            }
            panic!("host descriptors never went quiet");
        }

        /// Packets the device placed in receive buffers since the last call.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            self.g.received()
        }

        /// Pumps until a packet with `op` arrives; returns it (and drops what came before).
        fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                if let Some(p) = self.received().into_iter().find(|(h, _)| h.op == op) {
                    return p;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no packet with op {op}"
                );
                self.pump();
            }
        }

        fn bad_requests(&self) -> u64 {
            DeviceStats::get(&self.dev.stats.bad_requests)
        }

        /// A host client connects to the device socket and asks for guest port `port`; the
        /// guest accepts. Returns the client and the host port.
        fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
            let mut client = UnixStream::connect(self.socket()).unwrap();
            client.set_read_timeout(Some(WAIT)).unwrap();
            client
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .unwrap();
            let (req, _) = self.expect(op::REQUEST);
            assert_eq!((req.dst_port, req.len), (port, 0));
            assert!(req.src_port >= FIRST_HOST_PORT, "{req:?}");
            self.send(guest(op::RESPONSE, port, req.src_port), &[]);
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != b'\n' {
                client.read_exact(&mut b).unwrap();
                line.push(b[0]);
            }
            assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
            (client, req.src_port)
        }

        /// The guest connects to host port `port`, where a listener waits; returns the
        /// accepted host stream.
        fn guest_connect(&mut self, listener: &UnixListener, port: u32) -> UnixStream {
            self.send(guest(op::REQUEST, GUEST_PORT, port), &[]);
            let (resp, _) = self.expect(op::RESPONSE);
            assert_eq!((resp.src_port, resp.dst_port), (port, GUEST_PORT));
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        }
    }

    #[test]
    fn vsock_host_connect_handshake_then_data_both_ways_then_guest_reset() {
        let mut r = rig("host-connect");
        r.post_rx(16);
        let (mut client, host_port) = r.host_connect(52);
        // Host to guest.
        client.write_all(b"hello from the host").unwrap();
        let (h, payload) = r.expect(op::RW);
        assert_eq!((h.src_port, h.dst_port), (host_port, 52));
        assert_eq!(payload, b"hello from the host");
        // Guest to host.
        r.send(guest(op::RW, 52, host_port), b"hello from the guest");
        let mut got = [0u8; 20];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello from the guest");
        assert_eq!(DeviceStats::get(&r.dev.stats.bytes_out), 20);
        assert_eq!(DeviceStats::get(&r.dev.stats.bytes_in), 19);
        // The guest resets: the host stream ends.
        r.send(guest(op::RST, 52, host_port), &[]);
        assert_eq!(
            client.read(&mut got).unwrap(),
            0,
            "EOF after the guest's reset"
        );
        assert_eq!(r.dev.usage().connections, 0);
        assert_eq!(r.bad_requests(), 0);
    }

    #[test]
    fn vsock_host_connect_with_bad_line_is_answered_with_error() {
        let mut r = rig("bad-line");
        r.post_rx(4);
        let mut client = UnixStream::connect(r.socket()).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        client.write_all(b"HELLO 52\n").unwrap();
        r.pump();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "ERROR bad CONNECT line\n");
        assert!(r.received().is_empty(), "nothing reaches the guest");
    }

    #[test]
    fn vsock_guest_connect_to_listener_gets_response_and_host_shutdown_reaches_guest() {
        let mut r = rig("guest-connect");
        r.post_rx(16);
        let listener = UnixListener::bind(r.port_path(1234)).unwrap();
        let mut host = r.guest_connect(&listener, 1234);
        r.send(guest(op::RW, GUEST_PORT, 1234), b"ping");
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        host.write_all(b"pong").unwrap();
        let (h, payload) = r.expect(op::RW);
        assert_eq!(
            (h.src_port, h.dst_port, payload.as_slice()),
            (1234, GUEST_PORT, &b"pong"[..])
        );
        // The host closes its side: after its data, the guest hears SHUTDOWN (send).
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let (h, _) = r.expect(op::SHUTDOWN);
        assert_eq!(h.flags, SHUTDOWN_SEND);
    }

    #[test]
    fn vsock_listener_that_never_accepts_cannot_stall_the_device() {
        // A host listener whose backlog fills: connecting must not block the device thread
        // (found by fuzzing review: a blocking connect hung every connection of the VM).
        // The guest's side runs on a thread, so a device that blocks fails this test at the
        // deadline instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = rig("backlog");
            let _listener = UnixListener::bind(r.port_path(77)).unwrap();
            // More than the listener's backlog (SOMAXCONN, 4096 here), so connects would block.
            for i in 0..5000u32 {
                r.post_rx(1); // each REQUEST gets one answer: RESPONSE, or RST once the backlog is full
                r.send(guest(op::REQUEST, 10_000 + i, 77), &[]);
                r.send(guest(op::RST, 10_000 + i, 77), &[]);
                r.received(); // keep the receive ring from filling
            }
            // Past the backlog the guest is refused with a reset, and the device still answers.
            r.post_rx(4);
            r.send(guest(op::REQUEST, 9000, 78), &[]);
            let (h, _) = r.expect(op::RST);
            let _ = done.send(h.dst_port);
        });
        let port = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the device stalled (or the guest side panicked) connecting to a full backlog");
        assert_eq!(port, 9000);
    }

    #[test]
    fn vsock_guest_connect_without_listener_is_reset() {
        let mut r = rig("refused");
        r.post_rx(4);
        r.send(guest(op::REQUEST, GUEST_PORT, 999), &[]);
        let (h, _) = r.expect(op::RST);
        assert_eq!((h.src_port, h.dst_port), (999, GUEST_PORT));
        assert_eq!(r.dev.usage().connections, 0);
    }

    #[test]
    fn vsock_wrong_source_cid_is_reset_and_counted() {
        let mut r = rig("wrong-cid");
        r.post_rx(4);
        let listener = UnixListener::bind(r.port_path(1234)).unwrap();
        let mut h = guest(op::REQUEST, GUEST_PORT, 1234);
        h.src_cid = CID + 1;
        r.send(h, &[]);
        let (rst, _) = r.expect(op::RST);
        assert_eq!((rst.src_port, rst.dst_port), (1234, GUEST_PORT));
        assert_eq!(r.bad_requests(), 1);
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "no connection made for it");
    }

    #[test]
    fn vsock_data_beyond_the_advertised_buffer_is_reset() {
        let mut r = rig("credit");
        r.post_rx(4);
        let listener = UnixListener::bind(r.port_path(1234)).unwrap();
        // The host side never reads: the device holds what its socket does not take, up to
        // the BUF_ALLOC it advertised, and resets the connection past it.
        let _host = r.guest_connect(&listener, 1234);
        let chunk = vec![7u8; MAX_PAYLOAD as usize];
        let mut sent = 0usize;
        while r.dev.usage().connections == 1 {
            r.send(guest(op::RW, GUEST_PORT, 1234), &chunk);
            sent += chunk.len();
            assert!(r.dev.usage().max_to_host <= BUF_ALLOC as usize);
            assert!(sent < 64 << 20, "never reset after {sent} bytes");
        }
        assert!(sent > BUF_ALLOC as usize, "reset after only {sent} bytes");
        assert_eq!(r.bad_requests(), 1);
        r.post_rx(64);
        let (rst, _) = r.expect(op::RST);
        assert_eq!((rst.src_port, rst.dst_port), (1234, GUEST_PORT));
    }

    #[test]
    fn vsock_header_length_beyond_the_chain_is_dropped_and_counted() {
        let mut r = rig("short");
        r.post_rx(4);
        let mut h = guest(op::REQUEST, GUEST_PORT, 1234);
        h.len = 100;
        let at = r.g.write_packet(&h, &[0u8; 10]);
        let descriptors = [(GuestAddress(at), (HEADER_LEN + 10) as u32, false)];
        assert_eq!(
            read_tx_packet(&r.g.mem, &descriptors),
            Err(BadPacket::Length)
        );
        r.send_chain(&[(at, (HEADER_LEN + 10) as u32, false)]);
        assert_eq!(r.g.tx.used_elem(&r.g.mem, 0), (u32::from(0u16), 0));
        assert_eq!(r.bad_requests(), 1);
        r.pump();
        assert!(r.received().is_empty(), "a dropped packet gets no answer");
        // Shorter than a header, and out of order: dropped too.
        r.send_chain(&[(at, 20, false)]);
        r.send_chain(&[(at + 0x1000, 64, true), (at, 44, false)]);
        assert_eq!(r.bad_requests(), 3);
    }

    #[test]
    fn vsock_second_device_on_the_same_path_is_refused() {
        let r = rig("exists");
        let cfg = VsockConfig {
            cid: CID + 1,
            socket: r.socket(),
            isolation: Isolation::Inline,
        };
        let err = Vsock::new(&cfg, DeviceEvents::new().unwrap()).unwrap_err();
        assert!(matches!(err, VsockError::SocketExists(_)), "{err}");
        // The first device still has its socket.
        assert!(UnixStream::connect(r.socket()).is_ok());
    }

    #[test]
    fn vsock_reserved_and_oversized_cids_are_refused() {
        let dir = temp_dir("cids");
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let cfg = VsockConfig {
                cid,
                socket: dir.join("v.sock"),
                isolation: Isolation::Inline,
            };
            let err = Vsock::new(&cfg, DeviceEvents::new().unwrap()).unwrap_err();
            assert!(matches!(err, VsockError::BadCid(c) if c == cid), "{err}");
            assert!(!cfg.socket.exists(), "no socket left behind");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn vsock_config_space_holds_the_guest_cid() {
        let r = rig("config");
        let mut b = [0xffu8; 8];
        r.dev.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), CID);
        r.dev.read_config(6, &mut b);
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn vsock_control_packets_stay_bounded_without_receive_buffers() {
        // Regression: each bad packet earns a reset, and a guest that posts no receive buffers
        // used to grow the queue of them without bound.
        let mut r = rig("control-bound");
        let mut h = guest(op::REQUEST, GUEST_PORT, 1234);
        h.src_cid = CID + 1;
        for _ in 0..MAX_PENDING_CONTROL + 500 {
            r.send(h, &[]);
        }
        assert_eq!(r.dev.usage().pending_control, MAX_PENDING_CONTROL);
        // What was kept is delivered once the guest posts buffers.
        r.post_rx(8);
        assert_eq!(r.received().len(), 8);
        assert_eq!(r.dev.usage().pending_control, MAX_PENDING_CONTROL - 8);
    }

    #[test]
    fn vsock_host_clients_cannot_exceed_the_connection_limit() {
        // Regression: clients that finished their handshake after the guest took the last
        // connections, or many clients handshaking at once, went past MAX_CONNECTIONS.
        let mut r = rig("limit");
        let listener = UnixListener::bind(r.port_path(1234)).unwrap();
        // A client starts its handshake while there is room.
        let mut early = UnixStream::connect(r.socket()).unwrap();
        early.set_read_timeout(Some(WAIT)).unwrap();
        r.pump();
        assert_eq!(r.dev.usage().handshakes, 1);
        // The guest then takes every connection (its connects do not count handshakes).
        for port in 0..MAX_CONNECTIONS as u32 {
            r.send(guest(op::REQUEST, 10_000 + port, 1234), &[]);
        }
        assert_eq!(r.dev.usage().connections, MAX_CONNECTIONS);
        early.write_all(b"CONNECT 52\n").unwrap();
        r.pump();
        assert_eq!(r.dev.usage().connections, MAX_CONNECTIONS);
        let mut rest = Vec::new();
        assert_eq!(early.read_to_end(&mut rest).unwrap(), 0, "client dropped");
        // New clients are turned away at once.
        let mut late = UnixStream::connect(r.socket()).unwrap();
        late.set_read_timeout(Some(WAIT)).unwrap();
        r.pump();
        assert_eq!(r.dev.usage().handshakes, 0);
        assert_eq!(late.read(&mut [0u8; 1]).unwrap(), 0, "client dropped");
        drop(listener);
    }

    #[test]
    fn vsock_clients_handshaking_at_once_are_bounded() {
        // Regression: handshaking clients did not count against MAX_CONNECTIONS, so any number
        // could finish their lines and all become connections.
        let mut r = rig("handshakes");
        let clients: Vec<UnixStream> = (0..=MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(r.socket()).unwrap())
            .collect();
        r.pump();
        assert_eq!(r.dev.usage().handshakes, MAX_CONNECTIONS);
        let mut last = &clients[MAX_CONNECTIONS];
        last.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(last.read(&mut [0u8; 1]).unwrap(), 0, "client dropped");
    }

    #[test]
    fn vsock_resumed_device_tells_the_guest_its_connections_are_gone() {
        let mut r = rig("resume");
        let buf = 0x30_0000u64;
        r.g.mem
            .write_obj(0xffff_ffffu32, GuestAddress(buf))
            .unwrap();
        r.g.event.push(&r.g.mem, &[(buf, 8, true)]);
        r.dev.resumed();
        assert_eq!(r.g.event.used_idx(&r.g.mem), 1, "one event published");
        assert_eq!(r.g.event.used_elem(&r.g.mem, 0), (0, 4));
        let id: u32 = r.g.mem.read_obj(GuestAddress(buf)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        // Host clients wait until the guest has handled the reset (it puts a new event buffer
        // back and notifies the queue): the listener is not watched meanwhile.
        assert!(r.dev.reset_pending);
        r.g.event.push(&r.g.mem, &[(buf, 8, true)]);
        r.dev.process_queue(2);
        assert!(!r.dev.reset_pending);
        // Without an event buffer there is nothing to post and nothing to wait for.
        let mut r = rig("resume-nobuf");
        r.dev.resumed();
        assert_eq!(r.g.event.used_idx(&r.g.mem), 0);
        assert!(!r.dev.reset_pending);
    }
}
