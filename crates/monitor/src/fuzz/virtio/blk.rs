//! The `virtio_blk` harness: a hostile driver's requests to virtio-blk on a real image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use bulwark_devices::virtio::block::{Block, DriveConfig, Isolation};
use bulwark_devices::virtio::chain::{Segment, stream_len, sub_stream};
use bulwark_devices::virtio::driver::{SplitRing, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use bulwark_devices::virtio::{
    Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::Cursor;
use super::{buffer_range, counting_interrupt, guest_memory, read_table, walk};

const BLK_MEM: u64 = 64 << 10;
const BLK_DESC: u64 = 0x1000;
const BLK_AVAIL: u64 = 0x2000;
const BLK_USED: u64 = 0x3000;
const BLK_DATA: u64 = 0x4000;
const BLK_IMAGE: u64 = 1 << 20;
/// Sectors of the image, and a little past them.
const BLK_SECTORS: u64 = BLK_IMAGE / 512;
const BLK_KINDS: [u32; 8] = [0, 1, 4, 8, 11, 13, 0, 1];

/// A drive the harness keeps for the whole process: opening one is slow next to an input.
struct Drive {
    dev: Mutex<Block>,
    /// A second handle on the (already unlinked) image, to check a read-only one never changes.
    image: File,
    pristine: Vec<u8>,
}

fn image_pattern() -> Vec<u8> {
    (0..BLK_IMAGE)
        .map(|i| (i.wrapping_mul(131) ^ (i >> 9)) as u8)
        .collect()
}

/// `[writable, read-only]`, on unlinked files in `/dev/shm` (or the temp dir).
fn drives() -> &'static [Drive; 2] {
    static DRIVES: OnceLock<[Drive; 2]> = OnceLock::new();
    DRIVES.get_or_init(|| {
        let dir = Path::new("/dev/shm");
        let dir = if dir.is_dir() {
            dir.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let open = |read_only: bool| {
            let path = dir.join(format!(
                "bulwark-fuzz-blk-{}-{}.img",
                std::process::id(),
                if read_only { "ro" } else { "rw" }
            ));
            let pristine = image_pattern();
            std::fs::write(&path, &pristine).expect("fuzz drive image");
            let dev = Block::open(
                &DriveConfig {
                    path: path.clone(),
                    read_only,
                    direct: false,
                    serial: "fuzz".into(),
                    isolation: Isolation::Inline,
                },
                "blk0",
            )
            .expect("fuzz drive");
            let image = File::open(&path).expect("fuzz drive image");
            let _ = std::fs::remove_file(&path);
            Drive {
                dev: Mutex::new(dev),
                image,
                pristine,
            }
        };
        [open(false), open(true)]
    })
}

struct BlkRig<'a> {
    dev: &'a mut Block,
    mem: GuestMemoryMmap,
    ring: SplitRing,
    irq: Interrupt,
    size: u16,
    event_idx: bool,
    next_desc: u16,
    next_data: u64,
    read_only: bool,
}

impl BlkRig<'_> {
    /// Fresh rings (zeroed) and an activated device.
    fn start(&mut self) {
        self.dev.reset();
        let zero = vec![0u8; (BLK_DATA - BLK_DESC) as usize];
        self.mem
            .write_slice(&zero, GuestAddress(BLK_DESC))
            .expect("in RAM");
        self.ring = SplitRing::new(BLK_DESC, BLK_AVAIL, BLK_USED, self.size);
        self.next_desc = 0;
        let (irq, _) = counting_interrupt();
        self.irq = irq;
        let features = VIRTIO_F_VERSION_1
            | if self.event_idx {
                VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            };
        self.dev
            .activate(
                self.mem.clone(),
                features,
                vec![self.ring.queue()],
                self.irq.clone(),
            )
            .expect("one queue is what virtio-blk takes");
    }

    /// `len` bytes of the data area (wrapping round it), 16-byte aligned unless `odd`.
    fn alloc(&mut self, len: u64, odd: bool) -> u64 {
        let len = len.min(BLK_MEM - BLK_DATA);
        if self.next_data + len > BLK_MEM {
            self.next_data = BLK_DATA;
        }
        let at = self.next_data + u64::from(odd);
        self.next_data = (at + len + 15) & !15;
        at.min(BLK_MEM - len)
    }

    /// Writes `bufs` as one chain in consecutive descriptors; returns its head.
    fn chain(&mut self, bufs: &[(u64, u32, u16, Option<u16>)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let seq = index.wrapping_add(1) % self.size;
            let mut flags = flags & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE);
            if next.is_none() && i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.ring
                .write_desc(&self.mem, index, addr, len, flags, next.unwrap_or(seq));
            self.next_desc = seq;
        }
        head
    }

    /// A request laid out as a driver would, with fuzz-chosen type, sector, sizes and layout.
    fn request(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let [sel, len_sel] = input.array()?;
        let kind = match BLK_KINDS[usize::from(sel & 7)] {
            0 if sel & 7 == 6 => input.u32()?,
            k => k,
        };
        let sector = if sel & 0x80 != 0 {
            input.u64()?
        } else {
            u64::from(input.u16()?) % (BLK_SECTORS + 64)
        };
        let layout = (sel >> 3) & 3;
        let odd = sel & 0x40 != 0;
        let mut payload = Vec::new();
        let data_len: u64 = match kind {
            0 | 1 if len_sel & 0x80 != 0 => u64::from(input.u16()?) % 16_384,
            0 | 1 => 512 * u64::from(len_sel & 15),
            8 => [0, 1, 19, 20, 21, 512][usize::from(len_sel % 6)],
            11 | 13 => {
                let n = len_sel % 18;
                for _ in 0..n {
                    let [s, c, f] = [input.u16()?, input.u16()?, u16::from(input.u8()?)];
                    let sector = u64::from(s) % (BLK_SECTORS + 64);
                    payload.extend_from_slice(&sector.to_le_bytes());
                    payload.extend_from_slice(&u32::from(c).to_le_bytes());
                    let flags = if f & 0x80 != 0 {
                        u32::from(f)
                    } else {
                        u32::from(f & 1)
                    };
                    payload.extend_from_slice(&flags.to_le_bytes());
                }
                16 * u64::from(n) + if len_sel & 0x80 != 0 { 3 } else { 0 }
            }
            4 => 0,
            _ => u64::from(len_sel & 7) * 512,
        };
        payload.resize(data_len as usize, 0x3c);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        // Reads and GET_ID take device-writable data; everything else readable.
        let data_writable = matches!(kind, 0 | 8) != (layout == 3);
        let hdr_at = self.alloc(16 + data_len + 1, odd);
        let data_at = hdr_at + 16;
        let status_at = data_at + data_len;
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&payload);
        bytes.push(0xff);
        self.mem
            .write_slice(&bytes, GuestAddress(hdr_at))
            .expect("data area in RAM");
        let w = VRING_DESC_F_WRITE;
        let dflags = if data_writable { w } else { 0 };
        let dl = data_len as u32;
        let mut bufs = Vec::new();
        match layout {
            // Header and data in one buffer (writes), or data and status (reads).
            1 if data_writable => {
                bufs.push((hdr_at, 16, 0, None));
                bufs.push((data_at, dl + 1, w, None));
            }
            1 => {
                bufs.push((hdr_at, 16 + dl, 0, None));
                bufs.push((status_at, 1, w, None));
            }
            // Data cut in two at a fuzz-chosen point.
            2 => {
                let cut = u32::from(input.u8()?).min(dl);
                bufs.push((hdr_at, 16, 0, None));
                bufs.push((data_at, cut, dflags, None));
                bufs.push((data_at + u64::from(cut), dl - cut, dflags, None));
                bufs.push((status_at, 1, w, None));
            }
            // 0, and 3 (data in the wrong direction).
            _ => {
                bufs.push((hdr_at, 16, 0, None));
                if dl > 0 {
                    bufs.push((data_at, dl, dflags, None));
                }
                bufs.push((status_at, 1, w, None));
            }
        }
        let head = self.chain(&bufs);
        self.ring.offer(&self.mem, head);
        Some(())
    }

    /// A chain of fuzz-chosen descriptors: wild addresses, odd lengths, any flags, loops.
    fn raw_chain(&mut self, input: &mut Cursor<'_>) -> Option<()> {
        let n = usize::from(input.u8()? % 8) + 1;
        let mut bufs = Vec::new();
        for _ in 0..n {
            let [addr_sel, len_sel, flags] = input.array()?;
            let addr = match addr_sel % 6 {
                0 | 1 => BLK_DATA + u64::from(input.u16()?) % (BLK_MEM - BLK_DATA),
                2 => input.u64()?,
                3 => u64::MAX - u64::from(input.u16()?),
                4 => BLK_MEM - u64::from(input.u8()?),
                _ => u64::from(input.u16()?),
            };
            let len = match len_sel % 8 {
                0 => u32::from(input.u8()?),
                1 => u32::from(input.u16()?),
                2 => input.u32()?,
                3 => 0,
                4 => 1,
                5 => 16,
                6 => 512,
                _ => 17,
            };
            let next = if flags & 0x80 != 0 {
                Some(input.u16()?)
            } else {
                None
            };
            bufs.push((addr, len, u16::from(flags), next));
        }
        // A header the request parser can take, where the first buffer points (if in RAM).
        let kind = BLK_KINDS[usize::from(input.u8()? & 7)];
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(u64::from(input.u8()?) * 8).to_le_bytes());
        if bufs[0].0 >= BLK_DATA {
            let _ = self.mem.write_slice(&header, GuestAddress(bufs[0].0));
        }
        let head = self.chain(&bufs);
        let head = if input.u8()? == 0xff {
            input.u16()?
        } else {
            head
        };
        self.ring.offer(&self.mem, head);
        Some(())
    }

    /// Runs the device on what is offered and checks what it did.
    fn process(&mut self) {
        let table = read_table(&self.mem, BLK_DESC, self.size);
        let mut before = vec![0u8; BLK_MEM as usize];
        self.mem
            .read_slice(&mut before, GuestAddress(0))
            .expect("in RAM");
        let writable: Vec<(u64, u64)> = table
            .iter()
            .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
            .map(buffer_range)
            .collect();
        // A driver may point buffers at its own rings; the model then no longer holds.
        let rings_writable = writable
            .iter()
            .any(|&(a, b)| a < BLK_DATA && b > BLK_DESC && b > a);
        let stats = self.dev.stats();
        let s0 = stats.snapshot();
        let used0 = self.ring.used_idx(&self.mem);
        let failed0 = self.irq.has_failed();
        self.dev.process_queue(0);
        let s1 = stats.snapshot();
        let used1 = self.ring.used_idx(&self.mem);
        let published = u64::from(used1.wrapping_sub(used0));
        let requests = s1.requests - s0.requests;
        let broken = s1.broken_queues - s0.broken_queues;
        let what = format!("{s0} -> {s1}, used {used0} -> {used1}");
        assert!(broken <= 1, "{what}");
        if failed0 {
            assert_eq!((requests, published), (0, 0), "broken queue served: {what}");
        }
        if broken == 1 {
            assert!(self.irq.has_failed(), "broken queue not reported: {what}");
            assert!(published == requests || published + 1 == requests, "{what}");
        } else {
            assert_eq!(published, requests, "{what}");
        }
        let bad = s1.bad_requests - s0.bad_requests;
        let io = s1.io_errors - s0.io_errors;
        assert!(bad + io <= requests, "{what}");
        if self.read_only {
            assert_eq!(s1.bytes_out, 0, "a read-only drive took data: {what}");
        }
        if rings_writable {
            return;
        }
        let mut payload_room = 0u64;
        let mut last_status = None;
        for k in 0..published as u16 {
            let (id, len) = self.ring.used_elem(&self.mem, used0.wrapping_add(k));
            assert!(id < u32::from(self.size), "used id {id}: {what}");
            let chain = walk(&table, id as u16);
            let wbufs: Vec<Segment> = chain
                .iter()
                .filter(|d| d.flags & VRING_DESC_F_WRITE != 0)
                .map(|d| Segment {
                    addr: GuestAddress(d.addr),
                    len: u64::from(d.len),
                })
                .collect();
            let room = stream_len(&wbufs);
            assert!(
                u64::from(len) <= room,
                "used len {len} > {room} writable bytes of chain {chain:x?}: {what}"
            );
            if len > 0 {
                payload_room += u64::from(len) - 1;
                last_status = sub_stream(&wbufs, room - 1, 1).first().map(|s| s.addr);
            } else {
                last_status = None;
            }
        }
        assert!(
            s1.bytes_in - s0.bytes_in <= payload_room,
            "bytes_in beyond the data the used lengths cover: {what}"
        );
        if let Some(at) = last_status {
            let st: u8 = self.mem.read_obj(at).expect("status byte in RAM");
            assert!(st <= 2, "status {st:#x} at {at:?}: {what}");
        }
        let mut after = vec![0u8; BLK_MEM as usize];
        self.mem
            .read_slice(&mut after, GuestAddress(0))
            .expect("in RAM");
        let used_ring = BLK_USED..BLK_USED + 6 + 8 * u64::from(self.size);
        const CHUNK: usize = 256;
        for (c, (a, b)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
            if a == b {
                continue;
            }
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                let i = (c * CHUNK + j) as u64;
                if x != y
                    && !used_ring.contains(&i)
                    && !writable.iter().any(|&(s, e)| (s..e).contains(&i))
                {
                    panic!("device wrote {y:#x} at {i:#x}, outside every writable buffer: {what}");
                }
            }
        }
    }
}

/// The virtio-blk request parser and device on a real 1 MiB image (read-only or writable),
/// with a split ring in 64 KiB of guest memory.
///
/// Input: a set-up byte (bit 0 read-only; bit 1 `EVENT_IDX`; bits 2-4 the queue size 4..64),
/// then ops: `[op]` with `op % 4` = 0 a driver-shaped request (every type, sector, length and
/// layout chosen by the input), 1 a raw chain (wild addresses, huge and zero lengths, any flags,
/// `next` loops, raw heads), 2 run the queue, 3 hostile ring operations (an avail-index jump, a
/// reset, a wrong queue count). Unless bit 7 is set a chain is served at once.
///
/// Invariants: no panic; the used index advances by the chains served (one less on a broken
/// queue, which the device then reports and stops serving); a used length never exceeds the
/// chain's writable bytes, and `bytes_in` never exceeds what the used lengths cover; the device
/// writes guest memory only inside device-writable buffers and the used ring; the last
/// completed chain's status byte is a defined status; a read-only drive's image never changes
/// and it never counts written bytes; error counters never exceed requests.
pub fn virtio_blk(data: &[u8]) {
    let mut input = Cursor(data);
    let Some(setup) = input.u8() else { return };
    let read_only = setup & 1 != 0;
    let drive = &drives()[usize::from(read_only)];
    let mut dev = drive.dev.lock().unwrap_or_else(|e| e.into_inner());
    let size = 4u16 << ((setup >> 2) % 5);
    let mem = guest_memory(BLK_MEM);
    let (irq, _) = counting_interrupt();
    let mut rig = BlkRig {
        dev: &mut dev,
        mem,
        ring: SplitRing::new(BLK_DESC, BLK_AVAIL, BLK_USED, size),
        irq,
        size,
        event_idx: setup & 2 != 0,
        next_desc: 0,
        next_data: BLK_DATA,
        read_only,
    };
    rig.start();
    for _ in 0..64 {
        let Some(op) = input.u8() else { break };
        let offered = match op % 4 {
            0 => rig.request(&mut input),
            1 => rig.raw_chain(&mut input),
            2 => Some(()),
            _ => match input.u8().map(|b| b % 3) {
                Some(0) => {
                    let jump = input.u16().unwrap_or(0);
                    let idx = rig.ring.used_idx(&rig.mem).wrapping_add(jump);
                    rig.ring.set_avail_idx(&rig.mem, idx);
                    Some(())
                }
                Some(1) => {
                    rig.start();
                    None
                }
                Some(_) => {
                    rig.dev.reset();
                    let (irq, _) = counting_interrupt();
                    let two = vec![rig.ring.queue(), rig.ring.queue()];
                    assert!(rig.dev.activate(rig.mem.clone(), 0, two, irq).is_err());
                    rig.start();
                    None
                }
                None => None,
            },
        };
        if offered.is_none() {
            continue;
        }
        if op & 0x80 == 0 {
            rig.process();
        }
    }
    rig.process();
    rig.dev.reset();
    if read_only {
        let mut now = vec![0u8; BLK_IMAGE as usize];
        drive.image.read_exact_at(&mut now, 0).expect("image");
        assert!(now == drive.pristine, "the read-only image changed");
    }
}
