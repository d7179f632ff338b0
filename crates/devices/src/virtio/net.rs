//! virtio-net on a tap interface.
//!
//! Frames cross with a 12-byte `virtio_net_hdr_v1` in front, which the tap device reads and
//! writes itself (`IFF_VNET_HDR`), so checksum and segmentation offloads pass through: the
//! guest may send unchecksummed TSO frames (`HOST_TSO4/6`), and, when it accepted
//! `GUEST_CSUM`/`GUEST_TSO4/6`, the tap is told (`TUNSETOFFLOAD`) to hand it such frames too.
//! Received frames may span several receive buffers (`MRG_RXBUF`).
//!
//! Transmit chains are guest-controlled: a frame is at most one header plus 64 KiB, every byte
//! must lie in guest RAM, and a bad chain is dropped and counted without touching the tap.
//! The tap is watched only while the guest has receive buffers, so a guest that posts none
//! costs nothing and loses only its own frames.
//!
//! The tap itself is served, by default, by a back-end process of its own
//! (`bulwark-backends`, [`RemoteTap`]) that never sees guest memory: frames cross the device's
//! I/O window, and a back-end that dies is replaced (frames in flight are lost, as on a wire,
//! and TCP retransmits them). With `backend=inline` this device's thread reads and writes the
//! tap itself.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use bulwark_backends::client::{BackEnd, BackEndStats, NET_WINDOW, RemoteTap};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::chain::{self, Streams, read_stream, stream_len, sub_stream};
use super::{
    ActivateError, DeviceEvents, DeviceStats, HOST_TOKEN_BASE, Interrupt, Isolation, VirtioDevice,
    interrupt_if_wanted, serve_device_queue,
};
use crate::sys;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (without the header): a 64 KiB GSO frame plus its Ethernet header.
pub const MAX_FRAME: usize = 65_536 + 14;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TAP_TOKEN: u64 = HOST_TOKEN_BASE;
const NUM_BUFFERS_OFFSET: u64 = 10;

/// Feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// How a network interface is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface: opened if it exists, created if not (creating needs CAP_NET_ADMIN).
    pub tap: String,
    pub mac: [u8; 6],
    /// Who reads and writes the tap.
    pub isolation: Isolation,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "cannot open tap interface {name}: {source}; create it first (ip tuntap add {name} mode tap) or run with CAP_NET_ADMIN, and check /dev/net/tun"
    )]
    Tap { name: String, source: io::Error },
    #[error("cannot watch tap {name}: {source}")]
    Events { name: String, source: io::Error },
    #[error(
        "tap {name}: cannot start its back-end process: {why}; attach it with backend=inline to serve it in the monitor (less isolated)"
    )]
    BackEnd { name: String, why: String },
}

/// A random locally administered unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    if getrandom::fill(&mut m).is_err() {
        m = [0, 0x42, 0x57, 0x4b, 0, 1];
    }
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

#[derive(Debug, Default)]
struct Active {
    mem: Option<GuestMemoryMmap>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    interrupt: Option<Interrupt>,
    mergeable: bool,
}

/// Who reads and writes the tap.
#[derive(Debug)]
enum Port {
    Inline(File),
    Process(Box<RemoteTap>),
}

impl Port {
    /// The descriptor that is readable when frames may be waiting, and which incarnation of
    /// it (a restarted back-end's channel can reuse the number of the old one).
    fn watch_fd(&self) -> Option<(RawFd, u32)> {
        match self {
            Port::Inline(tap) => Some((tap.as_raw_fd(), 0)),
            Port::Process(r) => r.channel_fd(),
        }
    }

    /// One frame (header first) into `buf`: its length, or `None` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self {
            Port::Inline(tap) => loop {
                match tap.read(buf) {
                    Ok(n) => return Some(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return None, // WouldBlock (or the tap went away)
                }
            },
            Port::Process(r) => r.receive(buf),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Port::Inline(tap) => tap.write(frame).map(drop),
            Port::Process(r) => r.transmit(frame),
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        match self {
            Port::Inline(tap) => bulwark_backends::sys::tap_set_offload(tap.as_fd(), flags),
            Port::Process(r) => r.set_offload(flags),
        }
    }
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    port: Port,
    name: String,
    mac: [u8; 6],
    events: DeviceEvents,
    active: Active,
    /// The length of a frame (with its header) read from the tap into `buf` that did not fit
    /// the buffers on offer yet.
    pending: Option<usize>,
    /// The descriptor registered in the event set (the tap, or the back-end's channel) and
    /// its incarnation.
    watching: Option<(RawFd, u32)>,
    buf: Vec<u8>,
    stats: Arc<DeviceStats>,
}

/// Taps opened ahead of time, by configured name: a jailed monitor opens its taps before it
/// drops the privilege that opening (or creating) one takes, and its devices take them here.
static PREOPENED: std::sync::Mutex<Vec<(String, std::fs::File, String)>> =
    std::sync::Mutex::new(Vec::new());

/// Opens (creating if needed) the tap `cfg.tap` now, for the device built later.
pub fn preopen_tap(cfg: &NetConfig) -> Result<(), NetError> {
    let (tap, name) =
        sys::tap_open(&cfg.tap, VNET_HDR_LEN as i32).map_err(|source| NetError::Tap {
            name: cfg.tap.clone(),
            source,
        })?;
    let mut taps = PREOPENED.lock().unwrap_or_else(|e| e.into_inner());
    taps.push((cfg.tap.clone(), tap, name));
    Ok(())
}

impl Net {
    /// The device for `cfg`, named `device` (`net0`: its back-end is `bw-net0`).
    pub fn new(cfg: &NetConfig, events: DeviceEvents, device: &str) -> Result<Self, NetError> {
        let preopened = {
            let mut taps = PREOPENED.lock().unwrap_or_else(|e| e.into_inner());
            let at = taps.iter().position(|(n, _, _)| *n == cfg.tap);
            at.map(|i| taps.remove(i))
        };
        let (tap, name) = match preopened {
            Some((_, tap, name)) => (tap, name),
            None => {
                sys::tap_open(&cfg.tap, VNET_HDR_LEN as i32).map_err(|source| NetError::Tap {
                    name: cfg.tap.clone(),
                    source,
                })?
            }
        };
        let port = match cfg.isolation {
            Isolation::Inline => Port::Inline(tap),
            Isolation::Process => {
                let backend = BackEnd::start_here(
                    bulwark_backends::Kind::Net,
                    device,
                    0,
                    Some(tap.into()),
                    NET_WINDOW,
                )
                .map_err(|e| NetError::BackEnd {
                    name: name.clone(),
                    why: e.to_string(),
                })?;
                Port::Process(Box::new(RemoteTap::new(backend)))
            }
        };
        Ok(Self {
            port,
            name,
            mac: cfg.mac,
            events,
            active: Active::default(),
            pending: None,
            watching: None,
            buf: vec![0; VNET_HDR_LEN + MAX_FRAME],
            stats: Arc::default(),
        })
    }

    /// The back-end's counters, when the tap has one.
    fn backend_stats(&self) -> Option<&BackEndStats> {
        match &self.port {
            Port::Process(r) => Some(r.stats()),
            Port::Inline(_) => None,
        }
    }

    /// The tap interface's name.
    pub fn tap_name(&self) -> &str {
        &self.name
    }

    /// Watches the port's descriptor (or not). A back-end's channel changes when it is
    /// restarted: the old one left the event set when it was closed, the new one is added.
    fn watch_tap(&mut self, on: bool) {
        let want = if on { self.port.watch_fd() } else { None };
        if want == self.watching {
            return;
        }
        if let Some((old, _)) = self.watching.take() {
            // Fails harmlessly when the descriptor was closed (a dead back-end's channel: the
            // kernel dropped it from the set) and its number is not yet reused.
            let _ = self.events.remove(old);
        }
        if let Some((fd, incarnation)) = want
            && self.events.add(fd, TAP_TOKEN, EventSet::IN).is_ok()
        {
            self.watching = Some((fd, incarnation));
        }
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self) {
        let mut active = std::mem::take(&mut self.active);
        let mut used = false;
        let mut dry = false;
        if let Active {
            mem: Some(mem),
            rx: Some(rx),
            mergeable,
            ..
        } = &mut active
        {
            loop {
                if self.pending.is_none() {
                    match self.port.read_frame(&mut self.buf) {
                        Some(n) if n > VNET_HDR_LEN => self.pending = Some(n),
                        Some(_) => continue,
                        None => break,
                    }
                }
                let Some(len) = self.pending else {
                    break;
                };
                match place_frame(mem, rx, &self.buf[..len], *mergeable) {
                    Placed::Done(n) => {
                        used = true;
                        DeviceStats::add(&self.stats.requests, 1);
                        DeviceStats::add(&self.stats.bytes_in, n as u64);
                        self.pending = None;
                    }
                    Placed::Dropped => {
                        used = true;
                        DeviceStats::add(&self.stats.bad_requests, 1);
                        self.pending = None;
                    }
                    Placed::NoRoom { offered } => {
                        if ask_for_more_buffers(rx, mem, offered) {
                            continue;
                        }
                        dry = true;
                        break;
                    }
                }
            }
        }
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
        let running = active.rx.is_some();
        self.active = active;
        self.watch_tap(running && !dry);
        self.stats.copy_backend(self.backend_stats());
    }

    fn transmit(&mut self) {
        let mut active = std::mem::take(&mut self.active);
        if let Active {
            mem: Some(mem),
            tx: Some(tx),
            interrupt: Some(irq),
            ..
        } = &mut active
        {
            let stats = &self.stats;
            let port = &mut self.port;
            let served = serve_device_queue(tx, mem, irq, stats, |c| {
                DeviceStats::add(&stats.requests, 1);
                match read_tx_frame(mem, &chain::descriptors(c)) {
                    Some(frame) => match port.write_frame(&frame) {
                        Ok(_) => {
                            DeviceStats::add(&stats.bytes_out, (frame.len() - VNET_HDR_LEN) as u64)
                        }
                        // A full tap queue drops the frame, as a busy wire would.
                        Err(_) => DeviceStats::add(&stats.io_errors, 1),
                    },
                    None => DeviceStats::add(&stats.bad_requests, 1),
                }
                0
            });
            if !served {
                active.tx = None;
            }
        }
        self.active = active;
        // Frames a back-end sent while this thread waited for transmit replies were read off
        // its channel then, and a back-end restarted meanwhile has a new channel: no event
        // would announce either, so look now (and watch the channel that is current).
        // (`receive` also brings the back-end's counters up to date; an inline tap has none.)
        if matches!(&self.port, Port::Process(_)) {
            self.receive();
        }
    }
}

/// After a frame found too few receive buffers: asks the driver to notify when it offers
/// more, and says whether it has offered more since `seen` (look again) or not (wait for the
/// notification).
///
/// The buffers on offer now are too few, so the notification must come for the next one:
/// with `EVENT_IDX` the avail event is set past them, not at the device's position in the
/// ring (`enable_notification`'s choice), which a driver already past it would never cross —
/// the device would wait forever, or, re-checking, spin until the guest offered more.
fn ask_for_more_buffers(rx: &mut Queue, mem: &GuestMemoryMmap, seen: u16) -> bool {
    let at = rx.next_avail();
    let now = rx
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_or(seen, |i| i.0);
    rx.set_next_avail(now);
    let more = rx.enable_notification(mem);
    rx.set_next_avail(at);
    now != seen || matches!(more, Ok(true))
}

/// A transmit chain's header and frame, or `None` when the chain is not a frame.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    descriptors: &[(vm_memory::GuestAddress, u32, bool)],
) -> Option<Vec<u8>> {
    let s = Streams::split(descriptors)?;
    let len = stream_len(&s.readable);
    if !s.writable.is_empty()
        || len <= VNET_HDR_LEN as u64
        || len > (VNET_HDR_LEN + MAX_FRAME) as u64
    {
        return None;
    }
    let mut frame = vec![0u8; len as usize];
    read_stream(mem, &s.readable, &mut frame).ok()?;
    // num_buffers is receive-only; the tap ignores it, but do not pass guest junk on.
    frame[NUM_BUFFERS_OFFSET as usize..VNET_HDR_LEN].fill(0);
    Some(frame)
}

/// What became of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Delivered; the frame's length without its header.
    Done(usize),
    /// The frame cannot fit the guest's buffers (too big, or unusable buffers): dropped.
    Dropped,
    /// Too few buffers on offer yet; `offered` is the driver's avail index the frame saw.
    NoRoom { offered: u16 },
}

/// Writes one received frame (header included) into as many receive buffers as it needs
/// (one unless `mergeable`), setting `num_buffers`.
pub fn place_frame(mem: &GuestMemoryMmap, rx: &mut Queue, frame: &[u8], mergeable: bool) -> Placed {
    let mut taken: Vec<(u16, Vec<chain::Segment>)> = Vec::new();
    let mut room = 0u64;
    while room < frame.len() as u64 {
        let Some(c) = rx.pop_descriptor_chain(mem) else {
            // Not enough buffers yet: put back what was taken.
            let offered = rx.next_avail();
            for _ in 0..taken.len() {
                rx.go_to_previous_position();
            }
            return Placed::NoRoom { offered };
        };
        let head = c.head_index();
        let writable = Streams::split(&chain::descriptors(c))
            .map(|s| s.writable)
            .unwrap_or_default();
        let len = stream_len(&writable);
        if len < VNET_HDR_LEN as u64 || (!mergeable && len < frame.len() as u64) {
            // Unusable for this frame: return it empty and drop the frame.
            let _ = rx.add_used(mem, head, 0);
            for (h, _) in taken {
                let _ = rx.add_used(mem, h, 0);
            }
            return Placed::Dropped;
        }
        room += len;
        taken.push((head, writable));
    }
    let count = taken.len() as u16;
    let mut at = 0u64;
    let mut ok = true;
    for (head, segs) in &taken {
        let n = stream_len(segs).min(frame.len() as u64 - at);
        let mut wrote = 0u64;
        for s in sub_stream(segs, 0, n) {
            let part = &frame[(at + wrote) as usize..(at + wrote + s.len) as usize];
            ok &= mem.write_slice(part, s.addr).is_ok();
            wrote += s.len;
        }
        if at == 0 {
            // num_buffers lives in the first buffer's header.
            let nb = sub_stream(segs, NUM_BUFFERS_OFFSET, 2);
            ok &= chain::write_stream(mem, &nb, &count.to_le_bytes()).is_ok();
        }
        let _ = rx.add_used(mem, *head, n as u32);
        at += n;
    }
    if ok {
        Placed::Done(frame.len() - VNET_HDR_LEN)
    } else {
        Placed::Dropped
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        use feature::*;
        super::VIRTIO_RING_F_EVENT_IDX
            | super::VIRTIO_RING_F_INDIRECT_DESC
            | CSUM
            | GUEST_CSUM
            | MAC
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_ECN
            | HOST_TSO4
            | HOST_TSO6
            | HOST_ECN
            | MRG_RXBUF
            | STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        super::read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let mut q = super::take_queues(queues, 2, acked)?.into_iter();
        let (rx, tx) = (q.next(), q.next());
        // What the guest can take on received frames, the tap may hand it.
        let mut offload = 0;
        if acked & feature::GUEST_CSUM != 0 {
            offload |= sys::tun::F_CSUM;
            if acked & feature::GUEST_TSO4 != 0 {
                offload |= sys::tun::F_TSO4;
            }
            if acked & feature::GUEST_TSO6 != 0 {
                offload |= sys::tun::F_TSO6;
            }
            if acked & feature::GUEST_ECN != 0 {
                offload |= sys::tun::F_TSO_ECN;
            }
        }
        if let Err(e) = self.port.set_offload(offload) {
            tracing::warn!(tap = %self.name, error = %e, "tap refused offloads; frames go unoffloaded");
        }
        self.active = Active {
            mem: Some(mem),
            rx,
            tx,
            interrupt: Some(interrupt),
            mergeable: acked & feature::MRG_RXBUF != 0,
        };
        self.watch_tap(true);
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        if usize::from(index) == RX {
            self.receive();
        } else {
            self.transmit();
        }
    }

    fn reset(&mut self) {
        self.watch_tap(false);
        self.pending = None;
        self.active = Active::default();
    }

    fn host_event(&mut self, token: u64, _events: EventSet) {
        if token == TAP_TOKEN {
            self.receive();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    use crate::virtio::queue::testing::{AVAIL, SIZE, USED, ring};

    fn offer(mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn avail_event(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
            .unwrap()
    }

    #[test]
    fn too_few_receive_buffers_ask_for_the_next_one_and_do_not_spin() {
        let (mem, mut q) = ring();
        // Nothing on offer: notify at the first buffer.
        assert!(!ask_for_more_buffers(&mut q, &mem, 0));
        assert_eq!(avail_event(&mem), 0);
        // Three on offer, too few for the frame: notify when a fourth comes, report no more
        // (a re-check that said "more" here made the device thread spin), and keep the
        // device's position so the three are used with the next.
        offer(&mem, 3);
        assert!(!ask_for_more_buffers(&mut q, &mem, 3));
        assert_eq!(avail_event(&mem), 3);
        assert_eq!(q.next_avail(), 0);
        // The driver's rule (virtio 1.2 §2.7.10, Linux vring_need_event): adding the fourth
        // (old 3 → new 4) notifies; with the event at the device's position (0) it would not.
        let need_event = |event: u16, new: u16, old: u16| {
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        // (With the event at the device's position, 0, it would not.)
        assert!(need_event(avail_event(&mem), 4, 3));
        // A buffer offered while the frame looked (the driver may not have notified): the
        // device looks again.
        offer(&mem, 4);
        assert!(ask_for_more_buffers(&mut q, &mem, 3));
        assert_eq!(q.next_avail(), 0);
    }
}
