//! The closed protocol between a monitor and a device back-end.
//!
//! One message per seqpacket datagram, always [`MSG_LEN`] bytes, little-endian:
//!
//! | offset | size | field                                                         |
//! |--------|------|---------------------------------------------------------------|
//! | 0      | 4    | magic `BWBE`                                                   |
//! | 4      | 2    | version ([`VERSION`])                                          |
//! | 6      | 2    | op ([`Op`])                                                    |
//! | 8      | 8    | id: the monitor's request number, echoed by the reply          |
//! | 16     | 8    | offset: byte offset on the disk, or the vsock stream's number  |
//! | 24     | 8    | window: byte offset of the request's data in the I/O window    |
//! | 32     | 8    | len: bytes (in a reply: bytes a stream took or gave)           |
//! | 40     | 4    | arg: flags of a request; 0 or an errno in a reply              |
//! | 44     | 4    | reserved, zero                                                 |
//!
//! Request data never travels in messages: it sits in the device's I/O window, a shared memory
//! file that holds nothing but in-flight buffers. There is no way to name guest memory in this
//! protocol. Both sides decode every message they receive with [`Msg::decode`] and check it
//! against what they know before acting on it (the back-end: [`Msg::check_request`]; the
//! monitor: the window's ownership table).
//!
//! A back-end that breaks its seccomp policy writes one text datagram (`bulwark: seccomp: ...`)
//! on the same socket before it dies; [`Msg::decode`] returns it as [`ProtoError::Report`].

/// `BWBE`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BWBE");
/// Bumped on any change of layout or meaning: both sides refuse every other version.
pub const VERSION: u16 = 2;
pub const MSG_LEN: usize = 48;
/// Most requests a device has in flight to its back-end at once. Both ends' socket buffers hold
/// this many messages with room to spare, so neither blocks sending while the other does.
pub const MAX_BATCH: usize = 64;
/// A read or write at least this large is answered as soon as it is done, not with the rest of
/// its batch, and with a CPU to spare the monitor cuts larger transfers into pieces of this
/// size and sends each once it is copied: copying one piece overlaps moving the next.
pub const STREAM_PIECE: u64 = 256 << 10;
/// Largest errno a reply may carry.
const MAX_ERRNO: u32 = 4095;
/// Longest violation report kept (the rest is cut).
const MAX_REPORT: usize = 200;

/// What a message asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Back-end → monitor, once, when it is ready: `arg` is its [`crate::Kind`].
    Hello = 1,
    /// Read `len` bytes at `offset` into the window at `window`.
    Read = 2,
    /// Write `len` bytes from the window at `window` to `offset`.
    Write = 3,
    /// Make every completed write durable.
    Flush = 4,
    /// Discard `len` bytes at `offset` (a hint; may do nothing).
    Discard = 5,
    /// Zero `len` bytes at `offset`; `arg` bit 0: the back-end may unmap them.
    WriteZeroes = 6,
    /// Send the frame of `len` bytes at `window` (a network back-end: to its tap).
    Transmit = 7,
    /// The `len` bytes at `window` are a receive slot the back-end may fill with one frame; it
    /// answers with [`Op::Received`] when it did.
    RxPost = 8,
    /// Set the tap's offloads to `arg` (`TUNSETOFFLOAD` flags).
    SetOffload = 9,
    /// Take the unix stream attached to this message (the one descriptor it carries) as vsock
    /// stream `offset`.
    SockAdopt = 10,
    /// Write what stream `offset` takes now of the `len` bytes at `window`; the reply's `len`
    /// says how many it took (`EAGAIN`: none).
    SockSend = 11,
    /// Read what stream `offset` has, up to `len` bytes, into the window at `window`; the
    /// reply's `len` says how many (0 with no errno: the peer closed; `EAGAIN`: nothing yet).
    /// With `arg` [`SOCK_READABLE`], a read that found the stream empty (`EAGAIN`, or fewer
    /// bytes than asked) also watches it for readability, as [`Op::SockWatch`] would, keeping
    /// what it was watched for besides.
    SockRecv = 12,
    /// Shut stream `offset` for writing (the guest will send no more).
    SockShutdown = 13,
    /// Close stream `offset`.
    SockClose = 14,
    /// Say once, with [`Op::SockReady`], when stream `offset` becomes readable or writable as
    /// `arg` ([`SOCK_READABLE`], [`SOCK_WRITABLE`]) asks; replaces the stream's last watch
    /// (`arg` 0: stop watching).
    SockWatch = 15,
    /// Back-end → monitor: request `id` finished; `arg` is 0 or the errno it failed with.
    Done = 0x80,
    /// Back-end → monitor: receive slot `id` holds a frame of `len` bytes.
    Received = 0x81,
    /// Back-end → monitor, unasked (`id` 0): watched stream `offset` is ready as `arg` says
    /// (a hang-up or error counts as both); its watch is spent.
    SockReady = 0x82,
}

/// [`Op::SockWatch`] / [`Op::SockReady`] bit: the stream has data (or its end) to read.
pub const SOCK_READABLE: u32 = 1;
/// [`Op::SockWatch`] / [`Op::SockReady`] bit: the stream takes data.
pub const SOCK_WRITABLE: u32 = 2;
const SOCK_EVENTS: u32 = SOCK_READABLE | SOCK_WRITABLE;

impl Op {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            5 => Op::Discard,
            6 => Op::WriteZeroes,
            7 => Op::Transmit,
            8 => Op::RxPost,
            9 => Op::SetOffload,
            10 => Op::SockAdopt,
            11 => Op::SockSend,
            12 => Op::SockRecv,
            13 => Op::SockShutdown,
            14 => Op::SockClose,
            15 => Op::SockWatch,
            0x80 => Op::Done,
            0x81 => Op::Received,
            0x82 => Op::SockReady,
            _ => return None,
        })
    }
}

/// `arg` bit of [`Op::WriteZeroes`].
pub const ZEROES_MAY_UNMAP: u32 = 1;

/// One message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    pub op: Op,
    pub id: u64,
    pub offset: u64,
    pub window: u64,
    pub len: u64,
    pub arg: u32,
}

/// Why a datagram is not a message, or not one the receiver may act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("a message of {0} bytes (every message is {MSG_LEN})")]
    Length(usize),
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    #[error("protocol version {0} (this monitor speaks {VERSION})")]
    Version(u16),
    #[error("unknown op {0:#x}")]
    UnknownOp(u16),
    #[error("reserved bits set")]
    Reserved,
    #[error("{op:?} with fields it must not have")]
    Fields { op: Op },
    #[error("{op:?} of {len} bytes at window offset {window} is outside the {size}-byte window")]
    OutsideWindow {
        op: Op,
        window: u64,
        len: u64,
        size: u64,
    },
    #[error("{op:?} reaches past the largest file offset")]
    Overflow { op: Op },
    #[error("the back-end reported: {0}")]
    Report(String),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Msg {
    pub fn new(op: Op, id: u64) -> Self {
        Self {
            op,
            id,
            offset: 0,
            window: 0,
            len: 0,
            arg: 0,
        }
    }

    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.window.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..44].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    /// Decodes one datagram and checks what holds for every message of its op: no field an op
    /// does not use is set, replies carry a plausible errno.
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if let Some(text) = b.strip_prefix(b"bulwark: seccomp: ") {
            let text: String = String::from_utf8_lossy(text)
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_REPORT)
                .collect();
            return Err(ProtoError::Report(format!("seccomp: {text}")));
        }
        if b.len() != MSG_LEN {
            return Err(ProtoError::Length(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(ProtoError::Magic(magic));
        }
        let version = u16_at(b, 4);
        if version != VERSION {
            return Err(ProtoError::Version(version));
        }
        let raw_op = u16_at(b, 6);
        let op = Op::from_u16(raw_op).ok_or(ProtoError::UnknownOp(raw_op))?;
        if u32_at(b, 44) != 0 {
            return Err(ProtoError::Reserved);
        }
        let m = Self {
            op,
            id: u64_at(b, 8),
            offset: u64_at(b, 16),
            window: u64_at(b, 24),
            len: u64_at(b, 32),
            arg: u32_at(b, 40),
        };
        let fields_ok = match op {
            Op::Hello => m.offset == 0 && m.window == 0 && m.len == 0 && m.id == 0,
            Op::Read | Op::Write => m.len > 0 && m.arg == 0,
            Op::Transmit | Op::RxPost => m.offset == 0 && m.len > 0 && m.arg == 0,
            Op::SetOffload => m.offset == 0 && m.window == 0 && m.len == 0,
            Op::Received => m.offset == 0 && m.window == 0 && m.len > 0 && m.arg == 0,
            Op::Flush => m.offset == 0 && m.window == 0 && m.len == 0 && m.arg == 0,
            Op::Discard => m.window == 0 && m.len > 0 && m.arg == 0,
            Op::WriteZeroes => m.window == 0 && m.len > 0 && m.arg & !ZEROES_MAY_UNMAP == 0,
            // `len` is checked against the request it answers (see `BackEnd::recv`).
            Op::Done => m.offset == 0 && m.window == 0 && m.arg <= MAX_ERRNO,
            Op::SockAdopt | Op::SockShutdown | Op::SockClose => {
                m.offset != 0 && m.window == 0 && m.len == 0 && m.arg == 0
            }
            Op::SockSend => m.offset != 0 && m.len > 0 && m.arg == 0,
            Op::SockRecv => m.offset != 0 && m.len > 0 && m.arg & !SOCK_READABLE == 0,
            Op::SockWatch => {
                m.offset != 0 && m.window == 0 && m.len == 0 && m.arg & !SOCK_EVENTS == 0
            }
            Op::SockReady => {
                m.id == 0
                    && m.offset != 0
                    && m.window == 0
                    && m.len == 0
                    && m.arg != 0
                    && m.arg & !SOCK_EVENTS == 0
            }
        };
        if !fields_ok {
            return Err(ProtoError::Fields { op });
        }
        if matches!(op, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes)
            && m.offset
                .checked_add(m.len)
                .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(ProtoError::Overflow { op });
        }
        Ok(m)
    }

    /// What a back-end checks before it acts on a request: it is a request (not a reply), and
    /// its data lies inside the `window_len`-byte window.
    pub fn check_request(&self, window_len: u64) -> Result<(), ProtoError> {
        match self.op {
            Op::Hello | Op::Done | Op::Received | Op::SockReady => {
                Err(ProtoError::Fields { op: self.op })
            }
            Op::Read | Op::Write | Op::Transmit | Op::RxPost | Op::SockSend | Op::SockRecv => {
                if self
                    .window
                    .checked_add(self.len)
                    .is_none_or(|e| e > window_len)
                {
                    Err(ProtoError::OutsideWindow {
                        op: self.op,
                        window: self.window,
                        len: self.len,
                        size: window_len,
                    })
                } else {
                    Ok(())
                }
            }
            Op::Flush
            | Op::Discard
            | Op::WriteZeroes
            | Op::SetOffload
            | Op::SockAdopt
            | Op::SockShutdown
            | Op::SockClose
            | Op::SockWatch => Ok(()),
        }
    }

    /// Whether the request borrows the window range it names (until its reply).
    pub fn lends_window(&self) -> bool {
        matches!(
            self.op,
            Op::Read | Op::Write | Op::Transmit | Op::RxPost | Op::SockSend | Op::SockRecv
        )
    }

    /// Whether a [`Op::SockRecv`] of `asked` bytes with [`SOCK_READABLE`] that ended as
    /// `result` left its stream watched for readability: it found the stream empty (and not at
    /// its end).
    pub fn recv_armed(asked: u64, result: &std::io::Result<usize>) -> bool {
        match result {
            Ok(n) => *n > 0 && (*n as u64) < asked,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }

    /// Whether a reply to this request may carry a byte count (at most the request's `len`).
    pub fn counts_bytes(&self) -> bool {
        matches!(self.op, Op::SockSend | Op::SockRecv)
    }

    /// The reply to request `id`: 0 for success, else the errno.
    pub fn done(id: u64, errno: u32) -> Self {
        Self {
            arg: errno.min(MAX_ERRNO),
            ..Self::new(Op::Done, id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Msg {
            op: Op::Write,
            id: 7,
            offset: 4096,
            window: 512,
            len: 1024,
            arg: 0,
        };
        assert_eq!(Msg::decode(&m.encode()), Ok(m));
        assert_eq!(Msg::decode(&Msg::done(9, 5).encode()), Ok(Msg::done(9, 5)));
    }

    #[test]
    fn malformed_messages_are_refused_by_name() {
        let good = Msg {
            op: Op::Read,
            id: 1,
            offset: 0,
            window: 0,
            len: 512,
            arg: 0,
        }
        .encode();
        assert_eq!(Msg::decode(&good[..47]), Err(ProtoError::Length(47)));
        let mut b = good;
        b[0] ^= 1;
        assert!(matches!(Msg::decode(&b), Err(ProtoError::Magic(_))));
        let mut b = good;
        b[4] = 1;
        assert_eq!(Msg::decode(&b), Err(ProtoError::Version(1)));
        let mut b = good;
        b[6] = 0x42;
        assert_eq!(Msg::decode(&b), Err(ProtoError::UnknownOp(0x42)));
        let mut b = good;
        b[47] = 1;
        assert_eq!(Msg::decode(&b), Err(ProtoError::Reserved));
        // A read of nothing; a flush with a length; an errno out of range; an end past 2^63.
        let mut m = Msg::decode(&good).unwrap();
        m.len = 0;
        assert!(matches!(
            Msg::decode(&m.encode()),
            Err(ProtoError::Fields { .. })
        ));
        let flush = Msg {
            len: 1,
            ..Msg::new(Op::Flush, 3)
        };
        assert!(Msg::decode(&flush.encode()).is_err());
        let mut done = Msg::done(1, 0);
        done.arg = 5000;
        assert!(Msg::decode(&done.encode()).is_err());
        let far = Msg {
            offset: u64::MAX - 10,
            ..Msg::decode(&good).unwrap()
        };
        assert!(matches!(
            Msg::decode(&far.encode()),
            Err(ProtoError::Overflow { .. })
        ));
    }

    #[test]
    fn stream_messages_name_a_stream_and_only_their_own_fields() {
        let send = Msg {
            offset: 5,
            window: 0,
            len: 4096,
            ..Msg::new(Op::SockSend, 2)
        };
        assert_eq!(Msg::decode(&send.encode()), Ok(send));
        assert_eq!(send.check_request(4096), Ok(()));
        assert!(send.check_request(4095).is_err(), "data outside the window");
        assert!(send.lends_window() && send.counts_bytes());
        let bad = [
            // Stream 0 does not exist; a watch for unknown events; news the monitor asked for
            // by id; news of nothing; an adopt with data.
            Msg { offset: 0, ..send },
            Msg {
                offset: 5,
                arg: 4,
                ..Msg::new(Op::SockWatch, 3)
            },
            Msg {
                offset: 5,
                arg: SOCK_READABLE,
                ..Msg::new(Op::SockReady, 3)
            },
            Msg {
                offset: 5,
                ..Msg::new(Op::SockReady, 0)
            },
            Msg {
                offset: 5,
                len: 1,
                ..Msg::new(Op::SockAdopt, 3)
            },
        ];
        for m in bad {
            assert!(
                matches!(Msg::decode(&m.encode()), Err(ProtoError::Fields { .. })),
                "{m:?}"
            );
        }
        let ready = Msg {
            offset: 5,
            arg: SOCK_READABLE | SOCK_WRITABLE,
            ..Msg::new(Op::SockReady, 0)
        };
        assert_eq!(Msg::decode(&ready.encode()), Ok(ready));
        assert!(ready.check_request(4096).is_err(), "news is not a request");
        // A reply may count bytes; whether it may is the request's business.
        let done = Msg {
            len: 100,
            ..Msg::done(2, 0)
        };
        assert_eq!(Msg::decode(&done.encode()), Ok(done));
        assert!(!Msg::new(Op::Write, 0).counts_bytes());
        // A read may ask to be watched afterwards; only a read that found the stream empty is.
        let recv = Msg {
            op: Op::SockRecv,
            arg: SOCK_READABLE,
            ..send
        };
        assert_eq!(Msg::decode(&recv.encode()), Ok(recv));
        let eagain = Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        assert!(Msg::recv_armed(4096, &Ok(100)) && Msg::recv_armed(4096, &eagain));
        assert!(
            !Msg::recv_armed(4096, &Ok(4096)),
            "a full read: more may be there"
        );
        assert!(!Msg::recv_armed(4096, &Ok(0)), "the stream's end");
        assert!(!Msg::recv_armed(4096, &Err(std::io::Error::other("reset"))));
    }

    #[test]
    fn requests_outside_the_window_are_refused() {
        let m = Msg {
            op: Op::Write,
            id: 1,
            offset: 0,
            window: 4096,
            len: 4096,
            arg: 0,
        };
        assert_eq!(m.check_request(8192), Ok(()));
        assert!(m.check_request(8191).is_err());
        let wrap = Msg {
            window: u64::MAX,
            ..m
        };
        assert!(wrap.check_request(u64::MAX).is_err());
        assert!(Msg::done(1, 0).check_request(8192).is_err());
    }

    #[test]
    fn violation_reports_are_recognised_and_cleaned() {
        let r = Msg::decode(b"bulwark: seccomp: the blk0 back-end made call 101 (ptrace)\x1b[2J\n");
        assert_eq!(
            r,
            Err(ProtoError::Report(
                "seccomp: the blk0 back-end made call 101 (ptrace)[2J".into()
            ))
        );
    }
}
