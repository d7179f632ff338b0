//! The `virtio_vsock` harness: a hostile guest's packets and real unix sockets on the host.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_devices::virtio::chain::{Segment, read_stream, stream_len};
use bulwark_devices::virtio::driver::SplitRing;
use bulwark_devices::virtio::vsock::{
    self, BUF_ALLOC, HEADER_LEN, Header, MAX_CONNECTIONS, MAX_PAYLOAD, MAX_PENDING_CONTROL, Vsock,
    VsockConfig, VsockError,
};
use bulwark_devices::virtio::{DeviceEvents, HOST_TOKEN_BASE, VIRTIO_F_VERSION_1, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::super::Cursor;
use super::{counting_interrupt, guest_memory, stream_in_ram};

const VS_MEM: u64 = 1 << 20;
const VS_RX: u64 = 0x1000;
const VS_TX: u64 = 0x4000;
const VS_EVENT: u64 = 0x7000;
/// Transmit packets are built here.
const VS_TX_AREA: u64 = 0xa000;
/// Receive buffers are taken from here up to the end of memory.
const VS_RX_AREA: u64 = 0x2_0000;
/// Guest ports the guest side uses.
const GUEST_PORTS: [u32; 3] = [5000, 5001, 5002];
/// Host ports with a `<socket>_<port>` listener that the harness accepts on, none, and one that
/// never accepts.
const PORT_ACCEPTING: u32 = 1024;
const PORT_NONE: u32 = 1025;
const PORT_STALLED: u32 = 1026;
/// What host peers and the guest send: each side checks it receives only the other's byte.
const HOST_BYTE: u8 = 0xa5;
const GUEST_BYTE: u8 = 0x5a;
const RX_SIZES: [u32; 10] = [0, 1, 43, 44, 45, 64, 300, 1024, 4096, 8192 + 44];
const BUF_ALLOCS: [u32; 5] = [0, 1, 4096, BUF_ALLOC, u32::MAX];

/// A receive buffer the guest posted: its head and its device-writable buffers.
struct Posted {
    head: u16,
    descriptors: u16,
    writable: Vec<Segment>,
    /// Whether the device can write a packet there at all (writable after readable, in RAM).
    usable: bool,
}

/// A host-side stream: a client of the device socket, or one the listener accepted.
struct HostPeer {
    stream: UnixStream,
    /// For clients: the answer line so far, until its `\n`.
    line: Option<Vec<u8>>,
    /// Whether the client sent a well-formed `CONNECT` line (so `OK` is a possible answer).
    asked: bool,
    refused: bool,
}

static VSOCK_SEQ: AtomicU64 = AtomicU64::new(0);

fn port_path(socket: &Path, port: u32) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(format!("_{port}"));
    p.into()
}

/// A directory of its own for each input's sockets, removed whatever happens to the input.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Self {
        let seq = VSOCK_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("bulwark-fuzz-vsock-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz socket directory");
        Self(dir)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct VsockRig {
    dev: Vsock,
    cid: u64,
    mem: GuestMemoryMmap,
    size: u16,
    active: bool,
    rx: SplitRing,
    tx: SplitRing,
    rx_next_desc: u16,
    rx_next_data: u64,
    tx_next_data: u64,
    posted: VecDeque<Posted>,
    rx_seen: u16,
    tx_seen: u16,
    /// Connections the guest knows of: (guest port, host port).
    known: Vec<(u32, u32)>,
    peers: Vec<HostPeer>,
    accepting: UnixListener,
    _stalled: UnixListener,
    /// `HOST_BYTE`s the host wrote; RW payload bytes the guest received.
    host_wrote: u64,
    guest_got: u64,
    /// `GUEST_BYTE`s host peers read.
    host_read: u64,
    socket: PathBuf,
}

impl VsockRig {
    fn activate(&mut self) {
        let zero = vec![0u8; (VS_TX_AREA - VS_RX) as usize];
        self.mem
            .write_slice(&zero, GuestAddress(VS_RX))
            .expect("in RAM");
        self.rx = SplitRing::new(VS_RX, VS_RX + 0x1000, VS_RX + 0x2000, self.size);
        self.tx = SplitRing::new(VS_TX, VS_TX + 0x1000, VS_TX + 0x2000, self.size);
        let event = SplitRing::new(VS_EVENT, VS_EVENT + 0x1000, VS_EVENT + 0x2000, self.size);
        self.rx_next_desc = 0;
        self.posted.clear();
        self.rx_seen = 0;
        self.tx_seen = 0;
        self.known.clear();
        let (irq, _) = counting_interrupt();
        let queues = vec![self.rx.queue(), self.tx.queue(), event.queue()];
        self.dev
            .activate(self.mem.clone(), VIRTIO_F_VERSION_1, queues, irq)
            .expect("three queues are what vsock takes");
        self.active = true;
    }

    fn pick_pair(&self, input: &mut Cursor<'_>) -> Option<(u32, u32)> {
        let sel = usize::from(input.u8()?);
        let fixed = [PORT_ACCEPTING, PORT_NONE, PORT_STALLED];
        Some(if sel & 0x80 != 0 && !self.known.is_empty() {
            self.known[sel % self.known.len()]
        } else if sel & 0x40 != 0 {
            (input.u32()?, input.u32()?)
        } else {
            (GUEST_PORTS[sel % 3], fixed[(sel >> 2) % 3])
        })
    }

    /// One packet from the guest, as the input describes it.
    fn send(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let [sel, layout, len_sel, credit] = input.array()?;
        let (src_port, dst_port) = self.pick_pair(input)?;
        let op = if sel & 7 == 0 {
            input.u16()?
        } else {
            u16::from(sel & 7)
        };
        let payload_len = match len_sel % 4 {
            0 => 0,
            1 => u32::from(input.u8()?),
            2 => u32::from(input.u16()?) % 16_384,
            _ => 4096,
        };
        let h = Header {
            src_cid: if sel & 0x08 != 0 {
                input.u64()?
            } else {
                self.cid
            },
            dst_cid: if sel & 0x10 != 0 {
                input.u64()?
            } else {
                vsock::HOST_CID
            },
            src_port,
            dst_port,
            // Most packets tell the truth about their length.
            len: if len_sel & 0x80 != 0 {
                input.u32()?
            } else {
                payload_len
            },
            kind: if sel & 0x20 != 0 { input.u16()? } else { 1 },
            op,
            flags: if sel & 0x40 != 0 {
                input.u32()?
            } else {
                u32::from(len_sel >> 4 & 3)
            },
            buf_alloc: BUF_ALLOCS[usize::from(credit % 5)],
            fwd_cnt: if credit & 0x80 != 0 { input.u32()? } else { 0 },
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.resize(HEADER_LEN + payload_len as usize, GUEST_BYTE);
        let total = bytes.len() as u64;
        if self.tx_next_data + total > VS_RX_AREA {
            self.tx_next_data = VS_TX_AREA;
        }
        let at = self.tx_next_data;
        self.tx_next_data = (at + total + 15) & !15;
        self.mem
            .write_slice(&bytes, GuestAddress(at))
            .expect("transmit area in RAM");
        let hl = HEADER_LEN as u32;
        let w = true;
        let bufs: Vec<(u64, u32, bool)> = match layout % 6 {
            0 => vec![(at, total as u32, false)],
            1 => {
                let cut = u32::from(layout >> 3) % hl + 1;
                vec![
                    (at, cut, false),
                    (at + u64::from(cut), total as u32 - cut, false),
                ]
            }
            2 => vec![
                (at, hl, false),
                (at + u64::from(hl), payload_len, false),
                (0, 64, w),
            ],
            3 => vec![(0x10, 16, w), (at, total as u32, false)],
            4 => vec![(at, hl, false), (u64::MAX - 8, payload_len.max(16), false)],
            _ => vec![(at, u32::from(layout >> 3) % hl, false)],
        };
        let descriptors: Vec<(GuestAddress, u32, bool)> = bufs
            .iter()
            .map(|&(a, l, w)| (GuestAddress(a), l, w))
            .collect();
        match vsock::read_tx_packet(&self.mem, &descriptors) {
            Ok((got, payload)) => {
                assert_eq!(got, h, "parsed header");
                assert_eq!(Header::parse(&got.to_bytes()), got, "header round trip");
                assert_eq!(payload.len(), got.len as usize);
                assert!(payload.iter().all(|&b| b == GUEST_BYTE), "payload bytes");
            }
            Err(e) => assert!(
                layout % 6 != 0 || h.len > payload_len.min(MAX_PAYLOAD),
                "a well-formed packet refused ({e}): {h:?}"
            ),
        }
        self.tx.push(&self.mem, &bufs);
        if self.active {
            self.dev.process_queue(1);
        }
        Some(())
    }

    /// Receive buffers from the guest.
    fn post(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let n = input.u8()? % 8 + 1;
        for _ in 0..n {
            let [size_sel, layout] = input.array()?;
            let len = RX_SIZES[usize::from(size_sel) % RX_SIZES.len()];
            let outstanding: u16 = self.posted.iter().map(|p| p.descriptors).sum();
            if outstanding + 2 > self.size {
                break; // an honest driver does not reuse descriptors in flight
            }
            if self.rx_next_data + u64::from(len) > VS_MEM {
                self.rx_next_data = VS_RX_AREA;
            }
            let at = self.rx_next_data;
            self.rx_next_data = (at + u64::from(len) + 15) & !15;
            // Poison: a packet must overwrite what it claims.
            let _ = self
                .mem
                .write_slice(&vec![0xee; len as usize], GuestAddress(at));
            let cut = (u32::from(layout >> 3) * 7).min(len);
            let bufs: Vec<(u64, u32, bool)> = match layout % 5 {
                0 => vec![(at, len, true)],
                1 => vec![(at, cut, true), (at + u64::from(cut), len - cut, true)],
                2 => vec![(at, cut, false), (at + u64::from(cut), len - cut, true)],
                3 => vec![(at, cut, true), (at + u64::from(cut), len - cut, false)],
                _ => vec![(VS_MEM - 8, len, true)],
            };
            let head = self.rx_next_desc;
            self.rx_next_desc = (head + bufs.len() as u16) % self.size;
            let first_w = bufs.iter().position(|b| b.2).unwrap_or(bufs.len());
            let ordered = bufs[first_w..].iter().all(|b| b.2);
            let writable: Vec<Segment> = bufs
                .iter()
                .filter(|b| b.2)
                .map(|b| Segment {
                    addr: GuestAddress(b.0),
                    len: u64::from(b.1),
                })
                .collect();
            let usable = ordered && stream_in_ram(&writable, 0, stream_len(&writable), VS_MEM);
            let pushed = self.rx.push(&self.mem, &bufs);
            assert_eq!(pushed, head, "harness descriptor bookkeeping");
            self.posted.push_back(Posted {
                head,
                descriptors: bufs.len() as u16,
                writable,
                usable,
            });
        }
        if self.active {
            self.dev.process_queue(0);
        }
        Some(())
    }

    /// A host client of the device socket, with a `CONNECT` line (or not).
    fn host_connect(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let sel = input.u8()?;
        let Ok(stream) = UnixStream::connect(&self.socket) else {
            return Some(());
        };
        stream.set_nonblocking(true).expect("nonblocking");
        let port = match sel % 4 {
            0 | 1 => GUEST_PORTS[usize::from(sel >> 2) % 3].to_string(),
            2 => input.u32()?.to_string(),
            _ => {
                String::from_utf8_lossy(input.take_up_to(usize::from(sel >> 2))).replace('\n', " ")
            }
        };
        let line = match (sel >> 4) % 4 {
            0 | 1 => format!("CONNECT {port}\n"),
            2 => format!("CONNECT {port}"), // unfinished
            _ => format!("{port}\n"),
        };
        // What the device accepts: one line of at most 32 bytes, `CONNECT <u32>`.
        let asked = line.strip_suffix('\n').is_some_and(|l| {
            l.len() <= 32
                && l.strip_prefix("CONNECT ")
                    .is_some_and(|p| p.trim().parse::<u32>().is_ok())
        });
        let mut s = &stream;
        let _ = s.write_all(line.as_bytes());
        self.peers.push(HostPeer {
            stream,
            line: Some(Vec::new()),
            asked,
            refused: false,
        });
        self.dev.host_event(HOST_TOKEN_BASE, EventSet::IN);
        self.sweep(EventSet::IN);
        Some(())
    }

    /// Wakes the device for the host descriptors it may be watching (and some it is not:
    /// the device must take spurious events).
    fn sweep(&mut self, events: EventSet) {
        for t in 1..=24 {
            self.dev.host_event(HOST_TOKEN_BASE + t, events);
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.accepting.accept() {
            stream.set_nonblocking(true).expect("nonblocking");
            self.peers.push(HostPeer {
                stream,
                line: None,
                asked: false,
                refused: false,
            });
        }
    }

    /// Reads what a host peer has and checks it.
    fn host_read(&mut self, i: usize) {
        let p = &mut self.peers[i];
        let mut buf = [0u8; 4096];
        loop {
            let n = match p.stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            if let Some(line) = &mut p.line {
                let end = data.iter().position(|&b| b == b'\n');
                let take = end.map_or(data.len(), |e| e + 1);
                line.extend_from_slice(&data[..take]);
                data = &data[take..];
                if end.is_some() {
                    let text = String::from_utf8_lossy(line).into_owned();
                    let ok = text
                        .strip_prefix("OK ")
                        .and_then(|t| t.strip_suffix('\n'))
                        .is_some_and(|port| port.parse::<u32>().is_ok());
                    assert!(
                        if p.asked {
                            ok
                        } else {
                            text == "ERROR bad CONNECT line\n"
                        },
                        "host client got {text:?} (asked: {})",
                        p.asked
                    );
                    p.refused = !ok;
                    p.line = None;
                } else {
                    assert!(line.len() < 64, "answer line too long: {line:?}");
                }
            }
            assert!(
                data.is_empty() || !p.refused,
                "data after a refusal: {data:?}"
            );
            assert!(
                data.iter().all(|&b| b == GUEST_BYTE),
                "host got bytes the guest never sent: {data:x?}"
            );
            self.host_read += data.len() as u64;
        }
    }

    fn host_op(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let [sel, which] = input.array()?;
        if self.peers.is_empty() {
            return Some(());
        }
        let i = usize::from(which) % self.peers.len();
        match sel % 4 {
            0 | 1 => {
                let n = usize::from(input.u16()?);
                let data = vec![HOST_BYTE; n];
                let mut s = &self.peers[i].stream;
                // Partial writes are fine: count what the socket took.
                if let Ok(k) = s.write(&data) {
                    self.host_wrote += k as u64;
                }
            }
            2 => self.host_read(i),
            _ => {
                let how = match sel >> 2 & 3 {
                    0 => std::net::Shutdown::Write,
                    1 => std::net::Shutdown::Read,
                    _ => std::net::Shutdown::Both,
                };
                if sel & 0x40 != 0 {
                    self.host_read(i);
                    self.peers.swap_remove(i);
                } else {
                    let _ = self.peers[i].stream.shutdown(how);
                }
            }
        }
        self.sweep(EventSet::IN | EventSet::OUT);
        Some(())
    }

    fn misc(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let sel = input.u8()?;
        match sel % 8 {
            0 => {
                self.accept();
                self.sweep(EventSet::IN);
            }
            1 => {
                self.dev.reset();
                self.active = false;
            }
            2 if !self.active => self.activate(),
            3 => {
                // More than a ring ahead: the device must not serve stale slots.
                let ahead = self.size + 1 + u16::from(input.u8()?);
                let idx = self.rx.used_idx(&self.mem).wrapping_add(ahead);
                self.rx.set_avail_idx(&self.mem, idx);
                self.posted.clear();
                // Nothing more is ever consumed from it; stop posting there.
                self.rx_next_desc = u16::MAX;
            }
            4 if self.active => self.dev.process_queue(u16::from(input.u8()?) % 3),
            5 => {
                let t = u64::from(input.u8()?);
                let bits = input.u8()?;
                let mut e = EventSet::empty();
                for (bit, ev) in [
                    EventSet::IN,
                    EventSet::OUT,
                    EventSet::HANG_UP,
                    EventSet::ERROR,
                    EventSet::READ_HANG_UP,
                ]
                .into_iter()
                .enumerate()
                {
                    if bits & (1 << bit) != 0 {
                        e |= ev;
                    }
                }
                self.dev.host_event(HOST_TOKEN_BASE + t, e);
            }
            6 => {
                let mut b = [0u8; 8];
                self.dev.read_config(u64::from(input.u8()?), &mut b);
            }
            _ => {
                for i in 0..self.peers.len() {
                    self.host_read(i);
                }
            }
        }
        Some(())
    }

    /// Checks what the device has published and holds.
    fn check(&mut self) {
        let u = self.dev.usage();
        assert!(u.connections <= MAX_CONNECTIONS, "{u:?}");
        assert!(u.handshakes <= MAX_CONNECTIONS, "{u:?}");
        assert!(u.pending_control <= MAX_PENDING_CONTROL, "{u:?}");
        assert!(u.max_to_host <= BUF_ALLOC as usize, "{u:?}");
        assert!(u.max_from_host <= MAX_PAYLOAD as usize, "{u:?}");
        let stats = self.dev.stats().snapshot();
        // Transmit: nothing written, every chain counted.
        let tx_used = self.tx.used_idx(&self.mem);
        while self.tx_seen != tx_used {
            let (_, len) = self.tx.used_elem(&self.mem, self.tx_seen);
            assert_eq!(len, 0, "the device wrote into a transmit chain");
            self.tx_seen = self.tx_seen.wrapping_add(1);
        }
        // Receive: every packet well-formed, from the host, to this guest.
        let rx_used = self.rx.used_idx(&self.mem);
        while self.rx_seen != rx_used && self.rx_next_desc != u16::MAX {
            let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let p = self
                .posted
                .pop_front()
                .expect("a used receive buffer the guest posted");
            assert_eq!(id, u32::from(p.head), "receive buffers used out of order");
            let room = stream_len(&p.writable);
            assert!(u64::from(len) <= room, "used len {len} > {room}");
            if len == 0 {
                continue;
            }
            assert!(p.usable, "a packet in an unusable buffer");
            assert!(len as usize >= HEADER_LEN, "used len {len}");
            let mut bytes = vec![0u8; len as usize];
            read_stream(&self.mem, &p.writable, &mut bytes).expect("packet in RAM");
            let raw: &[u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().expect("header");
            let h = Header::parse(raw);
            let what = format!("{h:?} in {len} bytes");
            assert_eq!(h.src_cid, vsock::HOST_CID, "{what}");
            assert_eq!(h.dst_cid, self.cid, "{what}");
            assert_eq!(h.kind, 1, "{what}");
            assert_eq!(h.len as usize, len as usize - HEADER_LEN, "{what}");
            assert!((1..=6).contains(&h.op), "{what}");
            let payload = &bytes[HEADER_LEN..];
            if h.op == vsock::op::RW {
                assert!(h.len > 0, "empty RW: {what}");
                assert!(
                    payload.iter().all(|&b| b == HOST_BYTE),
                    "guest got bytes the host never sent: {what}"
                );
                self.guest_got += payload.len() as u64;
            }
            if h.op != vsock::op::RST {
                assert_eq!(h.buf_alloc, BUF_ALLOC, "{what}");
            }
            let pair = (h.dst_port, h.src_port);
            if matches!(h.op, vsock::op::REQUEST | vsock::op::RESPONSE)
                && !self.known.contains(&pair)
                && self.known.len() < 16
            {
                self.known.push(pair);
            }
        }
        assert_eq!(
            stats.bytes_in, self.guest_got,
            "bytes_in vs. RW payload seen"
        );
        assert!(
            self.guest_got <= self.host_wrote,
            "guest got more than the host sent"
        );
        assert!(
            self.host_read <= stats.bytes_out,
            "host read {} bytes, device took {}",
            self.host_read,
            stats.bytes_out
        );
    }
}

/// The virtio-vsock device: [`vsock::read_tx_packet`] and [`Header::parse`] on hostile
/// transmit chains, and the connection state machine between a guest and real unix sockets
/// (host clients doing the `CONNECT` handshake, `<socket>_<port>` listeners that accept, that
/// never accept, and that do not exist).
///
/// Input: a set-up byte (queue size 4..64, CID choice), then ops `[op]` with `op % 6` = 0 a
/// transmit packet (every op, CIDs, type, ports, truthful or lying length, credit, flags, six
/// chain layouts), 1 receive buffers (sizes around the header, split, wrong direction, outside
/// RAM), 2 a host client and its `CONNECT` line, 3 a host peer writes, reads or shuts down,
/// 4 listener accepts, reset, re-activation, a receive-ring jump, raw host events, 5 both
/// queues run.
///
/// Invariants: no panic; connections, handshakes and per-connection buffers stay within the
/// device's limits; every receive buffer used holds a well-formed packet from CID 2 to the
/// guest's CID with the length it claims, or nothing, within the buffer's writable bytes; RW
/// payload is only what host peers wrote, and `bytes_in` is exactly what the guest received;
/// host peers read only guest data and a well-formed answer line, never more than `bytes_out`;
/// transmit chains are never written.
pub fn virtio_vsock(data: &[u8]) {
    let mut input = Cursor(data);
    let Some(setup) = input.u8() else { return };
    let size = 4u16 << (setup % 5);
    let cid = match (setup >> 3) % 4 {
        0 | 1 => 3,
        2 => 0x1234_5678,
        _ => u64::from(input.u32().unwrap_or(0)),
    };
    let dir = SocketDir::new();
    let socket = dir.0.join("v");
    let events = DeviceEvents::new().expect("epoll");
    let cfg = VsockConfig {
        cid,
        socket: socket.clone(),
        isolation: bulwark_devices::virtio::Isolation::Inline,
    };
    let dev = match Vsock::new(&cfg, events.clone()) {
        Ok(d) => d,
        Err(VsockError::BadCid(c)) => {
            assert!(!(3..u64::from(u32::MAX)).contains(&c), "CID {c} refused");
            return;
        }
        Err(e) => panic!("vsock set-up: {e}"),
    };
    assert!((3..u64::from(u32::MAX)).contains(&cid), "CID {cid} taken");
    assert!(matches!(
        Vsock::new(&cfg, events),
        Err(VsockError::SocketExists(_))
    ));
    let accepting = UnixListener::bind(port_path(&socket, PORT_ACCEPTING)).expect("listener");
    accepting.set_nonblocking(true).expect("nonblocking");
    let stalled = UnixListener::bind(port_path(&socket, PORT_STALLED)).expect("listener");
    let mem = guest_memory(VS_MEM);
    let mut rig = VsockRig {
        dev,
        cid,
        mem,
        size,
        active: false,
        rx: SplitRing::new(VS_RX, VS_RX + 0x1000, VS_RX + 0x2000, size),
        tx: SplitRing::new(VS_TX, VS_TX + 0x1000, VS_TX + 0x2000, size),
        rx_next_desc: 0,
        rx_next_data: VS_RX_AREA,
        tx_next_data: VS_TX_AREA,
        posted: VecDeque::new(),
        rx_seen: 0,
        tx_seen: 0,
        known: Vec::new(),
        peers: Vec::new(),
        accepting,
        _stalled: stalled,
        host_wrote: 0,
        guest_got: 0,
        host_read: 0,
        socket,
    };
    if setup & 0x80 == 0 {
        rig.activate();
    }
    for _ in 0..128 {
        let Some(op) = input.u8() else { break };
        let done = match op % 6 {
            0 => rig.send(&mut input),
            1 if rig.rx_next_desc != u16::MAX => rig.post(&mut input),
            1 => Some(()),
            2 => rig.host_connect(&mut input),
            3 => rig.host_op(&mut input),
            4 => rig.misc(&mut input),
            _ => {
                if rig.active {
                    rig.dev.process_queue(1);
                    rig.dev.process_queue(0);
                }
                Some(())
            }
        };
        rig.check();
        if done.is_none() {
            break;
        }
    }
    rig.accept();
    rig.sweep(EventSet::IN | EventSet::OUT);
    for i in 0..rig.peers.len() {
        rig.host_read(i);
    }
    rig.check();
    drop(rig);
    drop(dir);
}
