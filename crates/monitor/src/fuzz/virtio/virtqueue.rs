//! The `virtqueue` harness: the split-ring walker on rings a hostile driver wrote.

use std::sync::atomic::Ordering;

use bulwark_devices::virtio::chain::{self, Segment, Streams, read_stream, stream_len, sub_stream};
use bulwark_devices::virtio::driver::SplitRing;
use bulwark_devices::virtio::serve_queue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::Cursor;
use super::{counting_interrupt, guest_memory, stream_in_ram};

const VQ_MEM: u64 = 64 << 10;
const VQ_DESC: u64 = 0x1000;
const VQ_AVAIL: u64 = 0x2000;
const VQ_USED: u64 = 0x3000;
const VQ_BUFFERS: u64 = 0x4000;

/// The split-ring walker every device uses ([`serve_queue`] over `virtio_queue`, then
/// [`chain::descriptors`] and [`Streams::split`]) on rings a hostile driver wrote.
///
/// Input: `[mode][ndesc][rounds][ret][skip][used_event u16]`, `rounds` avail-index deltas
/// (u16), `ndesc` raw descriptors (16 bytes), avail-ring entries (u16), then buffer memory at
/// 0x4000. `mode`: bits 0-3 the queue size `1 << (n % 9)`; bit 4 `EVENT_IDX`; bit 5 descriptor
/// addresses masked into the 64 KiB of RAM; bit 6 the handler writes into the chains'
/// writable buffers (which may be the rings: then only termination and no panic are checked);
/// bit 7 indices start just before they wrap.
///
/// Invariants, against a model of the rings: each round serves exactly the chains between the
/// device's next index and the avail index, in order, and publishes each with the handler's
/// length; the queue is reported broken exactly when the avail index is more than a ring ahead
/// or a head is past the table (then the used index counts only the chains it published); the
/// notification set-up and the interrupt follow the driver's `used_event`; every chain walk is
/// bounded; the streams keep the chain's buffers and order, and reading them succeeds exactly
/// when the bytes lie in RAM.
pub fn virtqueue(data: &[u8]) {
    let mut input = Cursor(data);
    let Some([mode, ndesc, rounds, ret_mode, skip]) = input.array() else {
        return;
    };
    let Some(used_event) = input.u16() else {
        return;
    };
    let size = 1u16 << ((mode & 0x0f) % 9);
    let event_idx = mode & 0x10 != 0;
    let mask = mode & 0x20 != 0;
    let writes = mode & 0x40 != 0;
    let start = if mode & 0x80 != 0 {
        0u16.wrapping_sub(u16::from(skip % 8))
    } else {
        0
    };
    let deltas: Vec<u16> = (0..rounds % 5).map_while(|_| input.u16()).collect();
    let mem = guest_memory(VQ_MEM);
    for i in 0..u64::from(u16::from(ndesc).min(size)) {
        let Some(raw) = input.array::<16>() else {
            break;
        };
        let mut raw = raw;
        if mask {
            let addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")) % VQ_MEM;
            raw[..8].copy_from_slice(&addr.to_le_bytes());
        }
        mem.write_slice(&raw, GuestAddress(VQ_DESC + 16 * i))
            .expect("descriptor table in RAM");
    }
    for slot in 0..u64::from(size) {
        let Some(head) = input.u16() else { break };
        mem.write_obj(head, GuestAddress(VQ_AVAIL + 4 + 2 * slot))
            .expect("avail ring in RAM");
    }
    let used_event_at = GuestAddress(VQ_AVAIL + 4 + 2 * u64::from(size));
    mem.write_obj(used_event, used_event_at).expect("in RAM");
    let rest = input.take_up_to((VQ_MEM - VQ_BUFFERS) as usize);
    mem.write_slice(rest, GuestAddress(VQ_BUFFERS))
        .expect("buffers in RAM");

    let ring = SplitRing::new(VQ_DESC, VQ_AVAIL, VQ_USED, size);
    let mut q = ring.queue();
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    mem.write_obj(start, GuestAddress(VQ_USED + 2))
        .expect("in RAM");
    let (irq, line) = counting_interrupt();
    // Chains published since the device last asked whether to interrupt.
    let mut unchecked_adds = 0u16;
    for delta in deltas {
        let next_avail = q.next_avail();
        let used_before = q.next_used();
        let avail_idx = next_avail.wrapping_add(delta);
        mem.write_obj(avail_idx, GuestAddress(VQ_AVAIL + 2))
            .expect("in RAM");
        let irqs_before = line.0.load(Ordering::Relaxed);
        let mut served: Vec<(u16, u32)> = Vec::new();
        let result = serve_queue(&mut q, &mem, &irq, |c| {
            let head = c.head_index();
            let descriptors = chain::descriptors(c);
            let ret = check_chain(&mem, &descriptors, size, skip, ret_mode, served.len());
            if writes && served.len() < 2 * usize::from(size) {
                scribble(&mem, &descriptors);
            }
            served.push((head, ret));
            ret
        });
        assert!(
            served.len() <= usize::from(u16::MAX) + 1,
            "one call served {} chains",
            served.len()
        );
        if writes {
            continue; // the rings may have been overwritten: no model to compare with
        }
        // The model: which chains the round serves, and whether the queue breaks.
        let pending = avail_idx.wrapping_sub(next_avail);
        let heads: Vec<u16> = (0..pending.min(size + 1))
            .map(|k| {
                let slot = u64::from(next_avail.wrapping_add(k) % size);
                mem.read_obj(GuestAddress(VQ_AVAIL + 4 + 2 * slot))
                    .expect("in RAM")
            })
            .collect();
        let (want_served, want_published, want_broken) = if pending > size {
            (0, 0, true)
        } else if let Some(k) = heads.iter().position(|&h| h >= size) {
            (k + 1, k, true)
        } else {
            (heads.len(), heads.len(), false)
        };
        let what = format!(
            "size {size}, next_avail {next_avail}, avail_idx {avail_idx}, heads {heads:?}, \
             served {served:?}, result {result:?}"
        );
        assert_eq!(result.is_err(), want_broken, "{what}");
        assert_eq!(served.len(), want_served, "{what}");
        if let Ok(n) = result {
            assert_eq!(n, served.len() as u64, "{what}");
        }
        for (k, &(head, _)) in served.iter().enumerate() {
            assert_eq!(head, heads[k], "chain {k} out of order: {what}");
        }
        let used_after = q.next_used();
        assert_eq!(
            used_after.wrapping_sub(used_before),
            want_published as u16,
            "{what}"
        );
        let used_idx: u16 = mem.read_obj(GuestAddress(VQ_USED + 2)).expect("in RAM");
        assert_eq!(used_idx, used_after, "published used index: {what}");
        for (k, &(head, len)) in served.iter().take(want_published).enumerate() {
            let slot = u64::from(used_before.wrapping_add(k as u16) % size);
            let at = VQ_USED + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("in RAM");
            let got: u32 = mem.read_obj(GuestAddress(at + 4)).expect("in RAM");
            assert_eq!((id, got), (u32::from(head), len), "used entry {k}: {what}");
        }
        if !want_broken {
            if event_idx {
                let at = GuestAddress(VQ_USED + 4 + 8 * u64::from(size));
                let avail_event: u16 = mem.read_obj(at).expect("in RAM");
                assert_eq!(avail_event, avail_idx, "avail_event: {what}");
            } else {
                let flags: u16 = mem.read_obj(GuestAddress(VQ_USED)).expect("in RAM");
                assert_eq!(flags, 0, "notifications left disabled: {what}");
            }
        }
        unchecked_adds = unchecked_adds.wrapping_add(want_published as u16);
        let want_irq = if served.is_empty() {
            false
        } else if !event_idx {
            true
        } else {
            // virtio 1.x 2.7.10: interrupt if used_event lies in the indices just published.
            let old = used_after.wrapping_sub(unchecked_adds);
            used_after.wrapping_sub(used_event).wrapping_sub(1) < used_after.wrapping_sub(old)
        };
        if !served.is_empty() {
            unchecked_adds = 0;
        }
        let irqs = line.0.load(Ordering::Relaxed) - irqs_before;
        assert_eq!(irqs, u32::from(want_irq), "interrupts: {what}");
    }
}

/// Checks one walked chain; returns the length the handler reports.
fn check_chain(
    mem: &GuestMemoryMmap,
    descriptors: &[(GuestAddress, u32, bool)],
    size: u16,
    skip: u8,
    ret_mode: u8,
    index: usize,
) -> u32 {
    // At most a table's worth of descriptors, plus one indirect table of at most 2^16 - 1.
    assert!(
        descriptors.len() <= usize::from(size) + usize::from(u16::MAX),
        "chain of {} descriptors in a ring of {size}",
        descriptors.len()
    );
    let total: u64 = descriptors.iter().map(|d| u64::from(d.1)).sum();
    assert!(total <= u64::from(u32::MAX), "chain of {total} bytes");
    let first_writable = descriptors.iter().position(|d| d.2);
    let ordered = first_writable.is_none_or(|f| descriptors[f..].iter().all(|d| d.2));
    let streams = Streams::split(descriptors);
    assert_eq!(streams.is_some(), ordered, "{descriptors:x?}");
    let Some(s) = streams else {
        return 0;
    };
    let seg = |d: &(GuestAddress, u32, bool)| Segment {
        addr: d.0,
        len: u64::from(d.1),
    };
    let split = first_writable.unwrap_or(descriptors.len());
    let readable: Vec<Segment> = descriptors[..split].iter().map(seg).collect();
    let writable: Vec<Segment> = descriptors[split..].iter().map(seg).collect();
    assert_eq!(s.readable, readable);
    assert_eq!(s.writable, writable);
    // Read a piece of the readable stream at an offset: it must succeed exactly when those
    // bytes lie in RAM.
    let skip = u64::from(skip);
    let n = stream_len(&s.readable).saturating_sub(skip).min(64);
    let piece = sub_stream(&s.readable, skip, n);
    assert!(stream_len(&piece) <= n, "sub-stream longer than asked");
    let mut buf = vec![0u8; n as usize];
    let ok = read_stream(mem, &piece, &mut buf).is_ok();
    assert_eq!(
        ok,
        stream_in_ram(&s.readable, skip, n, VQ_MEM),
        "reading {n} bytes at offset {skip} of {:x?}",
        s.readable
    );
    match ret_mode % 4 {
        0 => stream_len(&s.writable).min(u64::from(u32::MAX)) as u32,
        1 => 0,
        2 => u32::MAX,
        _ => index as u32,
    }
}

/// Writes a pattern into the first bytes of a chain's writable stream, as a device would.
fn scribble(mem: &GuestMemoryMmap, descriptors: &[(GuestAddress, u32, bool)]) {
    if let Some(s) = Streams::split(descriptors) {
        let n = stream_len(&s.writable).min(64) as usize;
        let _ = chain::write_stream(mem, &s.writable, &vec![0xa5; n]);
    }
}
