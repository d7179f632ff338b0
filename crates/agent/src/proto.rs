//! The agent protocol: a closed, versioned message enum with a hand-written codec.
//!
//! # Wire format (version 1)
//!
//! Every message is one frame; all integers are little-endian.
//!
//! ```text
//! frame  = len:u32  version:u8  kind:u8  body        len = 2 + body length, at most MAX_FRAME_LEN
//! bytes  = n:u32  n bytes
//! string = bytes, valid UTF-8
//! ```
//!
//! | kind | message        | body                                                               |
//! |------|----------------|--------------------------------------------------------------------|
//! | 1    | `Hello`        | `version:u8`                                                       |
//! | 2    | `ExecRequest`  | `argc:u32 argc×string  envc:u32 envc×(key:string value:string)  stdin:bytes  timeout_ms:u32` |
//! | 3    | `ExecResult`   | `status:i32  stdout:bytes  stderr:bytes  truncated:u8 (0 or 1)`   |
//! | 4    | `PsRequest`    | empty                                                              |
//! | 5    | `PsResult`     | `count:u32  count×(pid:u32 ppid:u32 uid:u32 state:u8 comm:string)` |
//! | 6    | `Error`        | `code:u16  message:string`                                         |
//!
//! The host sends requests (`Hello`, `ExecRequest`, `PsRequest`); the agent answers each with
//! exactly one reply (`Hello`, `ExecResult`, `PsResult`, or `Error`), in order, on the same
//! connection. Error codes are in [`error_code`].
//!
//! # Decoding rules
//!
//! The encoding is canonical: a frame decodes only if it is exactly what [`encode`] produces
//! for the decoded message (no trailing bytes, booleans 0 or 1), so `encode(decode(f)) == f`.
//! Each way a frame can be wrong is its own [`ProtoError`] variant. Decoding never panics, and
//! never allocates on the word of a length or count field: counts are checked against the bytes
//! actually left in the frame first, and [`read_message`] reads a body as it arrives instead of
//! reserving the announced length.

use std::io::{self, Read, Write};

/// The protocol version this build speaks, carried in every frame's version byte.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest accepted value of a frame's length field (version + kind + body), 16 MiB. Either side
/// refuses larger frames, so a peer cannot make the other allocate more than this per message.
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Bytes before the body that the length field does not count.
const LEN_FIELD: usize = 4;
/// Bytes the length field does count before the body: version and kind.
const HEADER_AFTER_LEN: usize = 2;

/// Codes carried by [`Message::Error`]. The host can match on them; the message text is for
/// people.
pub mod error_code {
    /// The request frame could not be decoded; the agent closes the connection after replying.
    pub const MALFORMED_FRAME: u16 = 1;
    /// The frame was well formed but is not a request (e.g. the host sent an `ExecResult`).
    pub const UNEXPECTED_MESSAGE: u16 = 2;
    /// The request is well formed but cannot be carried out as given (e.g. an empty argv).
    pub const INVALID_REQUEST: u16 = 3;
    /// The agent failed while serving a valid request (an I/O error, a reply too large).
    pub const INTERNAL: u16 = 4;
    /// The command could not be started (not found, not executable); as in a shell, 127.
    pub const SPAWN_FAILED: u16 = 127;
}

/// Message kinds: the second byte after the length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::ExecRequest`].
    ExecRequest = 2,
    /// [`Message::ExecResult`].
    ExecResult = 3,
    /// [`Message::PsRequest`].
    PsRequest = 4,
    /// [`Message::PsResult`].
    PsResult = 5,
    /// [`Message::Error`].
    Error = 6,
}

impl Kind {
    /// The kind for a wire byte, or `None` if this version does not define it.
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Hello,
            2 => Self::ExecRequest,
            3 => Self::ExecResult,
            4 => Self::PsRequest,
            5 => Self::PsResult,
            6 => Self::Error,
            _ => return None,
        })
    }

    /// The message name, for error texts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "Hello",
            Self::ExecRequest => "ExecRequest",
            Self::ExecResult => "ExecResult",
            Self::PsRequest => "PsRequest",
            Self::PsResult => "PsResult",
            Self::Error => "Error",
        }
    }
}

/// Run a command in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the agent's `PATH`. Must not be empty.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the agent's environment.
    pub env: Vec<(String, String)>,
    /// Bytes written to the command's stdin, which is then closed.
    pub stdin: Vec<u8>,
    /// Kill the command (and its process group) after this many milliseconds; 0 means never.
    pub timeout_ms: u32,
}

/// How a command ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecResult {
    /// The exit code, or 128 + the signal number if a signal ended it (137 after a timeout).
    pub status: i32,
    /// Captured stdout, at most the agent's per-stream cap.
    pub stdout: Vec<u8>,
    /// Captured stderr, at most the agent's per-stream cap.
    pub stderr: Vec<u8>,
    /// Whether either stream produced more than the cap (the excess was read and discarded).
    pub truncated: bool,
}

/// One process, as read from `/proc/[pid]/stat` and `/proc/[pid]/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Proc {
    /// Process id.
    pub pid: u32,
    /// Parent process id (0 for the init process and kernel threads' root).
    pub ppid: u32,
    /// Real user id (first field of the `Uid:` line).
    pub uid: u32,
    /// The command name (`comm`, at most 15 bytes for most tasks; not UTF-8-checked by the
    /// kernel, so the agent replaces invalid bytes).
    pub comm: String,
    /// The state letter from `/proc/[pid]/stat` as an ASCII byte, e.g. `b'R'`, `b'S'`, `b'Z'`.
    pub state: u8,
}

/// Every message of protocol version 1. The set is closed: an unknown kind is a decode error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Optional handshake: the host sends its version, the agent answers with its own.
    Hello {
        /// The sender's protocol version.
        version: u8,
    },
    /// Host → agent: run a command.
    ExecRequest(ExecRequest),
    /// Agent → host: the command ran (whatever its exit status).
    ExecResult(ExecResult),
    /// Host → agent: list processes.
    PsRequest,
    /// Agent → host: the process list, sorted by pid.
    PsResult {
        /// One entry per process the agent could read.
        procs: Vec<Proc>,
    },
    /// Agent → host: the request failed; see [`error_code`].
    Error {
        /// What failed, from [`error_code`].
        code: u16,
        /// A human-readable explanation naming what failed.
        message: String,
    },
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello { .. } => Kind::Hello,
            Self::ExecRequest(_) => Kind::ExecRequest,
            Self::ExecResult(_) => Kind::ExecResult,
            Self::PsRequest => Kind::PsRequest,
            Self::PsResult { .. } => Kind::PsResult,
            Self::Error { .. } => Kind::Error,
        }
    }
}

/// Why a frame could not be decoded (or a message not encoded, or a stream not read).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length field exceeds [`MAX_FRAME_LEN`] (or a message would encode past it).
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLong {
        /// The announced (or required) frame length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The length field is too small to hold even the version and kind bytes.
    #[error("frame length {len} is too short: the version and kind bytes alone need 2")]
    TooShort {
        /// The announced frame length.
        len: u32,
    },
    /// The input ends before the frame does (a short buffer, or a stream closed mid-frame).
    #[error("frame incomplete: need {need} bytes, have {have}")]
    Incomplete {
        /// Bytes the frame needs, length field included.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The version byte is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {version}: this build speaks version 1")]
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The kind byte names no message of this version.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// The kind byte received.
        kind: u8,
    },
    /// The body ends inside a field.
    #[error("{field} is truncated: needs {need} bytes, the frame has {have} left")]
    Truncated {
        /// Which field, as `Message.field`.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the frame.
        have: usize,
    },
    /// A count announces more elements than the rest of the frame could hold.
    #[error(
        "{field} count {count} cannot fit: each entry needs at least {min_entry} bytes and the \
         frame has {have} left"
    )]
    CountTooLarge {
        /// Which list, as `Message.field`.
        field: &'static str,
        /// The announced count.
        count: u32,
        /// Smallest encoding of one entry.
        min_entry: usize,
        /// Bytes left in the frame.
        have: usize,
    },
    /// A string field holds bytes that are not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which field, as `Message.field`.
        field: &'static str,
        /// Where the UTF-8 check failed.
        #[source]
        source: std::str::Utf8Error,
    },
    /// A boolean field holds something other than 0 or 1.
    #[error("{field} must be 0 or 1, got {value}")]
    InvalidBool {
        /// Which field, as `Message.field`.
        field: &'static str,
        /// The byte received.
        value: u8,
    },
    /// The body is longer than its message.
    #[error("{kind} message has {extra} trailing bytes after its last field")]
    TrailingBytes {
        /// The message name.
        kind: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// Reading or writing the stream failed.
    #[error("agent connection I/O failed")]
    Io(#[source] io::Error),
}

/// Number of bytes [`encode`] produces for `message`, computed without encoding it.
pub fn encoded_len(message: &Message) -> usize {
    fn bytes(b: &[u8]) -> usize {
        4 + b.len()
    }
    let body = match message {
        Message::Hello { .. } => 1,
        Message::ExecRequest(req) => {
            4 + req.argv.iter().map(|a| bytes(a.as_bytes())).sum::<usize>()
                + 4
                + req
                    .env
                    .iter()
                    .map(|(k, v)| bytes(k.as_bytes()) + bytes(v.as_bytes()))
                    .sum::<usize>()
                + bytes(&req.stdin)
                + 4
        }
        Message::ExecResult(res) => 4 + bytes(&res.stdout) + bytes(&res.stderr) + 1,
        Message::PsRequest => 0,
        Message::PsResult { procs } => {
            4 + procs
                .iter()
                .map(|p| PROC_FIXED_LEN + bytes(p.comm.as_bytes()))
                .sum::<usize>()
        }
        Message::Error { message, .. } => 2 + bytes(message.as_bytes()),
    };
    LEN_FIELD + HEADER_AFTER_LEN + body
}

/// pid, ppid, uid, state: the fixed part of one [`Proc`] entry.
const PROC_FIXED_LEN: usize = 4 + 4 + 4 + 1;

/// Encodes `message` as one frame, length field included.
///
/// Fails with [`ProtoError::TooLong`] (before allocating) if the frame would exceed
/// [`MAX_FRAME_LEN`], which the peer would refuse; so every field length fits its `u32`.
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtoError> {
    let total = encoded_len(message);
    let frame_len = total - LEN_FIELD;
    if frame_len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLong {
            len: frame_len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(total);
    put_len(&mut out, frame_len);
    out.push(PROTOCOL_VERSION);
    out.push(message.kind() as u8);
    match message {
        Message::Hello { version } => out.push(*version),
        Message::ExecRequest(req) => {
            put_len(&mut out, req.argv.len());
            for arg in &req.argv {
                put_bytes(&mut out, arg.as_bytes());
            }
            put_len(&mut out, req.env.len());
            for (key, value) in &req.env {
                put_bytes(&mut out, key.as_bytes());
                put_bytes(&mut out, value.as_bytes());
            }
            put_bytes(&mut out, &req.stdin);
            out.extend_from_slice(&req.timeout_ms.to_le_bytes());
        }
        Message::ExecResult(res) => {
            out.extend_from_slice(&res.status.to_le_bytes());
            put_bytes(&mut out, &res.stdout);
            put_bytes(&mut out, &res.stderr);
            out.push(u8::from(res.truncated));
        }
        Message::PsRequest => {}
        Message::PsResult { procs } => {
            put_len(&mut out, procs.len());
            for p in procs {
                out.extend_from_slice(&p.pid.to_le_bytes());
                out.extend_from_slice(&p.ppid.to_le_bytes());
                out.extend_from_slice(&p.uid.to_le_bytes());
                out.push(p.state);
                put_bytes(&mut out, p.comm.as_bytes());
            }
        }
        Message::Error { code, message } => {
            out.extend_from_slice(&code.to_le_bytes());
            put_bytes(&mut out, message.as_bytes());
        }
    }
    debug_assert_eq!(out.len(), total, "encoded_len disagrees with encode");
    Ok(out)
}

/// Appends a length or count. `encode` checked the whole frame against [`MAX_FRAME_LEN`] first,
/// so `n` always fits; the saturation is never reached.
fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Decodes the frame at the start of `input`, returning the message and the bytes it took
/// (`input` may hold more frames after it).
///
/// Checks, in order: at least the length field present ([`ProtoError::Incomplete`]), length at
/// most [`MAX_FRAME_LEN`] ([`ProtoError::TooLong`]) and at least 2 ([`ProtoError::TooShort`]),
/// the whole frame present ([`ProtoError::Incomplete`]), version, kind, then the body.
pub fn decode(input: &[u8]) -> Result<(Message, usize), ProtoError> {
    let frame_len = frame_len(input)?;
    let need = LEN_FIELD + frame_len;
    let frame = input.get(LEN_FIELD..need).ok_or(ProtoError::Incomplete {
        need,
        have: input.len(),
    })?;
    let (&version, rest) = frame.split_first().ok_or(ProtoError::TooShort { len: 0 })?;
    let (&kind, body) = rest.split_first().ok_or(ProtoError::TooShort { len: 1 })?;
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion { version });
    }
    let kind = Kind::from_byte(kind).ok_or(ProtoError::UnknownKind { kind })?;
    let mut body = Body { rest: body };
    let message = match kind {
        Kind::Hello => Message::Hello {
            version: body.u8("Hello.version")?,
        },
        Kind::ExecRequest => Message::ExecRequest(decode_exec_request(&mut body)?),
        Kind::ExecResult => Message::ExecResult(ExecResult {
            status: i32::from_le_bytes(body.array("ExecResult.status")?),
            stdout: body.bytes("ExecResult.stdout")?.to_vec(),
            stderr: body.bytes("ExecResult.stderr")?.to_vec(),
            truncated: body.bool("ExecResult.truncated")?,
        }),
        Kind::PsRequest => Message::PsRequest,
        Kind::PsResult => {
            let count = body.count("PsResult.procs", PROC_FIXED_LEN + 4)?;
            let mut procs = Vec::new();
            for _ in 0..count {
                procs.push(Proc {
                    pid: body.u32("PsResult.procs.pid")?,
                    ppid: body.u32("PsResult.procs.ppid")?,
                    uid: body.u32("PsResult.procs.uid")?,
                    state: body.u8("PsResult.procs.state")?,
                    comm: body.string("PsResult.procs.comm")?,
                });
            }
            Message::PsResult { procs }
        }
        Kind::Error => Message::Error {
            code: u16::from_le_bytes(body.array("Error.code")?),
            message: body.string("Error.message")?,
        },
    };
    if !body.rest.is_empty() {
        return Err(ProtoError::TrailingBytes {
            kind: kind.name(),
            extra: body.rest.len(),
        });
    }
    Ok((message, need))
}

fn decode_exec_request(body: &mut Body<'_>) -> Result<ExecRequest, ProtoError> {
    let argc = body.count("ExecRequest.argv", 4)?;
    let mut argv = Vec::new();
    for _ in 0..argc {
        argv.push(body.string("ExecRequest.argv")?);
    }
    let envc = body.count("ExecRequest.env", 8)?;
    let mut env = Vec::new();
    for _ in 0..envc {
        let key = body.string("ExecRequest.env.key")?;
        let value = body.string("ExecRequest.env.value")?;
        env.push((key, value));
    }
    Ok(ExecRequest {
        argv,
        env,
        stdin: body.bytes("ExecRequest.stdin")?.to_vec(),
        timeout_ms: body.u32("ExecRequest.timeout_ms")?,
    })
}

/// Reads and checks the length field at the start of `input`.
fn frame_len(input: &[u8]) -> Result<usize, ProtoError> {
    let field: [u8; LEN_FIELD] = input
        .get(..LEN_FIELD)
        .and_then(|b| b.try_into().ok())
        .ok_or(ProtoError::Incomplete {
            need: LEN_FIELD,
            have: input.len(),
        })?;
    let len = u32::from_le_bytes(field);
    // A u32 always fits in usize on the 64-bit hosts and guests bulwark supports; saturating
    // keeps a hypothetical 16-bit target on the TooLong path.
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > MAX_FRAME_LEN {
        return Err(ProtoError::TooLong {
            len: len_usize,
            max: MAX_FRAME_LEN,
        });
    }
    if len_usize < HEADER_AFTER_LEN {
        return Err(ProtoError::TooShort { len });
    }
    Ok(len_usize)
}

/// A cursor over the unread part of a frame body. Every read checks the bytes left first.
struct Body<'a> {
    rest: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.rest.len() {
            return Err(ProtoError::Truncated {
                field,
                need: n,
                have: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtoError> {
        let bytes = self.take(field, N)?;
        // `take` returned exactly N bytes.
        bytes.try_into().map_err(|_| ProtoError::Truncated {
            field,
            need: N,
            have: bytes.len(),
        })
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ProtoError::InvalidBool { field, value }),
        }
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let len = self.u32(field)?;
        self.take(field, usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn string(&mut self, field: &'static str) -> Result<String, ProtoError> {
        let bytes = self.bytes(field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|source| ProtoError::InvalidUtf8 { field, source })
    }

    /// Reads a list count and checks that `count` entries of at least `min_entry` bytes each
    /// fit in what is left, so the caller never loops (or allocates) past the frame.
    fn count(&mut self, field: &'static str, min_entry: usize) -> Result<usize, ProtoError> {
        let count = self.u32(field)?;
        let have = self.rest.len();
        usize::try_from(count)
            .ok()
            .filter(|c| c.checked_mul(min_entry).is_some_and(|n| n <= have))
            .ok_or(ProtoError::CountTooLarge {
                field,
                count,
                min_entry,
                have,
            })
    }
}

/// Reads one frame from a stream and decodes it.
///
/// Returns `Ok(None)` if the stream ends cleanly before the first byte of a frame (the peer is
/// done), [`ProtoError::Incomplete`] if it ends inside one. The body buffer grows as bytes
/// arrive, so a peer announcing a large frame and sending little costs little.
pub fn read_message<R: Read>(reader: &mut R) -> Result<Option<Message>, ProtoError> {
    let mut len_field = [0u8; LEN_FIELD];
    let mut have = 0;
    while have < LEN_FIELD {
        match reader.read(&mut len_field[have..]) {
            Ok(0) if have == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtoError::Incomplete {
                    need: LEN_FIELD,
                    have,
                });
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    let frame_len = frame_len(&len_field)?;
    let need = LEN_FIELD + frame_len;
    let mut frame = Vec::with_capacity(LEN_FIELD + HEADER_AFTER_LEN);
    frame.extend_from_slice(&len_field);
    // `frame_len` is at most MAX_FRAME_LEN, so it fits in u64.
    let limit = u64::try_from(frame_len).unwrap_or(u64::MAX);
    reader
        .by_ref()
        .take(limit)
        .read_to_end(&mut frame)
        .map_err(ProtoError::Io)?;
    if frame.len() < need {
        return Err(ProtoError::Incomplete {
            need,
            have: frame.len(),
        });
    }
    decode(&frame).map(|(message, _)| Some(message))
}

/// Encodes `message` and writes it as one frame, then flushes.
pub fn write_message<W: Write>(writer: &mut W, message: &Message) -> Result<(), ProtoError> {
    let frame = encode(message)?;
    writer.write_all(&frame).map_err(ProtoError::Io)?;
    writer.flush().map_err(ProtoError::Io)
}

/// Fuzz harness body (`fuzz/fuzz_targets/agent_proto.rs`, replayed by `tests/fuzz_corpus.rs`).
///
/// Decodes `data`; on success asserts that the encoding is canonical (re-encoding gives back the
/// exact frame, and decoding that gives the same message), that [`encoded_len`] agrees, and
/// that the stream reader [`read_message`] reaches the same verdict as [`decode`]. Panics only
/// if one of those invariants is broken.
pub fn fuzz_decode(data: &[u8]) {
    let from_slice = decode(data);
    let from_stream = read_message(&mut io::Cursor::new(data));
    match from_slice {
        Ok((message, consumed)) => {
            assert!(consumed <= data.len(), "decode consumed past its input");
            let frame = encode(&message).expect("a decoded message re-encodes");
            assert_eq!(encoded_len(&message), frame.len(), "encoded_len is exact");
            assert_eq!(frame, data[..consumed], "the encoding is canonical");
            let (again, again_len) = decode(&frame).expect("an encoded message decodes");
            assert_eq!(again, message, "decode(encode(m)) == m");
            assert_eq!(again_len, frame.len());
            match from_stream {
                Ok(Some(streamed)) => assert_eq!(streamed, message, "stream and slice agree"),
                other => panic!("slice decoded {message:?} but stream gave {other:?}"),
            }
        }
        Err(slice_error) => match from_stream {
            Ok(None) => assert!(data.is_empty(), "stream saw EOF on non-empty input"),
            Ok(Some(m)) => panic!("slice failed ({slice_error}) but stream decoded {m:?}"),
            Err(stream_error) => assert_eq!(
                stream_error.to_string(),
                slice_error.to_string(),
                "stream and slice fail the same way"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello { version: 1 },
            Message::ExecRequest(ExecRequest::default()),
            Message::ExecRequest(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo héllo; exit 3".into()],
                env: vec![("A".into(), "1".into()), ("EMPTY".into(), String::new())],
                stdin: b"in\0put".to_vec(),
                timeout_ms: 1500,
            }),
            Message::ExecResult(ExecResult {
                status: -1,
                stdout: vec![0; 300],
                stderr: b"err".to_vec(),
                truncated: true,
            }),
            Message::ExecResult(ExecResult::default()),
            Message::PsRequest,
            Message::PsResult { procs: vec![] },
            Message::PsResult {
                procs: vec![
                    Proc {
                        pid: 1,
                        ppid: 0,
                        uid: 0,
                        comm: "init".into(),
                        state: b'S',
                    },
                    Proc {
                        pid: 4_000_000,
                        ppid: 1,
                        uid: 65534,
                        comm: "a) (b c".into(),
                        state: b'Z',
                    },
                ],
            },
            Message::Error {
                code: error_code::SPAWN_FAILED,
                message: "cannot run \"nope\"".into(),
            },
        ]
    }

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(body.len() + 2)
            .unwrap()
            .to_le_bytes()
            .to_vec();
        out.push(PROTOCOL_VERSION);
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn encode_then_decode_every_message_round_trips() {
        for message in every_message() {
            let bytes = encode(&message).unwrap();
            assert_eq!(bytes.len(), encoded_len(&message));
            let (decoded, consumed) = decode(&bytes).unwrap();
            assert_eq!(decoded, message);
            assert_eq!(consumed, bytes.len());
            fuzz_decode(&bytes);
        }
    }

    #[test]
    fn encode_matches_the_documented_wire_layout() {
        let message = Message::ExecRequest(ExecRequest {
            argv: vec!["ls".into()],
            env: vec![("A".into(), "b".into())],
            stdin: b"x".to_vec(),
            timeout_ms: 5,
        });
        #[rustfmt::skip]
        let expected: &[u8] = &[
            35, 0, 0, 0,                // length of what follows
            1, 2,                       // version 1, kind ExecRequest
            1, 0, 0, 0, 2, 0, 0, 0, b'l', b's', // argv: 1 × "ls"
            1, 0, 0, 0, 1, 0, 0, 0, b'A', 1, 0, 0, 0, b'b', // env: 1 × ("A", "b")
            1, 0, 0, 0, b'x',           // stdin
            5, 0, 0, 0,                 // timeout_ms
        ];
        assert_eq!(encode(&message).unwrap(), expected);
        let message = Message::PsResult {
            procs: vec![Proc {
                pid: 2,
                ppid: 1,
                uid: 3,
                comm: "sh".into(),
                state: b'S',
            }],
        };
        #[rustfmt::skip]
        let expected: &[u8] = &[
            25, 0, 0, 0, 1, 5,
            1, 0, 0, 0,                 // one process
            2, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, b'S', 2, 0, 0, 0, b's', b'h',
        ];
        assert_eq!(encode(&message).unwrap(), expected);
        let message = Message::Error {
            code: 0x0102,
            message: "e".into(),
        };
        assert_eq!(
            encode(&message).unwrap(),
            [9, 0, 0, 0, 1, 6, 2, 1, 1, 0, 0, 0, b'e']
        );
    }

    #[test]
    fn decode_two_frames_in_one_buffer_reports_first_length() {
        let mut bytes = encode(&Message::PsRequest).unwrap();
        let first = bytes.len();
        bytes.extend(encode(&Message::Hello { version: 1 }).unwrap());
        let (message, consumed) = decode(&bytes).unwrap();
        assert_eq!((message, consumed), (Message::PsRequest, first));
        let (second, _) = decode(&bytes[consumed..]).unwrap();
        assert_eq!(second, Message::Hello { version: 1 });
    }

    #[test]
    fn stream_of_messages_reads_each_then_none() {
        let mut bytes = Vec::new();
        for message in every_message() {
            write_message(&mut bytes, &message).unwrap();
        }
        let mut reader = io::Cursor::new(bytes);
        for message in every_message() {
            assert_eq!(read_message(&mut reader).unwrap(), Some(message));
        }
        assert!(read_message(&mut reader).unwrap().is_none());
    }

    #[test]
    fn decode_short_length_field_is_incomplete() {
        let err = decode(&[5, 0]).unwrap_err();
        assert!(
            matches!(err, ProtoError::Incomplete { need: 4, have: 2 }),
            "{err}"
        );
    }

    #[test]
    fn decode_length_above_max_is_too_long() {
        let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend([1, 4]);
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, ProtoError::TooLong { .. }), "{err}");
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    }

    #[test]
    fn read_message_huge_length_is_refused_without_reading_or_allocating() {
        // The reader yields the length field and then would serve 4 GiB of zeros; the decoder
        // must refuse on the length alone, reading nothing past it.
        let mut reader = io::Cursor::new(u32::MAX.to_le_bytes()).chain(io::repeat(0));
        let err = read_message(&mut reader).unwrap_err();
        assert!(
            matches!(err, ProtoError::TooLong { len, .. } if len == u32::MAX as usize),
            "{err}"
        );
    }

    #[test]
    fn read_message_large_length_with_little_data_allocates_only_what_arrives() {
        let mut bytes = u32::try_from(MAX_FRAME_LEN).unwrap().to_le_bytes().to_vec();
        bytes.extend([1, 4, 0, 0]);
        let err = read_message(&mut io::Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, ProtoError::Incomplete { have: 8, .. }),
            "{err}"
        );
    }

    #[test]
    fn decode_length_below_header_is_too_short() {
        let err = decode(&[1, 0, 0, 0, 1]).unwrap_err();
        assert!(matches!(err, ProtoError::TooShort { len: 1 }), "{err}");
    }

    #[test]
    fn decode_frame_longer_than_input_is_incomplete() {
        let mut bytes = encode(&Message::Hello { version: 1 }).unwrap();
        bytes.pop();
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(err, ProtoError::Incomplete { need: 7, have: 6 }),
            "{err}"
        );
    }

    #[test]
    fn read_message_stream_closed_mid_frame_is_incomplete() {
        let mut bytes = encode(&Message::Hello { version: 1 }).unwrap();
        bytes.pop();
        let err = read_message(&mut io::Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, ProtoError::Incomplete { need: 7, have: 6 }),
            "{err}"
        );
        let err = read_message(&mut io::Cursor::new([3u8, 0])).unwrap_err();
        assert!(
            matches!(err, ProtoError::Incomplete { need: 4, have: 2 }),
            "{err}"
        );
    }

    #[test]
    fn decode_other_version_is_unsupported() {
        let mut bytes = frame(4, &[]);
        bytes[4] = 2;
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(err, ProtoError::UnsupportedVersion { version: 2 }),
            "{err}"
        );
    }

    #[test]
    fn decode_unknown_kind_is_refused() {
        for kind in [0, 7, 255] {
            let err = decode(&frame(kind, &[])).unwrap_err();
            assert!(
                matches!(err, ProtoError::UnknownKind { kind: k } if k == kind),
                "{err}"
            );
        }
    }

    #[test]
    fn decode_body_ending_inside_a_field_is_truncated() {
        // Hello without its version byte.
        let err = decode(&frame(1, &[])).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Truncated {
                    field: "Hello.version",
                    need: 1,
                    have: 0
                }
            ),
            "{err}"
        );
        // ExecResult whose stdout announces 10 bytes and carries 3.
        let mut body = 0i32.to_le_bytes().to_vec();
        body.extend(10u32.to_le_bytes());
        body.extend(b"abc");
        let err = decode(&frame(3, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Truncated {
                    field: "ExecResult.stdout",
                    need: 10,
                    have: 3
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn decode_trailing_bytes_are_refused() {
        let err = decode(&frame(4, &[0])).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::TrailingBytes {
                    kind: "PsRequest",
                    extra: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn decode_invalid_utf8_string_is_refused() {
        let mut body = 1u16.to_le_bytes().to_vec();
        body.extend(2u32.to_le_bytes());
        body.extend([0xff, 0xfe]);
        let err = decode(&frame(6, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::InvalidUtf8 {
                    field: "Error.message",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn decode_count_beyond_remaining_bytes_is_refused_before_allocating() {
        // argv claims 4 billion strings in a frame with 8 bytes left.
        let mut body = u32::MAX.to_le_bytes().to_vec();
        body.extend([0; 8]);
        let err = decode(&frame(2, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::CountTooLarge {
                    field: "ExecRequest.argv",
                    count: u32::MAX,
                    have: 8,
                    ..
                }
            ),
            "{err}"
        );
        // PsResult claims one entry with fewer bytes than the smallest entry.
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend([0; PROC_FIXED_LEN + 3]);
        let err = decode(&frame(5, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::CountTooLarge {
                    field: "PsResult.procs",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn decode_bool_other_than_zero_or_one_is_refused() {
        let mut bytes = encode(&Message::ExecResult(ExecResult::default())).unwrap();
        *bytes.last_mut().unwrap() = 2;
        let err = decode(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::InvalidBool {
                    field: "ExecResult.truncated",
                    value: 2
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn encode_message_beyond_max_frame_is_refused() {
        let message = Message::ExecRequest(ExecRequest {
            argv: vec!["cat".into()],
            stdin: vec![0; MAX_FRAME_LEN],
            ..ExecRequest::default()
        });
        let err = encode(&message).unwrap_err();
        assert!(matches!(err, ProtoError::TooLong { .. }), "{err}");
        let mut sink = Vec::new();
        assert!(write_message(&mut sink, &message).is_err());
        assert!(sink.is_empty(), "nothing written for a refused message");
    }

    #[test]
    fn every_prefix_of_every_message_fails_cleanly() {
        for message in every_message() {
            let bytes = encode(&message).unwrap();
            for end in 0..bytes.len() {
                assert!(decode(&bytes[..end]).is_err());
                fuzz_decode(&bytes[..end]);
            }
        }
    }
}
