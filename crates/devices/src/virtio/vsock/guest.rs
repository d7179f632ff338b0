//! A guest's side of the vsock device, for tests: the three rings and their buffers in real
//! guest memory, packets written and read back as a driver would. The device's unit tests and
//! the back-end host test (`crates/devices/tests/vsock_backend.rs`) drive the device with it.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;

use super::{HEADER_LEN, HOST_CID, Header, RX, TX, TYPE_STREAM};
use crate::virtio::driver::{Buf, SplitRing};
use crate::virtio::{DeviceEvents, Interrupt, InterruptLine, VIRTIO_F_VERSION_1, VirtioDevice};

const RING: u16 = 256;
const MEM: u64 = 8 << 20;
/// Transmit packets are written from here; receive buffers from `RX_AREA` on.
const TX_AREA: u64 = 0x1_0000;
const RX_AREA: u64 = 0x20_0000;

struct NoLine;
impl InterruptLine for NoLine {
    fn trigger(&self) {}
}

/// The guest driver of one vsock device.
pub struct GuestVsock {
    pub mem: GuestMemoryMmap,
    pub rx: SplitRing,
    pub tx: SplitRing,
    pub event: SplitRing,
    cid: u64,
    rx_buf: u32,
    /// Receive buffers posted and not yet used: (head, address).
    posted: VecDeque<(u16, u64)>,
    rx_seen: u16,
    next_rx: u64,
    next_tx: u64,
}

impl GuestVsock {
    /// Guest memory and rings for a guest of context `cid` whose receive buffers hold
    /// `rx_buf` bytes each; `dev` is activated on them.
    pub fn activate(dev: &mut dyn VirtioDevice, cid: u64, rx_buf: u32) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let rx = SplitRing::new(0x1000, 0x2000, 0x3000, RING);
        let tx = SplitRing::new(0x4000, 0x5000, 0x6000, RING);
        let event = SplitRing::new(0x7000, 0x8000, 0x9000, RING);
        let queues = vec![rx.queue(), tx.queue(), event.queue()];
        dev.activate(
            mem.clone(),
            VIRTIO_F_VERSION_1,
            queues,
            Interrupt::new(Arc::new(NoLine)),
        )
        .unwrap();
        Self {
            mem,
            rx,
            tx,
            event,
            cid,
            rx_buf,
            posted: VecDeque::new(),
            rx_seen: 0,
            next_rx: RX_AREA,
            next_tx: TX_AREA,
        }
    }

    /// Posts `n` receive buffers and tells the device.
    pub fn post_rx(&mut self, dev: &mut dyn VirtioDevice, n: usize) {
        for _ in 0..n {
            if self.next_rx + u64::from(self.rx_buf) > MEM {
                self.next_rx = RX_AREA;
            }
            let at = self.next_rx;
            self.next_rx += u64::from(self.rx_buf);
            let head = self.rx.push(&self.mem, &[(at, self.rx_buf, true)]);
            self.posted.push_back((head, at));
        }
        dev.process_queue(RX as u16);
    }

    /// Puts `bufs` on the transmit queue as one chain and notifies the device.
    pub fn send_chain(&mut self, dev: &mut dyn VirtioDevice, bufs: &[Buf]) {
        self.tx.push(&self.mem, bufs);
        dev.process_queue(TX as u16);
    }

    /// Writes a packet (header with its length set, then `payload`) and sends it in one buffer.
    pub fn send(&mut self, dev: &mut dyn VirtioDevice, mut h: Header, payload: &[u8]) {
        h.len = payload.len() as u32;
        let at = self.write_packet(&h, payload);
        self.send_chain(dev, &[(at, (HEADER_LEN + payload.len()) as u32, false)]);
    }

    /// Writes a packet into the transmit area; its address.
    pub fn write_packet(&mut self, h: &Header, payload: &[u8]) -> u64 {
        let len = (HEADER_LEN + payload.len()) as u64;
        if self.next_tx + len > RX_AREA {
            self.next_tx = TX_AREA;
        }
        let at = self.next_tx;
        self.next_tx = (at + len + 15) & !15;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + HEADER_LEN as u64))
            .unwrap();
        at
    }

    /// Packets the device placed in receive buffers since the last call, each checked: used
    /// in the order posted, its used length the packet's, from the host to this guest.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used = self.rx.used_idx(&self.mem);
        while self.rx_seen != used {
            let (id, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let (head, at) = self.posted.pop_front().unwrap();
            assert_eq!(id, u32::from(head));
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(at)).unwrap();
            let h = Header::parse(&raw);
            assert_eq!(len as usize, HEADER_LEN + h.len as usize, "{h:?}");
            assert_eq!(
                (h.src_cid, h.dst_cid, h.kind),
                (HOST_CID, self.cid, TYPE_STREAM)
            );
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(at + HEADER_LEN as u64))
                .unwrap();
            out.push((h, payload));
        }
        out
    }

    /// Waits up to `ms` for the device's host descriptors and runs the device on those ready,
    /// as its thread would; how many were.
    pub fn pump_once(dev: &mut dyn VirtioDevice, events: &DeviceEvents, ms: i32) -> usize {
        let mut ready = [EpollEvent::default(); 16];
        let n = events.wait(ms, &mut ready).unwrap();
        for ev in &ready[..n] {
            dev.host_event(ev.data(), ev.event_set());
        }
        n
    }
}
