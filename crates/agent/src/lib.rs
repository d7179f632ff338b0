//! The bulwark guest agent: runs commands and lists processes inside a Linux guest on behalf of
//! the host, over AF_VSOCK.
//!
//! One crate holds both ends of one small protocol, because they must agree byte for byte:
//!
//! - [`proto`]: the closed, versioned message enum and its hand-written, length-prefixed codec.
//!   Both sides decode what the other sends, so this decoder is fuzzed (`fuzz/fuzz_targets/
//!   agent_proto.rs`) and must never panic or allocate beyond the frame it was given.
//! - [`server`]: the guest side, run by the `bulwark-agent` binary (static, no libraries, fits a
//!   busybox userland). It listens on vsock and serves each connection on its own thread.
//! - [`client`]: the host side, over any `Read + Write` stream, plus the Firecracker-style
//!   `CONNECT <port>` handshake that turns the VMM's vsock unix socket into such a stream.
//!
//! Trust: the agent executes whatever the host asks, as its own user; the host is the more
//! trusted party and the agent accepts vsock connections from the host CID only. The host, in
//! turn, treats every agent reply as guest-controlled input: bounded frames, checked counts,
//! typed errors it can match on.
//!
//! The only `unsafe` is in `sys` (the vsock socket calls and a process-group kill), so the rest
//! of the crate denies it.
#![deny(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;
#[allow(unsafe_code)]
mod sys;

pub use client::ClientError;
pub use proto::{ExecRequest, ExecResult, Message, Proc, ProtoError};
pub use server::ServerError;

/// Formats an error and its chain of sources as one line (`outer: inner: innermost`), for the
/// places where an error leaves as text: `Error` replies to the host and the agent's stderr.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
