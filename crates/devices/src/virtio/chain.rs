//! A descriptor chain as two byte streams — what the driver lets the device read, then what
//! it lets the device write — because virtio 1.x lets a driver cut its buffers anywhere: a
//! header may span descriptors or share one with data. Devices address the streams by byte
//! offset and never assume a layout.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A guest buffer: where it is and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A byte range of a stream lies (partly) outside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideRam;

/// Walks a chain into `(address, length, device-writable)` triples. The walk itself stops at
/// loops and at chains longer than the queue (virtio-queue bounds it).
pub fn descriptors(chain: DescriptorChain<&GuestMemoryMmap>) -> Vec<(GuestAddress, u32, bool)> {
    chain
        .map(|d| (d.addr(), d.len(), d.is_write_only()))
        .collect()
}

/// A chain's device-readable and device-writable streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Streams {
    /// Splits descriptors into the two streams; `None` when a device-readable descriptor
    /// follows a device-writable one (the specification forbids it).
    pub fn split(descriptors: &[(GuestAddress, u32, bool)]) -> Option<Self> {
        let mut s = Self::default();
        for &(addr, len, w) in descriptors {
            let seg = Segment {
                addr,
                len: u64::from(len),
            };
            if w {
                s.writable.push(seg);
            } else if !s.writable.is_empty() {
                return None;
            } else {
                s.readable.push(seg);
            }
        }
        Some(s)
    }
}

/// `len` bytes of the stream formed by `segs`, starting at `start` (shorter at its end, or
/// where a buffer reaches the top of the address space).
pub fn sub_stream(segs: &[Segment], mut start: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if start >= s.len {
            start -= s.len;
            continue;
        }
        let take = (s.len - start).min(len);
        // A buffer that runs past the top of the address space does not go on at address 0:
        // the stream ends there (and reading or writing it fails as outside RAM).
        let Some(addr) = s.addr.0.checked_add(start) else {
            break;
        };
        out.push(Segment {
            addr: GuestAddress(addr),
            len: take,
        });
        len -= take;
        start = 0;
    }
    out
}

/// Total length of a stream.
pub fn stream_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Fills `buf` from the start of `segs` (which must hold at least `buf.len()` bytes).
pub fn read_stream(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), OutsideRam> {
    let mut at = 0usize;
    for s in sub_stream(segs, 0, buf.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut buf[at..at + n], s.addr)
            .map_err(|_| OutsideRam)?;
        at += n;
    }
    if at == buf.len() {
        Ok(())
    } else {
        Err(OutsideRam)
    }
}

/// Writes `data` at the start of `segs` (which must have room for it).
pub fn write_stream(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), OutsideRam> {
    let mut at = 0usize;
    for s in sub_stream(segs, 0, data.len() as u64) {
        let n = s.len as usize;
        mem.write_slice(&data[at..at + n], s.addr)
            .map_err(|_| OutsideRam)?;
        at += n;
    }
    if at == data.len() {
        Ok(())
    } else {
        Err(OutsideRam)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn sub_stream_spans_segments_and_skips_empty_ones() {
        let segs = [seg(0x100, 4), seg(0x900, 0), seg(0x200, 8)];
        assert_eq!(sub_stream(&segs, 2, 5), vec![seg(0x102, 2), seg(0x200, 3)]);
        assert_eq!(sub_stream(&segs, 12, 1), vec![]);
    }

    #[test]
    fn sub_stream_past_the_top_of_the_address_space_does_not_wrap_to_zero() {
        // A buffer the guest put just below 2^64: byte 0x20 of it is not address 0x10.
        let segs = [seg(u64::MAX - 0xf, 0x100)];
        assert_eq!(sub_stream(&segs, 0x20, 1), vec![]);
        assert_eq!(sub_stream(&segs, 0xf, 1), vec![seg(u64::MAX, 1)]);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut buf = [0u8; 4];
        let piece = sub_stream(&segs, 0x20, 4);
        assert_eq!(read_stream(&mem, &piece, &mut buf), Err(OutsideRam));
        assert_eq!(write_stream(&mem, &piece, &buf), Err(OutsideRam));
    }
}
