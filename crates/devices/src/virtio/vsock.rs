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

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::chain::{self, Streams, read_stream, stream_len, sub_stream, write_stream};
use super::{
    ActivateError, DeviceEvents, DeviceStats, HOST_TOKEN_BASE, INT_VRING, Interrupt, VirtioDevice,
    serve_queue,
};

/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Size of a packet header.
pub const HEADER_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
/// Receive buffer the device advertises per connection (bytes the guest may have in flight).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload the device accepts in one packet, or reads from a host socket at once.
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Most simultaneous connections; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host-side ports for host-initiated connections count up from here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const LISTENER_TOKEN: u64 = HOST_TOKEN_BASE;

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
}

/// One stream connection: guest port ↔ host port, with its unix stream on the host side.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
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
    /// What the stream is watched for.
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, established: bool) -> Self {
        Self {
            stream,
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
            interest: EventSet::empty(),
        }
    }

    /// Bytes the guest can still take on this connection.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.established && !self.host_eof && self.from_host.is_empty() && self.credit() > 0 {
            e |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Writes what the host socket takes now.
    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
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
    /// A host client that has not finished its `CONNECT` line.
    Handshake(UnixStream, Vec<u8>),
    /// An established or connecting stream: (guest port, host port).
    Conn(u32, u32),
}

#[derive(Debug, Default)]
struct Active {
    mem: Option<GuestMemoryMmap>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    interrupt: Option<Interrupt>,
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    events: DeviceEvents,
    conns: HashMap<(u32, u32), Conn>,
    tokens: HashMap<u64, TokenUse>,
    next_token: u64,
    next_host_port: u32,
    /// Packets without payload waiting for guest receive buffers.
    control: VecDeque<Header>,
    active: Active,
    stats: Arc<DeviceStats>,
}

impl Vsock {
    /// Binds the host socket and starts watching it in `events`.
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
        events
            .add(listener.as_raw_fd(), LISTENER_TOKEN, EventSet::IN)
            .map_err(VsockError::Events)?;
        Ok(Self {
            cid: cfg.cid,
            socket: cfg.socket.clone(),
            listener,
            events,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            active: Active::default(),
            stats: Arc::default(),
        })
    }

    /// The host socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
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
            let _ = self.events.remove(c.stream.as_raw_fd());
            self.tokens.remove(&c.token);
        }
    }

    /// Makes the epoll registration of `key` match what it can make progress on.
    fn sync_interest(&mut self, key: (u32, u32)) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.wanted_interest();
        if want != c.interest {
            let fd = c.stream.as_raw_fd();
            let r = if c.interest.is_empty() {
                self.events.add(fd, c.token, want)
            } else if want.is_empty() {
                self.events.remove(fd)
            } else {
                self.events.modify(fd, c.token, want)
            };
            if r.is_ok() {
                c.interest = want;
            }
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.is_active() || self.conns.len() >= MAX_CONNECTIONS {
                        continue; // dropped: the client sees the connection close
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    if self
                        .events
                        .add(stream.as_raw_fd(), token, EventSet::IN)
                        .is_ok()
                    {
                        self.tokens
                            .insert(token, TokenUse::Handshake(stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n`; then asks the guest to accept.
    fn continue_handshake(&mut self, token: u64) {
        let Some(TokenUse::Handshake(mut stream, mut line)) = self.tokens.remove(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < MAX_HANDSHAKE => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tokens.insert(token, TokenUse::Handshake(stream, line));
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EOF, an overlong line, or an error: drop the client.
                _ => {
                    let _ = self.events.remove(stream.as_raw_fd());
                    return;
                }
            }
        }
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let _ = self.events.remove(stream.as_raw_fd());
        let Some(port) = port else {
            let _ = stream.write_all(b"ERROR bad CONNECT line\n");
            return;
        };
        let host_port = self.next_host_port;
        self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (port, host_port);
        if self.conns.contains_key(&key) {
            return;
        }
        self.tokens.insert(token, TokenUse::Conn(port, host_port));
        self.conns.insert(key, Conn::new(stream, token, false));
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
                    if c.stream.write_all(ok.as_bytes()).is_err() {
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
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let token = self.new_token();
                let mut c = Conn::new(stream, token, true);
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
        if c.flush_to_host().is_err() {
            let h = self.header(key, op::RST, 0);
            self.remove_conn(key);
            self.send_control(h);
            return;
        }
        if c.guest_send_done && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
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
        if !c.established || c.host_eof || !c.from_host.is_empty() {
            return;
        }
        let want = c.credit().min(MAX_PAYLOAD) as usize;
        if want == 0 {
            return;
        }
        c.from_host.resize(want, 0);
        loop {
            match c.stream.read(&mut c.from_host) {
                Ok(0) => {
                    c.from_host.clear();
                    c.host_eof = true;
                    break;
                }
                Ok(n) => {
                    c.from_host.truncate(n);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.from_host.clear();
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
            && rx.needs_notification(&*mem).unwrap_or(true)
        {
            irq.signal(INT_VRING);
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
                if c.from_host.is_empty() && !shutdown_due {
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
                let data = c.from_host[..n].to_vec();
                if complete_rx(mem, rx, buf, Some(h), &data) {
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
            let stats = self.stats.clone();
            let r = serve_queue(tx, mem, irq, |c| {
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
            if r.is_err() {
                DeviceStats::add(&self.stats.broken_queues, 1);
                irq.device_failed();
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
            let mut bytes = h.to_bytes().to_vec();
            bytes.extend_from_slice(payload);
            write_stream(mem, &s.writable, &bytes).is_ok()
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
        let c = self.cid.to_le_bytes();
        data.fill(0);
        if let Ok(start) = usize::try_from(offset)
            && start < c.len()
        {
            let n = data.len().min(c.len() - start);
            data[..n].copy_from_slice(&c[start..start + n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 3,
            });
        }
        let mut q = queues.into_iter();
        self.active = Active {
            mem: Some(mem),
            rx: q.next(),
            tx: q.next(),
            interrupt: Some(interrupt),
        };
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        match usize::from(index) {
            TX => self.process_tx(),
            RX => {} // new receive buffers: delivered below
            _ => {}  // the event queue carries nothing from the guest
        }
        self.deliver();
    }

    fn reset(&mut self) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        for (_, t) in self.tokens.drain() {
            if let TokenUse::Handshake(s, _) = t {
                let _ = self.events.remove(s.as_raw_fd());
            }
        }
        self.control.clear();
        self.active = Active::default();
    }

    fn host_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host_clients();
        } else {
            match self.tokens.get(&token) {
                Some(TokenUse::Handshake(..)) => self.continue_handshake(token),
                Some(&TokenUse::Conn(g, h)) => {
                    let key = (g, h);
                    if events.contains(EventSet::OUT) {
                        self.after_host_io(key);
                    }
                    if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
                        && let Some(c) = self.conns.get_mut(&key)
                        && c.established
                        && c.from_host.is_empty()
                    {
                        // Read now; delivery below places it in guest buffers.
                        self.read_host(key);
                    }
                    self.sync_interest(key);
                }
                None => {}
            }
        }
        if self.is_active() {
            self.deliver();
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}
