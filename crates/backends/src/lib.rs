//! Device back-ends in processes of their own (the survey's disaggregation: NOVA, Xoar), and the
//! closed protocol a monitor speaks with them.
//!
//! A back-end does the host side of a virtio device (file I/O for a block device) and nothing
//! else. It never maps guest memory: the monitor keeps the guest-facing half (virtqueue parsing,
//! request checking) and moves each request's data through the device's I/O window
//! ([`window::Window`]), a shared memory file that holds only in-flight buffers, with fixed
//! messages ([`proto`]) on a seqpacket socket. Every window range lent to a back-end is
//! recorded in the ownership table ([`ownership`]), and guest RAM can never be handed out.
//!
//! Back-ends are forked from a launcher ([`launcher::Launcher`]) that the monitor forks early,
//! while it still has one thread and before guest memory exists, so a back-end starts without
//! any of the monitor's memory or descriptors beyond what it is sent. Each back-end confines
//! itself (Landlock with no path at all, its own seccomp policy) before it serves a request.
//! When a back-end dies the monitor starts another and sends the requests in flight again
//! ([`client::BackEnd`]): the guest sees nothing but latency.

pub mod client;
pub mod disk;
pub mod fuzz;
pub mod launcher;
pub mod ownership;
pub mod proto;
mod server;
pub mod sockets;
pub mod sys;
pub mod window;

/// What a back-end serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// A virtio-blk image file.
    Block = 1,
    /// A virtio-net tap.
    Net = 2,
    /// virtio-vsock's host streams (unix sockets the monitor accepted or connected).
    Vsock = 3,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Kind::Block),
            2 => Some(Kind::Net),
            3 => Some(Kind::Vsock),
            _ => None,
        }
    }

    /// Its seccomp policy (`crates/sandbox/seccomp/x86_64.json`).
    pub fn policy(self) -> &'static str {
        match self {
            Kind::Block => "backend_block",
            Kind::Net => "backend_net",
            Kind::Vsock => "backend_vsock",
        }
    }

    /// How many descriptors a back-end of this kind is started with besides its channel and
    /// window: its resource (an image file, a tap), or none (vsock streams arrive one by one).
    pub fn resources(self) -> usize {
        match self {
            Kind::Block | Kind::Net => 1,
            Kind::Vsock => 0,
        }
    }
}
