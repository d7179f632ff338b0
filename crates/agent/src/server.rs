//! The guest side: accept connections, serve each on its own thread, answer every request.
//!
//! A connection carries any number of request/reply pairs, strictly in turn, until the host
//! closes it. A frame that does not decode gets one [`Message::Error`] reply with
//! [`error_code::MALFORMED_FRAME`] and the connection is closed, since the stream can no longer
//! be trusted to be aligned on frames; the agent keeps serving other and new connections.
//! Nothing a peer sends can make the agent panic.
//!
//! On vsock only the host (CID 2) is served: a process inside the guest that could reach the
//! port over vsock loopback must not gain the agent's privileges. The unix-socket listener
//! exists for tests on an ordinary host; it is as private as the socket file's directory.

mod exec;
mod ps;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::proto::{self, Message, PROTOCOL_VERSION, ProtoError, error_code};
use crate::sys::{VMADDR_CID_HOST, VsockListener};

pub use exec::{OUTPUT_CAP, exec};
pub use ps::list_processes;

/// Default vsock port, as in `bulwark-agent --vsock-port`.
pub const DEFAULT_VSOCK_PORT: u32 = 52;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK, any local CID, this port: the normal mode inside a guest.
    Vsock {
        /// The vsock port.
        port: u32,
    },
    /// A unix stream socket at this path (created; must not exist): for tests on a host.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock { port } => write!(f, "vsock port {port}"),
            Self::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// Failures of the listener and of one connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}; is the vsock transport loaded, or the path free?")]
    Bind {
        /// Where the agent tried to listen.
        addr: ListenAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent a frame that does not decode; it got an `Error` reply and was closed.
    #[error("malformed frame from the host; closed the connection")]
    Malformed(#[source] ProtoError),
    /// Reading from or writing to the connection failed.
    #[error("connection I/O failed")]
    Connection(#[source] ProtoError),
}

/// A bound listener, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct Listener {
    addr: ListenAddr,
    socket: Socket,
}

#[derive(Debug)]
enum Socket {
    Vsock(VsockListener),
    Unix(UnixListener),
}

impl Listener {
    /// Creates the listening socket at `addr`.
    pub fn bind(addr: &ListenAddr) -> Result<Self, ServerError> {
        let socket = match addr {
            ListenAddr::Vsock { port } => VsockListener::bind(*port).map(Socket::Vsock),
            ListenAddr::Unix(path) => UnixListener::bind(path).map(Socket::Unix),
        }
        .map_err(|source| ServerError::Bind {
            addr: addr.clone(),
            source,
        })?;
        Ok(Self {
            addr: addr.clone(),
            socket,
        })
    }

    /// Where this listener listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Accepts connections forever, serving each with [`handle_connection`] on its own thread.
    /// Accept errors are logged to stderr and retried after a short pause (so running out of
    /// file descriptors does not spin).
    pub fn serve(&self) -> ! {
        loop {
            let accepted = match &self.socket {
                Socket::Unix(listener) => listener.accept().map(|(stream, _)| spawn(stream)),
                Socket::Vsock(listener) => listener.accept().map(|(stream, cid)| {
                    if cid == VMADDR_CID_HOST {
                        spawn(stream);
                    } else {
                        eprintln!(
                            "bulwark-agent: refused a connection from vsock CID {cid}: only the \
                             host (CID {VMADDR_CID_HOST}) is served"
                        );
                    }
                }),
            };
            if let Err(error) = accepted {
                eprintln!("bulwark-agent: accept on {} failed: {error}", self.addr);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn spawn<S: Read + Write + Send + 'static>(stream: S) {
    let spawned = thread::Builder::new()
        .name("agent-conn".into())
        .spawn(move || {
            if let Err(error) = handle_connection(stream) {
                eprintln!("bulwark-agent: {}", crate::error_chain(&error));
            }
        });
    if let Err(error) = spawned {
        eprintln!("bulwark-agent: cannot start a connection thread, dropped it: {error}");
    }
}

/// Serves requests on one connection until the peer closes it (`Ok`), sends a malformed frame
/// (answered with an `Error` reply, then [`ServerError::Malformed`]), or the stream fails.
pub fn handle_connection<S: Read + Write>(mut stream: S) -> Result<(), ServerError> {
    loop {
        let request = match proto::read_message(&mut stream) {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(error @ ProtoError::Io(_)) => return Err(ServerError::Connection(error)),
            Err(error) => {
                let reply = Message::Error {
                    code: error_code::MALFORMED_FRAME,
                    message: format!("malformed frame: {}", crate::error_chain(&error)),
                };
                // The peer may already be gone; the connection closes either way.
                let _ = proto::write_message(&mut stream, &reply);
                return Err(ServerError::Malformed(error));
            }
        };
        let reply = handle_request(request);
        match proto::write_message(&mut stream, &reply) {
            Ok(()) => {}
            Err(error @ ProtoError::TooLong { .. }) => {
                let reply = Message::Error {
                    code: error_code::INTERNAL,
                    message: format!(
                        "the {} reply is too large to send: {error}",
                        reply.kind().name()
                    ),
                };
                proto::write_message(&mut stream, &reply).map_err(ServerError::Connection)?;
            }
            Err(error) => return Err(ServerError::Connection(error)),
        }
    }
}

/// Answers one decoded request. Runs commands and reads `/proc`; never fails, since every
/// failure becomes an `Error` reply.
pub fn handle_request(request: Message) -> Message {
    match request {
        Message::Hello { .. } => Message::Hello {
            version: PROTOCOL_VERSION,
        },
        Message::ExecRequest(request) => exec(request),
        Message::PsRequest => match list_processes(Path::new("/proc")) {
            Ok(procs) => Message::PsResult { procs },
            Err(error) => Message::Error {
                code: error_code::INTERNAL,
                message: format!("cannot list /proc: {error}"),
            },
        },
        other @ (Message::ExecResult(_) | Message::PsResult { .. } | Message::Error { .. }) => {
            Message::Error {
                code: error_code::UNEXPECTED_MESSAGE,
                message: format!(
                    "{} is a reply, not a request; send Hello, ExecRequest or PsRequest",
                    other.kind().name()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn handle_connection_garbage_frame_gets_error_reply_then_close() {
        let (mut host, agent) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || handle_connection(agent));
        host.write_all(&[3, 0, 0, 0, 9, 4, 0]).unwrap();
        let reply = proto::read_message(&mut host).unwrap().unwrap();
        assert!(
            matches!(&reply, Message::Error { code: error_code::MALFORMED_FRAME, message }
                if message.contains("unsupported protocol version 9")),
            "{reply:?}"
        );
        assert!(proto::read_message(&mut host).unwrap().is_none(), "closed");
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::Malformed(ProtoError::UnsupportedVersion {
                version: 9
            }))
        ));
    }

    #[test]
    fn handle_connection_serves_requests_in_turn_until_eof() {
        let (mut host, agent) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || handle_connection(agent));
        proto::write_message(&mut host, &Message::Hello { version: 1 }).unwrap();
        proto::write_message(
            &mut host,
            &Message::Error {
                code: 0,
                message: String::new(),
            },
        )
        .unwrap();
        assert_eq!(
            proto::read_message(&mut host).unwrap(),
            Some(Message::Hello { version: 1 })
        );
        let reply = proto::read_message(&mut host).unwrap().unwrap();
        assert!(
            matches!(
                reply,
                Message::Error {
                    code: error_code::UNEXPECTED_MESSAGE,
                    ..
                }
            ),
            "{reply:?}"
        );
        host.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(server.join().unwrap().is_ok());
    }
}
