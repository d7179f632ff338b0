//! The `virtio_net` harness: the guest-facing halves of virtio-net, without a tap. Transmit
//! chains from a hostile driver are parsed into frames (`read_tx_frame`), and received frames
//! of fuzz-chosen sizes are placed into the driver's receive buffers (`place_frame`), with and
//! without mergeable buffers.
//!
//! Invariants: nothing panics; a transmit frame is exactly the chain's readable bytes (header
//! plus at most `MAX_FRAME`) and only comes from chains with no writable part; a placed frame
//! uses buffers whose used lengths add up to the frame and never exceed a buffer's writable
//! length, with `num_buffers` in the first header equal to the buffers used; a frame that does
//! not fit is dropped or waits, and the ring's used index moves only by returned buffers.

use bulwark_devices::virtio::chain::{self, Streams, stream_len};
use bulwark_devices::virtio::driver::{SplitRing, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use bulwark_devices::virtio::net::{MAX_FRAME, Placed, VNET_HDR_LEN, place_frame, read_tx_frame};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::super::Cursor;
use super::{guest_memory, read_table, walk};

const NET_MEM: u64 = 256 << 10;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x4000;
const SIZE: u16 = 16;

pub fn virtio_net(data: &[u8]) {
    let mut c = Cursor(data);
    let mem = guest_memory(NET_MEM);
    let Some(mode) = c.u8() else { return };
    let mergeable = mode & 1 != 0;
    let mut ring = SplitRing::new(DESC, AVAIL, USED, SIZE);
    // The descriptor table comes straight from the input: any addresses, lengths, flags, loops.
    let n = usize::from(c.u8().unwrap_or(0) % (SIZE as u8 + 1));
    for i in 0..n {
        let (Some(addr), Some(len), Some(flags), Some(next)) = (c.u32(), c.u32(), c.u8(), c.u8())
        else {
            break;
        };
        // Mostly inside the data area; sometimes anywhere past the rings (a driver that
        // points buffers at its own rings corrupts only itself, and this harness's checks).
        let addr = if flags & 0x80 != 0 {
            (u64::from(addr) << 8).max(DATA)
        } else {
            DATA + u64::from(addr) % (NET_MEM - DATA)
        };
        let len = if flags & 0x40 != 0 { len } else { len % 0x4000 };
        ring.write_desc(
            &mem,
            i as u16,
            addr,
            len,
            u16::from(flags) & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
            u16::from(next) % SIZE,
        );
    }
    let offered = usize::from(c.u8().unwrap_or(0) % 9);
    let heads: Vec<u16> = c
        .take_up_to(offered)
        .iter()
        .map(|b| u16::from(*b) % SIZE)
        .collect();
    for &h in &heads {
        ring.offer(&mem, h);
    }
    let table = read_table(&mem, DESC, SIZE);

    if mode & 2 == 0 {
        // Transmit: parse every offered chain as the device would.
        let mut q = ring.queue();
        while let Some(chain) = q.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs = chain::descriptors(chain);
            let expected_len: u64 = walk(&table, head).iter().map(|d| u64::from(d.len)).sum();
            if let Some(frame) = read_tx_frame(&mem, &descs) {
                let s = Streams::split(&descs).expect("a parsed frame has an ordered chain");
                assert!(
                    s.writable.is_empty(),
                    "frame from a chain with writable buffers"
                );
                assert_eq!(frame.len() as u64, stream_len(&s.readable));
                assert_eq!(frame.len() as u64, expected_len, "frame is the whole chain");
                assert!(frame.len() > VNET_HDR_LEN && frame.len() <= VNET_HDR_LEN + MAX_FRAME);
            }
        }
        return;
    }

    // Receive: frames of fuzz-chosen sizes into the offered buffers.
    let mut q = ring.queue();
    let mut used_before = ring.used_idx(&mem);
    while let Some(size) = c.u16() {
        let len = VNET_HDR_LEN + usize::from(size) % (MAX_FRAME + 1);
        let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let result = place_frame(&mem, &mut q, &frame, mergeable);
        let used_now = ring.used_idx(&mem);
        let returned = used_now.wrapping_sub(used_before);
        match result {
            Placed::Done(n) => {
                assert_eq!(n, len - VNET_HDR_LEN);
                assert!(returned >= 1, "a delivered frame used a buffer");
                assert!(mergeable || returned == 1, "one buffer without MRG_RXBUF");
                let mut total = 0u64;
                let mut ranges = Vec::new();
                for k in 0..returned {
                    let (id, ulen) = ring.used_elem(&mem, used_before.wrapping_add(k));
                    let head = u16::try_from(id).expect("a used id is a descriptor index");
                    let writable: Vec<_> = walk(&table, head)
                        .into_iter()
                        .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
                        .collect();
                    let room: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
                    assert!(u64::from(ulen) <= room, "used length beyond the buffer");
                    total += u64::from(ulen);
                    ranges.extend(
                        writable
                            .iter()
                            .map(|d| (d.addr, d.addr.saturating_add(u64::from(d.len)))),
                    );
                }
                assert_eq!(total, len as u64, "used lengths add up to the frame");
                // num_buffers is in the first buffer's header, unless the driver made buffers
                // overlap (then later frame bytes may cover it: its own doing).
                ranges.sort_unstable();
                let disjoint = ranges.windows(2).all(|w| w[0].1 <= w[1].0);
                let (first, _) = ring.used_elem(&mem, used_before);
                let first = walk(&table, first as u16);
                if disjoint
                    && let Some(d) = first.iter().find(|d| d.flags & VRING_DESC_F_WRITE != 0)
                    && d.len as usize >= VNET_HDR_LEN
                {
                    let nb: u16 = mem.read_obj(GuestAddress(d.addr + 10)).unwrap_or(0);
                    assert_eq!(nb, returned, "num_buffers counts the buffers used");
                }
            }
            Placed::Dropped => {}
            Placed::NoRoom { .. } => assert_eq!(returned, 0, "a frame that waits takes no buffer"),
        }
        used_before = used_now;
        if q.ready() && returned == 0 && matches!(result, Placed::NoRoom { .. }) {
            break;
        }
    }
}
