//! virtio-blk on a raw image file: read, write, flush, discard, write-zeroes and the device
//! serial, buffered or with `O_DIRECT`, read-only or writable.
//!
//! Every request is parsed from guest-controlled descriptors before any I/O happens
//! ([`parse`]): the header and the status byte may sit anywhere in the chain (virtio 1.x lets a
//! driver lay buffers out as it likes), but device-readable buffers must come before
//! device-writable ones, data directions must match the request type, lengths must be whole
//! sectors, and every byte must lie in guest RAM. A request that breaks a rule fails with
//! `VIRTIO_BLK_S_IOERR` (when it has a status byte to say so) and is counted; the queue goes on.
//!
//! The file I/O runs in one of two places ([`Isolation`]): by default in a back-end process of
//! its own (`bulwark-backends`), which never sees guest memory — this device copies request
//! data between guest buffers and the drive's I/O window, and restarts the back-end if it dies —
//! or, with `backend=inline`, on this device's thread with one `preadv`/`pwritev` straight
//! between the file and guest memory.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_backends::client::{BackEnd, BackEndStats, RemoteDisk};
use bulwark_backends::disk::{Disk, DiskOp, Punch};
use bulwark_backends::launcher;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::chain::{self, Segment, Streams, read_stream, stream_len, sub_stream, write_stream};
use super::{ActivateError, DeviceStats, Interrupt, VirtioDevice, serve_device_queue_batches};

pub const SECTOR: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most discard / write-zeroes ranges in one request.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Largest discard or write-zeroes range, in sectors (fits the config field).
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 2;
/// Serial numbers are 20 bytes (`VIRTIO_BLK_ID_BYTES`), NUL-padded.
pub const SERIAL_LEN: usize = 20;
/// Most data one request may move (the driver's limit is far lower; this bounds a hostile one).
const MAX_DATA: u64 = 1 << 30;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

const WRITE_ZEROES_UNMAP: u32 = 1;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

/// How a drive is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// `O_DIRECT`: bypass the host page cache.
    pub direct: bool,
    /// Up to 20 bytes; the guest sees it in `/sys/block/vdX/serial` (and udev makes
    /// `/dev/disk/by-id/virtio-<serial>`).
    pub serial: String,
    /// Where the file I/O runs.
    pub isolation: Isolation,
}

pub use super::Isolation;

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("cannot open drive {path}: {source}; check the path and its permissions")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "drive {0} is in use by another VM (it holds the file's lock); give each VM its own image, or attach it read-only everywhere"
    )]
    InUse(PathBuf),
    #[error("drive {0} is empty; a disk image needs at least one 512-byte sector")]
    Empty(PathBuf),
    #[error("drive serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error(
        "drive {0}: cannot start its back-end process: {1}; attach it with backend=inline to run its I/O in the monitor (less isolated)"
    )]
    BackEnd(PathBuf, String),
    #[error(
        "drive {path}: O_DIRECT is not supported by the filesystem holding it ({source}); drop direct=on"
    )]
    NoDirect {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DriveConfig {
    fn open(&self) -> Result<(File, u64), DriveError> {
        let path = &self.path;
        if self.serial.len() > SERIAL_LEN {
            return Err(DriveError::SerialTooLong(self.serial.clone()));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(!self.read_only);
        if self.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path).map_err(|source| {
            if self.direct && source.raw_os_error() == Some(libc::EINVAL) {
                DriveError::NoDirect {
                    path: path.clone(),
                    source,
                }
            } else {
                DriveError::Open {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        // Two writers on one image corrupt it: hold an advisory lock for the VM's lifetime.
        let locked = if self.read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        if locked.is_err() {
            return Err(DriveError::InUse(path.clone()));
        }
        // Works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DriveError::Open {
                path: path.clone(),
                source,
            })?;
        if size < SECTOR {
            return Err(DriveError::Empty(path.clone()));
        }
        if !size.is_multiple_of(SECTOR) {
            tracing::warn!(
                path = %path.display(),
                size,
                "drive size is not a whole number of sectors; the last partial sector is not visible"
            );
        }
        Ok((file, size / SECTOR))
    }
}

/// Why a request was refused before any I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    #[error("the chain has no device-readable 16-byte header")]
    NoHeader,
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    #[error("the data buffers have the wrong direction for the request type")]
    Direction,
    #[error("the data length is not a whole number of sectors")]
    Unaligned,
    #[error("the request reaches past the end of the disk")]
    OutOfRange,
    #[error("a buffer lies outside guest RAM")]
    BadAddress,
    #[error("the request moves more data than allowed")]
    TooBig,
    #[error("too many or malformed discard / write-zeroes ranges")]
    BadRanges,
    #[error("a write-type request on a read-only drive")]
    ReadOnly,
}

/// A request, checked against the chain's layout, the disk's size and guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// The data buffers in order (device-writable for reads, device-readable for writes).
    pub data: Vec<Segment>,
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Parses a chain's descriptors (already walked: `(addr, len, device-writable)` in order).
pub fn parse(
    mem: &GuestMemoryMmap,
    descriptors: &[(GuestAddress, u32, bool)],
    capacity: u64,
    read_only: bool,
) -> Result<Request, (BadRequest, Option<GuestAddress>)> {
    let Some(Streams { readable, writable }) = Streams::split(descriptors) else {
        return Err((BadRequest::Order, None));
    };
    // The status byte is the last byte of the writable stream.
    let wlen = stream_len(&writable);
    let status = match sub_stream(&writable, wlen.saturating_sub(1), 1).first() {
        Some(s) if wlen > 0 => s.addr,
        _ => return Err((BadRequest::NoStatus, None)),
    };
    let fail = |e| Err((e, Some(status)));
    if mem.get_slice(status, 1).is_err() {
        return Err((BadRequest::BadAddress, None));
    }
    let rlen = stream_len(&readable);
    if rlen < HEADER_LEN {
        return fail(BadRequest::NoHeader);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if read_stream(mem, &readable, &mut header).is_err() {
        return fail(BadRequest::BadAddress);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let readable_data = rlen - HEADER_LEN;
    let writable_data = wlen - 1;
    let (data, data_len) = match kind {
        req::IN | req::GET_ID => {
            if readable_data != 0 {
                return fail(BadRequest::Direction);
            }
            (sub_stream(&writable, 0, writable_data), writable_data)
        }
        req::OUT | req::DISCARD | req::WRITE_ZEROES => {
            if writable_data != 0 {
                return fail(BadRequest::Direction);
            }
            if read_only {
                return fail(BadRequest::ReadOnly);
            }
            (
                sub_stream(&readable, HEADER_LEN, readable_data),
                readable_data,
            )
        }
        req::FLUSH => {
            if readable_data != 0 || writable_data != 0 {
                return fail(BadRequest::Direction);
            }
            (Vec::new(), 0)
        }
        // Unknown types are answered with UNSUPP by the caller; no data is touched.
        _ => (Vec::new(), 0),
    };
    if data_len > MAX_DATA {
        return fail(BadRequest::TooBig);
    }
    if matches!(kind, req::IN | req::OUT) {
        if !data_len.is_multiple_of(SECTOR) {
            return fail(BadRequest::Unaligned);
        }
        let end = sector.checked_add(data_len / SECTOR);
        if end.is_none_or(|e| e > capacity) {
            return fail(BadRequest::OutOfRange);
        }
    }
    for s in &data {
        if mem.get_slice(s.addr, s.len as usize).is_err() {
            return fail(BadRequest::BadAddress);
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

/// The discard / write-zeroes ranges of a request: `(first sector, sectors, flags)`.
pub fn parse_ranges(
    mem: &GuestMemoryMmap,
    r: &Request,
    capacity: u64,
) -> Result<Vec<(u64, u64, u32)>, BadRequest> {
    if r.data_len == 0
        || !r.data_len.is_multiple_of(SEGMENT_LEN)
        || r.data_len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEGMENTS)
    {
        return Err(BadRequest::BadRanges);
    }
    let mut raw = vec![0u8; r.data_len as usize];
    read_stream(mem, &r.data, &mut raw).map_err(|_| BadRequest::BadAddress)?;
    raw.chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let sector = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            let count = u64::from(u32::from_le_bytes([c[8], c[9], c[10], c[11]]));
            let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
            if count > u64::from(MAX_DISCARD_SECTORS) || flags & !WRITE_ZEROES_UNMAP != 0 {
                return Err(BadRequest::BadRanges);
            }
            match sector.checked_add(count) {
                Some(end) if end <= capacity => Ok((sector, count, flags)),
                _ => Err(BadRequest::OutOfRange),
            }
        })
        .collect()
}

#[derive(Debug, Default)]
struct Active {
    mem: Option<GuestMemoryMmap>,
    queue: Option<Queue>,
    interrupt: Option<Interrupt>,
}

/// Where a drive's I/O goes.
#[derive(Debug)]
enum Storage {
    Inline(Disk),
    Process(RemoteDisk),
}

/// A virtio block device on an open image file.
#[derive(Debug)]
pub struct Block {
    storage: Storage,
    path: PathBuf,
    capacity: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    active: Active,
    stats: Arc<DeviceStats>,
}

impl Block {
    /// Opens (and locks) the drive's image; with [`Isolation::Process`] starts its back-end,
    /// named `name` (`blk0`), through the process's back-end launcher.
    pub fn open(cfg: &DriveConfig, name: &str) -> Result<Self, DriveError> {
        let (file, capacity) = cfg.open()?;
        let mut serial = [0u8; SERIAL_LEN];
        serial[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
        let storage = match cfg.isolation {
            Isolation::Inline => Storage::Inline(Disk::new(file, cfg.direct)),
            Isolation::Process => {
                let flags = if cfg.direct { launcher::FLAG_DIRECT } else { 0 };
                let backend = BackEnd::start_here(
                    bulwark_backends::Kind::Block,
                    name,
                    flags,
                    Some(file.into()),
                    bulwark_backends::window::BLOCK_WINDOW,
                )
                .map_err(|e| DriveError::BackEnd(cfg.path.clone(), e.to_string()))?;
                Storage::Process(RemoteDisk::new(backend))
            }
        };
        Ok(Self {
            storage,
            path: cfg.path.clone(),
            capacity,
            read_only: cfg.read_only,
            serial,
            active: Active::default(),
            stats: Arc::default(),
        })
    }

    /// The back-end's counters, when the drive has one.
    fn backend_stats(&self) -> Option<&BackEndStats> {
        match &self.storage {
            Storage::Process(r) => Some(r.stats()),
            Storage::Inline(_) => None,
        }
    }

    /// Disk size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// What a checked request asks of the disk, or (`Err`) its answer when it asks nothing of
    /// it (the serial, an unsupported type, bad discard ranges): status and bytes written.
    fn plan<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        r: &Request,
    ) -> Result<Vec<DiskOp<'m>>, (u8, u64)> {
        let data = || -> Result<Vec<VolatileSlice<'m>>, (u8, u64)> {
            // parse() checked every buffer against guest memory.
            r.data
                .iter()
                .map(|s| mem.get_slice(s.addr, s.len as usize))
                .collect::<Result<_, _>>()
                .map_err(|_| (status::IOERR, 0))
        };
        match r.kind {
            // parse() checked a read's or write's sectors against the capacity; other types'
            // sector field is whatever the guest wrote, and unused.
            req::IN => Ok(vec![DiskOp::Read(r.sector * SECTOR, data()?)]),
            req::OUT => Ok(vec![DiskOp::Write(r.sector * SECTOR, data()?)]),
            req::FLUSH => Ok(vec![DiskOp::Flush]),
            req::GET_ID => {
                let n = r.data_len.min(SERIAL_LEN as u64) as usize;
                Err(match write_stream(mem, &r.data, &self.serial[..n]) {
                    Ok(()) => (status::OK, n as u64),
                    Err(_) => (status::IOERR, 0),
                })
            }
            req::DISCARD | req::WRITE_ZEROES => match parse_ranges(mem, r, self.capacity) {
                Ok(ranges) => Ok(ranges
                    .into_iter()
                    .map(|(sector, count, flags)| {
                        let how = if r.kind == req::DISCARD {
                            Punch::Discard
                        } else if flags & WRITE_ZEROES_UNMAP != 0 {
                            Punch::ZeroUnmap
                        } else {
                            Punch::Zero
                        };
                        DiskOp::Punch(how, sector * SECTOR, count * SECTOR)
                    })
                    .collect()),
                Err(e) => {
                    tracing::debug!(error = %e, "bad discard request");
                    DeviceStats::add(&self.stats.bad_requests, 1);
                    Err((status::IOERR, 0))
                }
            },
            _ => Err((status::UNSUPP, 0)),
        }
    }

    /// A planned request's answer once its disk operations ended: status and bytes written.
    fn finish(&self, r: &Request, result: std::io::Result<()>) -> (u8, u64) {
        if let Err(e) = result {
            tracing::debug!(path = %self.path.display(), error = %e, "drive I/O failed");
            DeviceStats::add(&self.stats.io_errors, 1);
            return (status::IOERR, 0);
        }
        match r.kind {
            req::IN => {
                DeviceStats::add(&self.stats.bytes_in, r.data_len);
                (status::OK, r.data_len)
            }
            req::OUT => {
                DeviceStats::add(&self.stats.bytes_out, r.data_len);
                (status::OK, 0)
            }
            _ => (status::OK, 0),
        }
    }

    /// Serves the chains of one pass over the queue; returns each head with the bytes written
    /// into its device-writable buffers. Every request is parsed and planned first; their disk
    /// operations then run together, in order (a back-end gets all of them before it answers
    /// the first, as many as its window holds).
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chains: Vec<DescriptorChain<&GuestMemoryMmap>>,
    ) -> Vec<(u16, u32)> {
        enum Step {
            /// The answer is known; write this status there.
            Answer(u8, u64, GuestAddress),
            /// Disk operations `ops[.1]`, then answer.
            Disk(Request, std::ops::Range<usize>),
            /// No status byte to answer through.
            Drop,
        }
        DeviceStats::add(&self.stats.requests, chains.len() as u64);
        let mut ops = Vec::new();
        let mut steps = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let descriptors = chain::descriptors(chain);
            let step = match parse(mem, &descriptors, self.capacity, self.read_only) {
                Ok(r) => match self.plan(mem, &r) {
                    Ok(mut planned) => {
                        let first = ops.len();
                        ops.append(&mut planned);
                        Step::Disk(r, first..ops.len())
                    }
                    Err((st, n)) => Step::Answer(st, n, r.status),
                },
                Err((e, at)) => {
                    tracing::debug!(error = %e, "bad block request");
                    DeviceStats::add(&self.stats.bad_requests, 1);
                    at.map_or(Step::Drop, |at| Step::Answer(status::IOERR, 0, at))
                }
            };
            steps.push((head, step));
        }
        let mut results: Vec<std::io::Result<()>> = match &mut self.storage {
            Storage::Inline(d) => ops.iter().map(|op| d.run(op)).collect(),
            Storage::Process(d) => d.run(&ops),
        };
        self.stats.copy_backend(self.backend_stats());
        steps
            .into_iter()
            .map(|(head, step)| {
                let (st, n, at) = match step {
                    Step::Drop => return (head, 0),
                    Step::Answer(st, n, at) => (st, n, at),
                    Step::Disk(r, range) => {
                        // The request failed if any of its operations did.
                        let result = results[range]
                            .iter_mut()
                            .find(|r| r.is_err())
                            .map_or(Ok(()), |e| std::mem::replace(e, Ok(())));
                        let (st, n) = self.finish(&r, result);
                        (st, n, r.status)
                    }
                };
                if mem.write_obj(st, at).is_err() {
                    return (head, 0);
                }
                (head, u32::try_from(n + 1).unwrap_or(u32::MAX))
            })
            .collect()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            super::VIRTIO_RING_F_EVENT_IDX | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.read_only {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Only the writeback field is writable, with VIRTIO_BLK_F_CONFIG_WCE, not offered.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let q = super::take_queues(queues, 1, acked_features)?.pop();
        self.active = Active {
            mem: Some(mem),
            queue: q,
            interrupt: Some(interrupt),
        };
        Ok(())
    }

    fn process_queue(&mut self, _index: u16) {
        let mut active = std::mem::take(&mut self.active);
        if let Active {
            mem: Some(mem),
            queue: Some(q),
            interrupt: Some(irq),
        } = &mut active
            && !serve_device_queue_batches(q, mem, irq, &self.stats.clone(), |chains| {
                self.serve(mem, chains)
            })
        {
            active.queue = None;
        }
        self.active = active;
    }

    fn reset(&mut self) {
        self.active = Active::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::driver::SplitRing;
    use crate::virtio::{INT_VRING, InterruptLine};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Line(AtomicU32);
    impl InterruptLine for Line {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Rig {
        dev: Block,
        mem: GuestMemoryMmap,
        ring: SplitRing,
        irq: Interrupt,
        path: PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn temp_image(tag: &str, size: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "bulwark-blk-{}-{tag}-{}.img",
            std::process::id(),
            size
        ));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    fn rig(tag: &str, size: u64, read_only: bool) -> Rig {
        let path = temp_image(tag, size);
        let mut dev = Block::open(
            &DriveConfig {
                path: path.clone(),
                read_only,
                direct: false,
                serial: "disk-serial-01".into(),
                isolation: Isolation::Inline,
            },
            "blk0",
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let ring = SplitRing::new(0x1000, 0x2000, 0x3000, 16);
        let irq = Interrupt::new(Arc::new(Line(AtomicU32::new(0))));
        dev.activate(
            mem.clone(),
            super::super::VIRTIO_F_VERSION_1,
            vec![ring.queue()],
            irq.clone(),
        )
        .unwrap();
        Rig {
            dev,
            mem,
            ring,
            irq,
            path,
        }
    }

    impl Rig {
        /// Submits a request with the usual three-part layout and returns (status, used len).
        fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut bufs = vec![(HDR, 16, false)];
            if let Some((len, w)) = data {
                bufs.push((DATA, len, w));
            }
            bufs.push((STATUS, 1, true));
            self.submit(&bufs)
        }

        fn submit(&mut self, bufs: &[crate::virtio::driver::Buf]) -> (u8, u32) {
            let before = self.ring.used_idx(&self.mem);
            self.ring.push(&self.mem, bufs);
            self.dev.process_queue(0);
            assert_eq!(self.ring.used_idx(&self.mem), before.wrapping_add(1));
            let (_, len) = self.ring.used_elem(&self.mem, before);
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        fn file(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    #[test]
    fn block_write_then_read_round_trips_through_the_file() {
        let mut r = rig("rw", 1 << 20, false);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(req::OUT, 8, Some((8192, false))), (status::OK, 1));
        assert_eq!(&r.file()[4096..4096 + 8192], &pattern[..]);
        r.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(req::IN, 8, Some((8192, true))),
            (status::OK, 8193)
        );
        let mut back = vec![0u8; 8192];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(r.request(req::FLUSH, 0, None), (status::OK, 1));
        assert_eq!(r.irq.status() & INT_VRING, INT_VRING);
        let s = r.dev.stats();
        assert_eq!(DeviceStats::get(&s.bytes_out), 8192);
        assert_eq!(DeviceStats::get(&s.bytes_in), 8192);
    }

    #[test]
    fn block_header_and_data_may_share_descriptors() {
        // virtio 1.x: any layout. Header + data in one readable buffer, status alone.
        let mut r = rig("layout", 1 << 20, false);
        let mut buf = vec![0u8; 16 + 512];
        buf[0] = req::OUT as u8;
        buf[8] = 1; // sector 1
        buf[16..].fill(0xab);
        r.mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(&[(DATA, 528, false), (STATUS, 1, true)]), (0, 1));
        assert!(r.file()[512..1024].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn block_get_id_returns_the_serial() {
        let mut r = rig("id", 1 << 20, false);
        assert_eq!(
            r.request(req::GET_ID, 0, Some((20, true))),
            (status::OK, 21)
        );
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..14], b"disk-serial-01");
        assert_eq!(id[14..], [0; 6]);
    }

    #[test]
    fn block_requests_that_ignore_the_sector_accept_any_value_there() {
        // Flush and get-id carry a sector field the device does not use: a hostile value in
        // it (one whose byte offset overflows) changes nothing.
        let mut r = rig("sector", 1 << 20, false);
        assert_eq!(r.request(req::FLUSH, u64::MAX, None), (status::OK, 1));
        assert_eq!(
            r.request(req::GET_ID, u64::MAX, Some((20, true))),
            (status::OK, 21)
        );
        assert_eq!(
            r.request(req::IN, u64::MAX, Some((512, true))).0,
            status::IOERR
        );
    }

    #[test]
    fn block_read_only_refuses_writes_and_keeps_data() {
        let mut r = rig("ro", 1 << 20, true);
        assert_ne!(r.dev.features() & feature::RO, 0);
        assert_eq!(r.dev.features() & feature::DISCARD, 0);
        r.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(req::OUT, 0, Some((512, false))).0, status::IOERR);
        assert!(r.file().iter().all(|&b| b == 0), "nothing written");
        assert_eq!(DeviceStats::get(&r.dev.stats().bad_requests), 1);
        // Opening the same image writable while the read-only lock is held fails.
        let err = Block::open(
            &DriveConfig {
                path: r.path.clone(),
                read_only: false,
                direct: false,
                serial: String::new(),
                isolation: Isolation::Inline,
            },
            "blk0",
        )
        .unwrap_err();
        assert!(matches!(err, DriveError::InUse(_)), "{err}");
    }

    #[test]
    fn block_discard_punches_holes_and_write_zeroes_zeroes() {
        let mut r = rig("discard", 4 << 20, false);
        std::fs::write(&r.path, vec![0x77u8; 4 << 20]).unwrap();
        let before = std::fs::metadata(&r.path).unwrap().blocks();
        // Discard 2 MiB starting at 1 MiB; write-zeroes (no unmap) 4 KiB at 0.
        let mut segs = [0u8; 32];
        segs[0..8].copy_from_slice(&2048u64.to_le_bytes());
        segs[8..12].copy_from_slice(&4096u32.to_le_bytes());
        r.mem.write_slice(&segs[..16], GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(req::DISCARD, 0, Some((16, false))).0, status::OK);
        let after = std::fs::metadata(&r.path).unwrap().blocks();
        assert!(after < before, "blocks {before} -> {after}");
        segs[0..8].copy_from_slice(&0u64.to_le_bytes());
        segs[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.mem.write_slice(&segs[..16], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(req::WRITE_ZEROES, 0, Some((16, false))).0,
            status::OK
        );
        let f = r.file();
        assert!(f[..4096].iter().all(|&b| b == 0));
        assert!(f[4096..8192].iter().all(|&b| b == 0x77));
        assert!(f[1 << 20..3 << 20].iter().all(|&b| b == 0));
        // A range past the end fails and changes nothing.
        segs[0..8].copy_from_slice(&8190u64.to_le_bytes());
        segs[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.mem.write_slice(&segs[..16], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(req::DISCARD, 0, Some((16, false))).0,
            status::IOERR
        );
    }

    #[test]
    fn block_hostile_requests_fail_cleanly() {
        let mut r = rig("hostile", 1 << 20, false);
        let cap = r.dev.capacity();
        // Past the end, straddling the end, sector overflow.
        assert_eq!(r.request(req::IN, cap, Some((512, true))).0, status::IOERR);
        assert_eq!(
            r.request(req::IN, cap - 1, Some((1024, true))).0,
            status::IOERR
        );
        assert_eq!(
            r.request(req::IN, u64::MAX, Some((512, true))).0,
            status::IOERR
        );
        // Not whole sectors; wrong directions.
        assert_eq!(r.request(req::IN, 0, Some((100, true))).0, status::IOERR);
        assert_eq!(r.request(req::IN, 0, Some((512, false))).0, status::IOERR);
        assert_eq!(r.request(req::OUT, 0, Some((512, true))).0, status::IOERR);
        // Unknown type.
        assert_eq!(r.request(99, 0, None).0, status::UNSUPP);
        // Data outside guest memory (past 4 MiB), and overlapping its end.
        let mut hdr = [0u8; 16];
        hdr[0] = req::IN as u8;
        r.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let far = (HDR, 16, false);
        let st = (STATUS, 1, true);
        assert_eq!(r.submit(&[far, (1 << 40, 512, true), st]).0, status::IOERR);
        assert_eq!(
            r.submit(&[far, ((4 << 20) - 256, 512, true), st]).0,
            status::IOERR
        );
        // Huge length.
        assert_eq!(
            r.submit(&[far, (DATA, u32::MAX, true), st]).0,
            status::IOERR
        );
        // Readable after writable: no status is trusted, used length 0.
        assert_eq!(
            r.submit(&[far, (DATA, 512, true), (HDR, 16, false), st]).1,
            0
        );
        // No header at all, no status at all.
        assert_eq!(r.submit(&[(DATA, 512, true)]).0, status::IOERR);
        assert_eq!(r.submit(&[far]).1, 0);
        // A descriptor that chains to itself: the walk ends, the request fails.
        let head = 7;
        r.ring.write_desc(
            &r.mem,
            head,
            HDR,
            16,
            crate::virtio::driver::VRING_DESC_F_NEXT,
            head,
        );
        r.ring.offer(&r.mem, head);
        r.dev.process_queue(0);
        assert_eq!(DeviceStats::get(&r.dev.stats().broken_queues), 0);
        // Every failure was counted, and the device still serves a good request.
        assert!(DeviceStats::get(&r.dev.stats().bad_requests) >= 12);
        assert_eq!(r.request(req::IN, 0, Some((512, true))).0, status::OK);
        assert!(!r.irq.has_failed());
    }

    #[test]
    fn block_status_byte_past_the_top_of_memory_is_not_written_at_a_wrapped_address() {
        // The only writable buffer starts 6 bytes below 2^64; its last byte would wrap to
        // 0xff9, inside RAM (found by the virtio_blk fuzz target). The device must refuse the
        // chain without touching guest memory.
        let mut r = rig("wrap", 1 << 20, false);
        r.mem.write_obj(0x77u8, GuestAddress(0xff9)).unwrap();
        let (_, len) = r.submit(&[(HDR, 16, false), (u64::MAX - 5, 0x1000, true)]);
        assert_eq!(len, 0);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0xff9)).unwrap(), 0x77);
        assert_eq!(DeviceStats::get(&r.dev.stats().bad_requests), 1);
    }

    #[test]
    fn block_avail_index_jump_breaks_the_queue_not_the_device() {
        let mut r = rig("jump", 1 << 20, false);
        r.ring.set_avail_idx(&r.mem, 40_000);
        r.dev.process_queue(0);
        assert!(r.irq.has_failed(), "NEEDS_RESET requested");
        assert_eq!(DeviceStats::get(&r.dev.stats().broken_queues), 1);
        // The broken queue is no longer served.
        r.dev.process_queue(0);
        assert_eq!(DeviceStats::get(&r.dev.stats().broken_queues), 1);
    }

    #[test]
    fn block_refuses_bad_drives_with_clear_errors() {
        let missing = Block::open(
            &DriveConfig {
                path: "/nonexistent/disk.img".into(),
                read_only: false,
                direct: false,
                serial: String::new(),
                isolation: Isolation::Inline,
            },
            "blk0",
        )
        .unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/disk.img"),
            "{missing}"
        );
        let empty = temp_image("empty", 0);
        let e = Block::open(
            &DriveConfig {
                path: empty.clone(),
                read_only: false,
                direct: false,
                serial: String::new(),
                isolation: Isolation::Inline,
            },
            "blk0",
        )
        .unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(matches!(e, DriveError::Empty(_)), "{e}");
        let long = DriveConfig {
            path: empty,
            read_only: false,
            direct: false,
            serial: "x".repeat(21),
            isolation: Isolation::Inline,
        };
        assert!(matches!(
            Block::open(&long, "blk0").unwrap_err(),
            DriveError::SerialTooLong(_)
        ));
    }

    #[test]
    fn block_config_space_reports_capacity_and_limits() {
        let r = rig("config", 3 << 20, false);
        let mut cap = [0u8; 8];
        r.dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6144);
        let mut b = [0u8; 4];
        r.dev.read_config(40, &mut b);
        assert_eq!(u32::from_le_bytes(b), MAX_DISCARD_SEGMENTS);
        // Past the end and at odd offsets: zeros, no panic.
        r.dev.read_config(59, &mut b);
        r.dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
