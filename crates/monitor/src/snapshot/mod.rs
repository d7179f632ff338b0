//! VM snapshots: the whole state of a paused VM as a stream of typed records, written into a
//! sealed file (`bulwark-seal`: encrypted and authenticated with the owner's key) and read back
//! by a new monitor process that resumes the guest where it stopped.
//!
//! # Record stream (inside the sealed container, kind `vm-snapshot`; docs/snapshot-format.md)
//!
//! ```text
//! record = tag:u32  index:u32  len:u32  data[len]          little-endian, len ≤ MAX_RECORD
//! ```
//!
//! The first record is [`Tag::Header`] (JSON, [`Header`]); then per-vCPU records (index = vCPU),
//! VM-wide KVM state, device records (index = device number, data = the device's own
//! encoding); then guest memory: one [`Tag::Memory`] record per RAM region (data = gpa:u64
//! size:u64 and a bitmap of the region's [`MEMORY_BLOCK`]-byte blocks, bit set = stored), a
//! [`Tag::Pad`] record that puts the next byte at a multiple of [`MEMORY_BLOCK`], the stored
//! blocks themselves outside any record (whole blocks, region by region), and [`Tag::End`].
//! Zero memory costs one bit per block. With the sealed container's 64 KiB chunks each stored
//! block is exactly one chunk, so a restore can decrypt a block when the guest first touches
//! it ([`lazy`]). KVM structures are stored as their exact bytes; a record of the wrong size is
//! refused. Unknown tags are refused, so a snapshot from a newer format fails loudly rather
//! than restoring part of a VM.

pub mod cpu;
pub mod lazy;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of the record stream (the sealed container has its own).
pub const SNAPSHOT_FORMAT: u32 = 2;
/// Granule of guest memory in the stream: a block is stored whole, or not at all when it is
/// zero. Equal to the sealed container's default chunk size, so that stored blocks are chunks.
pub const MEMORY_BLOCK: usize = 64 * 1024;
/// Record header bytes (tag, index, length).
const RECORD_HEAD: u64 = 12;

fn is_zero(block: &[u8]) -> bool {
    let (words, tail) = block.split_at(block.len() / 8 * 8);
    words
        .chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Most vCPUs a snapshot may describe.
pub const MAX_VCPUS: u32 = 256;
/// Largest record other than memory contents.
pub const MAX_RECORD: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O failed")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Seal(#[from] bulwark_seal::SealError),
    #[error("snapshot record stream is malformed: {0}")]
    Malformed(String),
    #[error(
        "snapshot format {found} is not the format {SNAPSHOT_FORMAT} this bulwark restores; restore it with the release that wrote it"
    )]
    Format { found: u32 },
    #[error("snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
}

pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// Record tags. Per-vCPU state is 0x10..0x1f, VM-wide KVM state 0x20..0x2f.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Tag {
    Header = 1,
    Regs = 0x10,
    Sregs = 0x11,
    Xsave = 0x12,
    Xcrs = 0x13,
    Lapic = 0x14,
    Msrs = 0x15,
    Events = 0x16,
    MpState = 0x17,
    DebugRegs = 0x18,
    /// A host call the vCPU had started but not finished (a read waiting for input): u32 nr.
    PendingHostCall = 0x19,
    Clock = 0x20,
    /// index 0: PIC master, 1: PIC slave, 2: IOAPIC.
    Irqchip = 0x21,
    Pit = 0x22,
    /// Device state; index = the device's place in the VM's device list.
    Device = 0x30,
    /// A RAM region's layout in the stream (index = region): gpa, size, stored-block bitmap.
    Memory = 0x40,
    /// Zero bytes up to the next [`MEMORY_BLOCK`] boundary, where the stored blocks start.
    Pad = 0x41,
    End = 0xff,
}

impl Tag {
    fn from_u32(v: u32) -> Option<Self> {
        use Tag::*;
        [
            Header,
            Regs,
            Sregs,
            Xsave,
            Xcrs,
            Lapic,
            Msrs,
            Events,
            MpState,
            DebugRegs,
            PendingHostCall,
            Clock,
            Irqchip,
            Pit,
            Device,
            Memory,
            Pad,
            End,
        ]
        .into_iter()
        .find(|t| *t as u32 == v)
    }
}

/// The first record: what VM this is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    /// `function` or `linux`.
    pub kind: String,
    /// The VM spec (bulwark-spec JSON) the VM was started from; restore rebuilds from it.
    pub spec: String,
    pub vcpus: u32,
    /// Guest RAM regions as (guest-physical address, size).
    pub regions: Vec<(u64, u64)>,
    /// Guest-visible time at the snapshot, ns (the host-call clock of function micro-VMs).
    pub clock_ns: u64,
}

/// The sink a snapshot's records go to (the sealed file).
pub type SnapshotWriter<'a> = RecordWriter<&'a mut dyn Write>;
/// Writes guest memory into the snapshot (called by [`SnapshotSource::write_state`]).
pub type MemoryWriter<'m> = dyn FnMut(&mut SnapshotWriter<'_>) -> Result<(), SnapshotError> + 'm;

/// What every VM kind's snapshot needs of its RAM and vCPUs.
#[derive(Debug)]
pub struct SnapshotBase {
    /// MSRs to save for each vCPU (KVM's index list for this host).
    pub msr_index: Vec<u32>,
    /// Guest RAM regions (guest-physical address, size).
    pub regions: Vec<(u64, u64)>,
    /// Which parts of RAM may hold data, if the backing can say.
    pub ram_map: Option<crate::memory::RamMap>,
    /// When the VM (or the VM it was restored from) started its clock.
    pub clock_start: std::time::Instant,
    /// A lazy restore still placing memory: a snapshot waits for it.
    pub lazy: Option<std::sync::Arc<lazy::LazyRestore>>,
}

impl SnapshotBase {
    pub fn new(
        kvm: &kvm_ioctls::Kvm,
        ram: &crate::memory::GuestRam,
        clock_start: std::time::Instant,
    ) -> Self {
        Self {
            msr_index: kvm
                .get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .unwrap_or_default(),
            regions: ram.regions().iter().map(|&(g, s, _)| (g, s)).collect(),
            ram_map: ram.ram_map().ok(),
            clock_start,
            lazy: None,
        }
    }

    /// Notes the lazy restore (if any) that is still filling this VM's memory.
    pub fn restored(mut self, state: Option<&RestoredState>) -> Self {
        self.lazy = state.and_then(|s| s.lazy.clone());
        self
    }
}

/// What a VM kind contributes to its snapshot beyond vCPU registers and memory.
pub trait SnapshotSource: Send {
    /// What every kind has.
    fn base(&self) -> &SnapshotBase;
    /// Why this VM cannot be snapshotted, if it cannot.
    fn refuse(&self) -> Option<String> {
        None
    }

    /// Whether vCPUs have an in-kernel LAPIC and MP state.
    fn in_kernel_irqchip(&self) -> bool;

    /// Writes VM-wide KVM state and device records (the vCPUs are parked), then calls `memory`
    /// to write guest RAM while the devices are still held still (no device thread may write
    /// guest memory while it is copied).
    fn write_state(
        &self,
        w: &mut SnapshotWriter<'_>,
        memory: &mut MemoryWriter<'_>,
    ) -> Result<(), SnapshotError>;
}

/// One record as read.
#[derive(Debug)]
pub struct Record {
    pub tag: Tag,
    pub index: u32,
    pub data: Vec<u8>,
}

/// Writes records.
pub struct RecordWriter<W: Write> {
    out: W,
    progress: Option<Progress>,
    /// Bytes written so far.
    pos: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            progress: None,
            pos: 0,
        }
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Reports guest memory written to `progress`.
    pub fn with_progress(mut self, progress: Option<Progress>) -> Self {
        self.progress = progress;
        self
    }

    pub fn record(&mut self, tag: Tag, index: u32, data: &[u8]) -> Result<(), SnapshotError> {
        if data.len() > MAX_RECORD {
            return Err(SnapshotError::Malformed(format!(
                "record {tag:?} of {} bytes is too large",
                data.len()
            )));
        }
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&(tag as u32).to_le_bytes());
        head[4..8].copy_from_slice(&index.to_le_bytes());
        head[8..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.write_all(&head)?;
        self.write_all(data)
    }

    /// A KVM structure as its bytes.
    pub fn kvm<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        tag: Tag,
        index: u32,
        value: &T,
    ) -> Result<(), SnapshotError> {
        self.record(tag, index, value.as_bytes())
    }

    pub fn header(&mut self, h: &Header) -> Result<(), SnapshotError> {
        let json = serde_json::to_vec(h).map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        self.record(Tag::Header, 0, &json)
    }

    /// All guest RAM, the last thing before the end record: a [`Tag::Memory`] record per
    /// region with the bitmap of its non-zero blocks, a [`Tag::Pad`] record, and the non-zero
    /// blocks. `populated(i)`, when it knows, lists the `(offset, length)` ranges of region `i`
    /// that may hold data; blocks outside them are zero without being read.
    pub fn memory(
        &mut self,
        mem: &vm_memory::GuestMemoryMmap,
        regions: &[(u64, u64)],
        populated: &dyn Fn(usize, u64) -> Option<Vec<(u64, u64)>>,
    ) -> Result<(), SnapshotError> {
        use vm_memory::{Bytes, GuestAddress};
        let block = MEMORY_BLOCK as u64;
        let mut buf = vec![0u8; MEMORY_BLOCK];
        let read_block = |gpa: u64, size: u64, b: u64, buf: &mut Vec<u8>| {
            let n = block.min(size - b * block) as usize;
            buf.fill(0);
            mem.read_slice(&mut buf[..n], GuestAddress(gpa + b * block))
                .map_err(|e| SnapshotError::Malformed(format!("reading guest memory: {e}")))
        };
        let t0 = std::time::Instant::now();
        // First pass: which blocks hold anything (the VM is parked, so memory stays as read).
        let mut maps = Vec::with_capacity(regions.len());
        for (i, &(gpa, size)) in regions.iter().enumerate() {
            let ranges = populated(i, size);
            let mut ranges = ranges.as_deref().map(|r| r.iter().peekable());
            let blocks = size.div_ceil(block);
            let mut bitmap = vec![0u8; blocks.div_ceil(8) as usize];
            for b in 0..blocks {
                let (start, end) = (b * block, (b * block + block).min(size));
                let untouched = ranges.as_mut().is_some_and(|r| {
                    while r.next_if(|&&(off, len)| off + len <= start).is_some() {}
                    r.peek().is_none_or(|&&(off, _)| off >= end)
                });
                if untouched {
                    continue;
                }
                read_block(gpa, size, b, &mut buf)?;
                if !is_zero(&buf) {
                    bitmap[(b / 8) as usize] |= 1 << (b % 8);
                }
            }
            let mut data = Vec::with_capacity(16 + bitmap.len());
            data.extend_from_slice(&gpa.to_le_bytes());
            data.extend_from_slice(&size.to_le_bytes());
            data.extend_from_slice(&bitmap);
            self.record(Tag::Memory, i as u32, &data)?;
            maps.push(bitmap);
        }
        tracing::debug!(elapsed = ?t0.elapsed(), "snapshot: memory block map");
        let pad = (block - (self.pos + RECORD_HEAD) % block) % block;
        self.record(Tag::Pad, 0, &vec![0; pad as usize])?;
        // Second pass: the stored blocks, whole.
        for (&(gpa, size), bitmap) in regions.iter().zip(&maps) {
            for b in 0..size.div_ceil(block) {
                if bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0 {
                    read_block(gpa, size, b, &mut buf)?;
                    self.write_all(&buf)?;
                }
                if let Some(p) = &mut self.progress {
                    p.advance(block.min(size - b * block));
                }
            }
        }
        tracing::debug!(elapsed = ?t0.elapsed(), "snapshot: memory written");
        Ok(())
    }

    pub fn end(mut self) -> Result<W, SnapshotError> {
        self.record(Tag::End, 0, &[])?;
        Ok(self.out)
    }
}

/// Reads records.
pub struct RecordReader<R: Read> {
    input: R,
    progress: Option<Progress>,
    /// Bytes read so far.
    pos: u64,
}

impl<R: Read> RecordReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            progress: None,
            pos: 0,
        }
    }

    /// Fills `buf` from the stream; a stream that ends first is malformed (`short` says how).
    fn read_exact(&mut self, buf: &mut [u8], short: &str) -> Result<(), SnapshotError> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                SnapshotError::Malformed(short.into())
            } else {
                SnapshotError::Io(e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Bytes of the stream read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The input, positioned after what was read.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// Reports guest memory restored to `progress`.
    pub fn set_progress(&mut self, progress: Option<Progress>) {
        self.progress = progress;
    }

    pub fn next_record(&mut self) -> Result<Record, SnapshotError> {
        let mut head = [0u8; RECORD_HEAD as usize];
        self.read_exact(&mut head, "the record stream ends before its end record")?;
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (tag, index, len) = (word(0), word(4), word(8) as usize);
        let tag = Tag::from_u32(tag)
            .ok_or_else(|| SnapshotError::Malformed(format!("unknown record tag {tag:#x}")))?;
        if len > MAX_RECORD {
            return Err(SnapshotError::Malformed(format!(
                "record {tag:?} claims {len} bytes"
            )));
        }
        let mut data = Vec::new();
        (&mut self.input).take(len as u64).read_to_end(&mut data)?;
        if data.len() != len {
            return Err(SnapshotError::Malformed(format!(
                "record {tag:?} is cut short"
            )));
        }
        self.pos += len as u64;
        Ok(Record { tag, index, data })
    }

    /// After the end record: the stream must end too. Reading to the end is also what makes
    /// the sealed reader check the final chunk, so a file cut after its last record is caught.
    pub fn expect_eof(&mut self) -> Result<(), SnapshotError> {
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra)? {
            0 => Ok(()),
            _ => Err(SnapshotError::Malformed("data after the end record".into())),
        }
    }

    /// The first record, which must be the header.
    pub fn header(&mut self) -> Result<Header, SnapshotError> {
        let r = self.next_record()?;
        if r.tag != Tag::Header {
            return Err(SnapshotError::Malformed(format!(
                "the stream starts with {:?}, not a header",
                r.tag
            )));
        }
        let h: Header = serde_json::from_slice(&r.data)
            .map_err(|e| SnapshotError::Malformed(format!("header: {e}")))?;
        if h.format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format { found: h.format });
        }
        Ok(h)
    }

    /// Copies the stored blocks (after the [`Tag::Pad`] record) into guest memory, which
    /// must be fresh (all zero).
    fn blocks_into(
        &mut self,
        maps: &[MemoryMap],
        mem: &vm_memory::GuestMemoryMmap,
    ) -> Result<(), SnapshotError> {
        use vm_memory::{Bytes, GuestAddress};
        let mut buf = vec![0u8; MEMORY_BLOCK];
        for map in maps {
            for b in 0..map.blocks() {
                let n = map.block_len(b);
                if map.stored(b) {
                    self.read_exact(&mut buf, "guest memory is cut short")?;
                    mem.write_slice(&buf[..n as usize], GuestAddress(map.gpa + b * BLOCK))
                        .map_err(|e| {
                            SnapshotError::Malformed(format!("writing guest memory: {e}"))
                        })?;
                }
                if let Some(p) = &mut self.progress {
                    p.advance(n);
                }
            }
        }
        Ok(())
    }
}

const BLOCK: u64 = MEMORY_BLOCK as u64;

/// A RAM region as the stream lays it out: which of its blocks are stored.
#[derive(Clone, Debug)]
pub struct MemoryMap {
    pub gpa: u64,
    pub size: u64,
    bitmap: Vec<u8>,
}

impl MemoryMap {
    /// From a [`Tag::Memory`] record, which must describe region `rec.index` of `regions`.
    fn parse(rec: &Record, regions: &[(u64, u64)]) -> Result<Self, SnapshotError> {
        let gpa = record_u64(&rec.data, 0)?;
        let size = record_u64(&rec.data, 8)?;
        if regions.get(rec.index as usize) != Some(&(gpa, size)) {
            return Err(SnapshotError::Mismatch(format!(
                "memory record {gpa:#x}+{size:#x} is not RAM region {} of this VM",
                rec.index
            )));
        }
        let bitmap = rec.data[16..].to_vec();
        if bitmap.len() as u64 != size.div_ceil(BLOCK).div_ceil(8) {
            return Err(SnapshotError::Malformed(format!(
                "the block map of region {} has {} bytes for {size:#x} bytes of RAM",
                rec.index,
                bitmap.len()
            )));
        }
        Ok(Self { gpa, size, bitmap })
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK)
    }

    /// Bytes of RAM in block `b` (the last block of a region may be short).
    pub fn block_len(&self, b: u64) -> u64 {
        BLOCK.min(self.size - b * BLOCK)
    }

    /// Whether block `b` is in the stream (otherwise it is zero).
    pub fn stored(&self, b: u64) -> bool {
        self.bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0
    }

    /// Number of stored blocks.
    pub fn stored_count(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

/// A long operation's progress in the VM directory's progress file (see
/// `bulwark_channel::PROGRESS_FILE`), rewritten at most every 16 MiB of guest memory; the
/// file goes when this is dropped. Reporting is best effort: it never fails the operation.
pub struct Progress {
    file: std::fs::File,
    path: std::path::PathBuf,
    op: &'static str,
    done: u64,
    total: u64,
    reported: u64,
}

const PROGRESS_STEP: u64 = 16 << 20;

impl Progress {
    /// Starts reporting `op` (`snapshot` or `restore`) over `total` bytes in `dir`.
    pub fn start(dir: &std::path::Path, op: &'static str, total: u64) -> Option<Self> {
        let path = dir.join(bulwark_channel::PROGRESS_FILE);
        let file = std::fs::File::create(&path).ok()?;
        let mut p = Self {
            file,
            path,
            op,
            done: 0,
            total,
            reported: 0,
        };
        p.write();
        Some(p)
    }

    fn write(&mut self) {
        use std::os::unix::fs::FileExt;
        // Fixed width, so a rewrite in place never leaves a longer old line's tail behind.
        let line = format!("{:<8} {:>20} {:>20}\n", self.op, self.done, self.total);
        let _ = self.file.write_all_at(line.as_bytes(), 0);
        self.reported = self.done;
    }

    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        if self.done - self.reported >= PROGRESS_STEP || self.done == self.total {
            self.write();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The sealed file a restore reads: sequentially for the state, then by chunk for lazy memory.
pub type SealedFile = bulwark_seal::SealReader<std::fs::File>;

/// A snapshot opened for restore: its header, and the reader positioned after it.
pub struct Restore<R: Read = SealedFile> {
    pub header: Header,
    pub reader: RecordReader<R>,
    /// Fill memory when the guest first touches it, not before it runs.
    pub lazy: Option<lazy::OnFatal>,
}

impl Restore {
    /// Opens the file and reads its header (see [`open_sealed`]).
    pub fn open(
        path: &std::path::Path,
        key: &bulwark_seal::OwnerKey,
    ) -> Result<Self, SnapshotError> {
        let mut reader = open_sealed(path, key)?;
        let header = reader.header()?;
        Ok(Self {
            header,
            reader,
            lazy: None,
        })
    }

    /// Restores memory lazily ([`lazy`]): the guest runs as soon as its state is back, and
    /// each memory block is authenticated, decrypted and placed when first touched, or by a
    /// background pass. A block that fails authentication then cannot be placed; `on_fatal`
    /// gets the reason and must end the VM (the vCPU that touched it waits forever).
    pub fn lazily(mut self, on_fatal: lazy::OnFatal) -> Self {
        self.lazy = Some(on_fatal);
        self
    }

    /// Reads the rest (see [`Restore::read_body`]); lazily if asked: then memory is left to
    /// the returned state's [`lazy::LazyRestore`], already running.
    pub fn read(
        mut self,
        mem: &vm_memory::GuestMemoryMmap,
        regions: &[(u64, u64)],
    ) -> Result<RestoredState, SnapshotError> {
        let Some(on_fatal) = self.lazy.take() else {
            return self.read_body(mem, regions);
        };
        let (mut state, maps) = self.read_state(regions)?;
        let start = self.reader.position();
        let sealed = self.reader.into_inner();
        state.lazy = Some(lazy::LazyRestore::start(
            sealed, start, maps, mem, on_fatal,
        )?);
        Ok(state)
    }
}

impl<R: Read> Restore<R> {
    /// Refuses a snapshot of another kind of VM (`function` or `linux`) or vCPU count than
    /// the one being built.
    pub fn check_fits(&self, kind: &str, vcpus: u32) -> Result<(), SnapshotError> {
        if self.header.kind != kind || self.header.vcpus != vcpus {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot holds a {} VM with {} vCPUs, not a {kind} VM with {vcpus}",
                self.header.kind, self.header.vcpus
            )));
        }
        Ok(())
    }

    /// Reads the rest: vCPU, VM-wide and device state, and memory into `mem`, to the sealed
    /// end of the file. The header's vCPU count and regions must match the VM being built.
    pub fn read_body(
        mut self,
        mem: &vm_memory::GuestMemoryMmap,
        regions: &[(u64, u64)],
    ) -> Result<RestoredState, SnapshotError> {
        let (state, maps) = self.read_state(regions)?;
        self.reader.blocks_into(&maps, mem)?;
        let end = self.reader.next_record()?;
        if end.tag != Tag::End || !end.data.is_empty() {
            return Err(SnapshotError::Malformed(format!(
                "{:?} after guest memory, not the end record",
                end.tag
            )));
        }
        self.reader.expect_eof()?;
        Ok(state)
    }

    /// Reads the records before guest memory's blocks, up to and including the pad record.
    fn read_state(
        &mut self,
        regions: &[(u64, u64)],
    ) -> Result<(RestoredState, Vec<MemoryMap>), SnapshotError> {
        if self.header.regions != regions {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's memory layout {:x?} differs from the VM's {regions:x?}",
                self.header.regions
            )));
        }
        if self.header.vcpus == 0 || self.header.vcpus > MAX_VCPUS {
            return Err(SnapshotError::Malformed(format!(
                "{} vCPUs in the header",
                self.header.vcpus
            )));
        }
        let n = self.header.vcpus as usize;
        let mut out = RestoredState {
            vcpus: (0..n).map(|_| cpu::VcpuState::default()).collect(),
            vm: cpu::VmState::default(),
            devices: Vec::new(),
            lazy: None,
        };
        let mut maps: Vec<MemoryMap> = Vec::new();
        loop {
            let rec = self.reader.next_record()?;
            if !maps.is_empty() && !matches!(rec.tag, Tag::Memory | Tag::Pad) {
                return Err(SnapshotError::Malformed(format!(
                    "{:?} among the memory records",
                    rec.tag
                )));
            }
            match rec.tag {
                Tag::End => {
                    return Err(SnapshotError::Malformed("guest memory is missing".into()));
                }
                Tag::Header => return Err(SnapshotError::Malformed("a second header".into())),
                Tag::Memory => {
                    if rec.index as usize != maps.len() {
                        return Err(SnapshotError::Malformed(format!(
                            "memory record for region {} where region {} belongs",
                            rec.index,
                            maps.len()
                        )));
                    }
                    maps.push(MemoryMap::parse(&rec, regions)?);
                }
                Tag::Pad => {
                    if maps.len() != regions.len() {
                        return Err(SnapshotError::Malformed("a RAM region is missing".into()));
                    }
                    if !self.reader.position().is_multiple_of(BLOCK)
                        || rec.data.iter().any(|&b| b != 0)
                    {
                        return Err(SnapshotError::Malformed(
                            "guest memory does not start on a block boundary".into(),
                        ));
                    }
                    return Ok((out, maps));
                }
                Tag::Device => out.devices.push((rec.index, rec.data)),
                _ => {
                    if out.vm.absorb(&rec)? {
                        continue;
                    }
                    let vcpu = out.vcpus.get_mut(rec.index as usize).ok_or_else(|| {
                        SnapshotError::Malformed(format!("state for vCPU {} of {n}", rec.index))
                    })?;
                    vcpu.absorb(&rec)?;
                }
            }
        }
    }
}

/// Everything of a snapshot but memory (in place, or being placed by `lazy`) and the header.
pub struct RestoredState {
    pub vcpus: Vec<cpu::VcpuState>,
    pub vm: cpu::VmState,
    /// Device records: (device number, the device's own encoding).
    pub devices: Vec<(u32, Vec<u8>)>,
    /// The lazy restore still filling guest memory, if the restore was lazy.
    pub lazy: Option<std::sync::Arc<lazy::LazyRestore>>,
}

impl RestoredState {
    /// The host call each vCPU had in progress, by vCPU.
    pub fn pending_hostcalls(&self) -> Vec<Option<u32>> {
        self.vcpus.iter().map(|v| v.pending_hostcall).collect()
    }

    /// The record of device `index`, if the snapshot has one.
    pub fn device(&self, index: u32) -> Option<&[u8]> {
        self.devices
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, d)| d.as_slice())
    }
}

fn record_u64(data: &[u8], at: usize) -> Result<u64, SnapshotError> {
    data.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| SnapshotError::Malformed("short memory record".into()))
}

/// A KVM structure from a record's bytes; the size must match exactly.
pub fn kvm_from<T: zerocopy::FromBytes>(rec: &Record) -> Result<T, SnapshotError> {
    T::read_from_bytes(&rec.data).map_err(|_| {
        SnapshotError::Malformed(format!(
            "record {:?} has {} bytes, not the {} of its KVM structure",
            rec.tag,
            rec.data.len(),
            std::mem::size_of::<T>()
        ))
    })
}

/// Writes a snapshot to `path` atomically: a temporary file beside it, fsync, rename. A
/// failure (a full disk) leaves any earlier file at `path` untouched.
pub fn write_sealed(
    path: &std::path::Path,
    key: &bulwark_seal::OwnerKey,
    body: impl FnOnce(&mut dyn Write) -> Result<(), SnapshotError>,
) -> Result<u64, SnapshotError> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial"));
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_0600()
            .open(&tmp)
            .map_err(|e| {
                let outside = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ReadOnlyFilesystem
                );
                let hint = if outside {
                    " (a jailed monitor sees only its own VM directory: write snapshots there)"
                } else {
                    ""
                };
                io::Error::new(
                    e.kind(),
                    format!("cannot create {}: {e}{hint}", tmp.display()),
                )
            })?;
        let mut sealed = bulwark_seal::SealWriter::new(
            io::BufWriter::with_capacity(1 << 20, file),
            key,
            bulwark_seal::VM_SNAPSHOT,
        )?;
        body(&mut sealed)?;
        let file = sealed
            .finish()?
            .into_inner()
            .map_err(|e| SnapshotError::Io(e.into_error()))?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&tmp, path)?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Opens a sealed snapshot: the key and header are checked now, every chunk as it is read.
/// A restore reads the whole stream, to its authenticated end, before any vCPU runs, so
/// nothing of a tampered, truncated or wrong-key file is ever resumed (one pass: the file is
/// decrypted once).
pub fn open_sealed(
    path: &std::path::Path,
    key: &bulwark_seal::OwnerKey,
) -> Result<RecordReader<SealedFile>, SnapshotError> {
    let open = || {
        std::fs::File::open(path).map_err(|e| {
            SnapshotError::Io(io::Error::new(
                e.kind(),
                format!("cannot open snapshot {}: {e}", path.display()),
            ))
        })
    };
    // No BufReader: the sealed reader reads a whole chunk per call, and random chunk reads
    // (lazy restore) would throw a buffer away on every seek.
    let reader = bulwark_seal::SealReader::open(open()?, key, bulwark_seal::VM_SNAPSHOT)?;
    Ok(RecordReader::new(reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_streams_are_refused() {
        let mut w = RecordWriter::new(Vec::new());
        let h = Header {
            format: SNAPSHOT_FORMAT,
            kind: "function".into(),
            spec: "{}".into(),
            vcpus: 1,
            regions: vec![(0, 4096)],
            clock_ns: 5,
        };
        w.header(&h).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        w.kvm(Tag::Regs, 0, &regs).unwrap();
        let bytes = w.end().unwrap();
        let mut r = RecordReader::new(bytes.as_slice());
        assert_eq!(r.header().unwrap(), h);
        let rec = r.next_record().unwrap();
        assert_eq!((rec.tag, rec.index), (Tag::Regs, 0));
        assert_eq!(
            kvm_from::<kvm_bindings::kvm_regs>(&rec).unwrap().rip,
            0x1234
        );
        assert!(kvm_from::<kvm_bindings::kvm_sregs>(&rec).is_err());
        assert_eq!(r.next_record().unwrap().tag, Tag::End);
        assert!(r.next_record().is_err(), "nothing after the end");
        // Unknown tag, oversized record, short record.
        for bad in [
            [7u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].to_vec(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f].to_vec(),
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1].to_vec(),
        ] {
            assert!(RecordReader::new(bad.as_slice()).next_record().is_err());
        }
    }
}
