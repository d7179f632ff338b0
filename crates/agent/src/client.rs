//! The host side: send a request, read the one reply, and map it to a typed result.
//!
//! The functions work over any `Read + Write` stream to the agent. With Firecracker or Cloud
//! Hypervisor the guest's vsock device is a unix socket on the host;
//! [`connect_vsock_uds`] performs their host-initiated handshake on it:
//!
//! ```text
//! host → VMM:  "CONNECT <port>\n"
//! VMM → host:  "OK <host-side port>\n"     (then the stream is connected to the guest port)
//! ```
//!
//! If nothing listens on the guest port, the VMM closes the connection instead.
//!
//! Replies come from the guest, so they are decoded as untrusted input: bounded by
//! [`MAX_FRAME_LEN`](crate::proto::MAX_FRAME_LEN), every failure a [`ClientError`] variant.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{self, ExecRequest, ExecResult, Kind, Message, Proc, ProtoError};

/// How long [`connect_vsock_uds`] waits for the VMM's handshake reply.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest handshake reply accepted: `OK 4294967295\n` is 14 bytes.
const HANDSHAKE_REPLY_MAX: usize = 32;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM's vsock unix socket could not be connected to.
    #[error("cannot connect to the VM's vsock socket {path}; is the VM running with vsock?")]
    Connect {
        /// The unix socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the `CONNECT` line or reading the reply failed (including the timeout).
    #[error("vsock handshake on {path} for guest port {port} failed")]
    HandshakeIo {
        /// The unix socket path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The VMM closed the socket instead of answering `OK`.
    #[error(
        "{path} closed the connection during the vsock handshake for port {port} (received \
         {received:?}); no agent listening on guest vsock port {port}?"
    )]
    HandshakeClosed {
        /// The unix socket path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// What arrived before the close, lossily decoded.
        received: String,
    },
    /// The VMM answered something other than `OK <port>\n`.
    #[error(
        "{path} answered {reply:?} to `CONNECT {port}`, expected \"OK <port>\\n\"; is this a \
         Firecracker-style vsock socket?"
    )]
    HandshakeRejected {
        /// The unix socket path.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// The reply, lossily decoded (at most a few dozen bytes).
        reply: String,
    },
    /// The request could not be sent or the reply not read or decoded.
    #[error("agent protocol error")]
    Proto(#[from] ProtoError),
    /// The agent closed the connection instead of replying (it does so after a malformed
    /// frame, or it exited).
    #[error("the agent closed the connection without replying to {request}")]
    Closed {
        /// The request sent.
        request: &'static str,
    },
    /// The agent replied with an `Error` message.
    #[error("the agent refused {request} (error {code}): {message}")]
    Agent {
        /// The request sent.
        request: &'static str,
        /// The code, from [`proto::error_code`].
        code: u16,
        /// The agent's explanation.
        message: String,
    },
    /// The agent replied with a message that does not answer the request.
    #[error("the agent answered {request} with {reply}; is the stream out of step?")]
    UnexpectedReply {
        /// The request sent.
        request: &'static str,
        /// The kind of the reply received.
        reply: &'static str,
    },
}

/// Runs `argv` in the guest with `env` added to the agent's environment and `stdin` as input,
/// killing it (and its process group) after `timeout` if given. Returns how it ended and its
/// output; a command that ran and failed is still `Ok` (see [`ExecResult::status`]). A command
/// that cannot be started is [`ClientError::Agent`] with code
/// [`SPAWN_FAILED`](proto::error_code::SPAWN_FAILED).
pub fn exec<S: Read + Write>(
    stream: &mut S,
    argv: &[&str],
    env: &[(&str, &str)],
    stdin: &[u8],
    timeout: Option<Duration>,
) -> Result<ExecResult, ClientError> {
    let request = Message::ExecRequest(ExecRequest {
        argv: argv.iter().map(|&a| a.to_owned()).collect(),
        env: env
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        stdin: stdin.to_vec(),
        timeout_ms: timeout.map_or(0, timeout_ms),
    });
    match round_trip(stream, &request)? {
        Message::ExecResult(result) => Ok(result),
        other => Err(unexpected(Kind::ExecRequest, &other)),
    }
}

/// Lists the guest's processes, sorted by pid.
pub fn ps<S: Read + Write>(stream: &mut S) -> Result<Vec<Proc>, ClientError> {
    match round_trip(stream, &Message::PsRequest)? {
        Message::PsResult { procs } => Ok(procs),
        other => Err(unexpected(Kind::PsRequest, &other)),
    }
}

/// Exchanges `Hello` messages; returns the agent's protocol version.
pub fn hello<S: Read + Write>(stream: &mut S) -> Result<u8, ClientError> {
    let request = Message::Hello {
        version: proto::PROTOCOL_VERSION,
    };
    match round_trip(stream, &request)? {
        Message::Hello { version } => Ok(version),
        other => Err(unexpected(Kind::Hello, &other)),
    }
}

/// `timeout` in whole milliseconds, rounded up (so a non-zero timeout never becomes 0, which
/// would mean none) and capped at `u32::MAX` (about 49 days).
fn timeout_ms(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// Sends `request` and reads one reply; an `Error` reply becomes [`ClientError::Agent`].
fn round_trip<S: Read + Write>(stream: &mut S, request: &Message) -> Result<Message, ClientError> {
    let name = request.kind().name();
    proto::write_message(stream, request)?;
    match proto::read_message(stream)? {
        None => Err(ClientError::Closed { request: name }),
        Some(Message::Error { code, message }) => Err(ClientError::Agent {
            request: name,
            code,
            message,
        }),
        Some(reply) => Ok(reply),
    }
}

fn unexpected(request: Kind, reply: &Message) -> ClientError {
    ClientError::UnexpectedReply {
        request: request.name(),
        reply: reply.kind().name(),
    }
}

/// Connects to guest vsock `port` through the VMM's host-side unix socket at `socket_path`
/// (Firecracker's `uds_path`), doing the `CONNECT <port>\n` / `OK <n>\n` handshake. The
/// returned stream talks to the agent directly.
///
/// The reply is read one byte at a time, so nothing after its newline — the agent's first
/// bytes — is consumed. The handshake waits at most [`HANDSHAKE_TIMEOUT`]; the returned stream
/// has no timeout set.
pub fn connect_vsock_uds(socket_path: &Path, port: u32) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(socket_path).map_err(|source| ClientError::Connect {
        path: socket_path.to_owned(),
        source,
    })?;
    let io_error = |source| ClientError::HandshakeIo {
        path: socket_path.to_owned(),
        port,
        source,
    };
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_error)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_error)?;
    let mut reply = Vec::with_capacity(HANDSHAKE_REPLY_MAX);
    let mut byte = [0u8; 1];
    while reply.last() != Some(&b'\n') && reply.len() < HANDSHAKE_REPLY_MAX {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(ClientError::HandshakeClosed {
                    path: socket_path.to_owned(),
                    port,
                    received: String::from_utf8_lossy(&reply).into_owned(),
                });
            }
            Ok(_) => reply.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    if !is_ok_reply(&reply) {
        return Err(ClientError::HandshakeRejected {
            path: socket_path.to_owned(),
            port,
            reply: String::from_utf8_lossy(&reply).into_owned(),
        });
    }
    stream.set_read_timeout(None).map_err(io_error)?;
    Ok(stream)
}

/// `OK <decimal u32>\n`, exactly.
fn is_ok_reply(reply: &[u8]) -> bool {
    let Some(digits) = reply
        .strip_prefix(b"OK ")
        .and_then(|rest| rest.strip_suffix(b"\n"))
    else {
        return false;
    };
    !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(digits).is_ok_and(|d| d.parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_ms_rounds_up_and_saturates() {
        assert_eq!(timeout_ms(Duration::ZERO), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_secs(3)), 3000);
        assert_eq!(timeout_ms(Duration::MAX), u32::MAX);
    }

    #[test]
    fn is_ok_reply_accepts_only_ok_and_a_port() {
        assert!(is_ok_reply(b"OK 1073741824\n"));
        for bad in [
            &b""[..],
            b"OK\n",
            b"OK \n",
            b"OK 12",
            b"OK 12 \n",
            b"OK -1\n",
            b"OK 99999999999\n",
            b"ok 5\n",
            b"ERR 5\n",
        ] {
            assert!(!is_ok_reply(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn exec_over_a_stream_that_closes_is_closed_error() {
        // The "agent" end reads the request and hangs up.
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let _ = proto::read_message(&mut agent);
        });
        let err = exec(&mut host, &["true"], &[], b"", None).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Closed {
                    request: "ExecRequest"
                }
            ),
            "{err}"
        );
        peer.join().unwrap();
    }

    #[test]
    fn ps_answered_with_wrong_kind_is_unexpected_reply() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let _ = proto::read_message(&mut agent);
            proto::write_message(&mut agent, &Message::Hello { version: 1 }).unwrap();
        });
        let err = ps(&mut host).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::UnexpectedReply {
                    request: "PsRequest",
                    reply: "Hello"
                }
            ),
            "{err}"
        );
        peer.join().unwrap();
    }
}
