//! Lazy restore: the guest runs as soon as its CPU and device state are back, and its memory
//! follows on demand.
//!
//! Guest RAM is registered with a userfaultfd ([`crate::uffd`]). One thread owns it: it serves
//! first touches (a vCPU, KVM on a vCPU's behalf, or a device thread touching a page waits for
//! it), and between faults it fills the remaining stored blocks in file order, so the whole
//! snapshot has been read, authenticated and placed a short while after the guest resumed.
//! Then the registration ends and the file is closed.
//!
//! Each stored block of the record stream is exactly one sealed chunk (the stream pads guest
//! memory to a chunk boundary, and blocks and chunks are both 64 KiB), so a block is read with
//! one seek and one read, authenticated and decrypted on its own, and copied into place with
//! `UFFDIO_COPY`; zero blocks get `UFFDIO_ZEROPAGE`, or nothing once the registration ends.
//!
//! What is checked before the guest runs: the key and header, every state record, and the
//! file's sealed end (the final chunk must be the end record right after the last block), so a
//! wrong-key, wrong-version, truncated or extended file, or one with tampered state, resumes
//! nothing. A tampered *memory* chunk is found when its block is needed or the background pass
//! reaches it: its bytes never reach the guest, the vCPU that wanted them stays blocked, and
//! the VM is ended through [`OnFatal`]. That is the trade for not decrypting everything first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bulwark_channel::LazyRestoreInfo;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{BLOCK, MEMORY_BLOCK, MemoryMap, RECORD_HEAD, SealedFile, SnapshotError, Tag};
use crate::uffd::Userfault;

/// What ends the VM when its memory cannot be restored (the reason, in words). Runs on the
/// lazy-restore thread; it must not return to a VM that goes on (for example: record the
/// reason and exit the process).
pub type OnFatal = Box<dyn FnOnce(String) + Send>;

#[derive(Debug)]
enum Status {
    Running,
    Done,
    Failed(String),
}

/// A lazy restore in progress; [`LazyRestore::wait`] blocks until all of memory is in place.
#[derive(Debug)]
pub struct LazyRestore {
    status: Mutex<Status>,
    changed: Condvar,
    began: Instant,
    /// Blocks stored in the file.
    blocks: u64,
    placed: AtomicU64,
    on_demand: AtomicU64,
    zero_faults: AtomicU64,
    /// Set when complete.
    elapsed_ms: AtomicU64,
}

/// A region's blocks as the filler sees them.
struct Region {
    host: u64,
    map: MemoryMap,
    /// Chunk index of each block, `None` for zero blocks.
    chunk: Vec<Option<u64>>,
    filled: Vec<bool>,
}

impl LazyRestore {
    /// Checks the file's end, registers guest RAM and starts the filler thread. `sealed` is
    /// the file after the pad record, which ended at stream offset `start`.
    pub fn start(
        mut sealed: SealedFile,
        start: u64,
        maps: Vec<MemoryMap>,
        mem: &GuestMemoryMmap,
        on_fatal: OnFatal,
    ) -> Result<Arc<Self>, SnapshotError> {
        let began = Instant::now();
        if sealed.chunk_size() as usize != MEMORY_BLOCK {
            return Err(SnapshotError::Unsupported(format!(
                "lazy restore needs a file sealed in {MEMORY_BLOCK}-byte chunks, this one has {}; restore it without --lazy",
                sealed.chunk_size()
            )));
        }
        let first = start / BLOCK;
        let stored: u64 = maps.iter().map(MemoryMap::stored_count).sum();
        let end_chunk = first + stored;
        let chunks = sealed.chunk_count()?;
        if chunks < end_chunk + 1 {
            return Err(bulwark_seal::SealError::Truncated {
                complete_chunks: chunks.saturating_sub(1),
            }
            .into());
        }
        if chunks > end_chunk + 1 {
            return Err(SnapshotError::Malformed("data after the end record".into()));
        }
        let mut buf = Vec::with_capacity(MEMORY_BLOCK + bulwark_seal::TAG_LEN);
        let last = sealed.read_chunk(end_chunk, &mut buf)?;
        let mut end = [0u8; RECORD_HEAD as usize];
        end[..4].copy_from_slice(&(Tag::End as u32).to_le_bytes());
        if !last || buf != end {
            return Err(SnapshotError::Malformed(
                "guest memory is not followed by the end record".into(),
            ));
        }

        let mut regions = Vec::with_capacity(maps.len());
        let mut next = first;
        for map in maps {
            let host = mem
                .get_host_address(GuestAddress(map.gpa))
                .map_err(|e| SnapshotError::Malformed(format!("guest memory: {e}")))?
                as u64;
            let chunk = (0..map.blocks())
                .map(|b| {
                    map.stored(b).then(|| {
                        next += 1;
                        next - 1
                    })
                })
                .collect();
            let filled = vec![false; map.blocks() as usize];
            regions.push(Region {
                host,
                map,
                chunk,
                filled,
            });
        }
        let uffd = Userfault::new()?;
        for r in &regions {
            uffd.register(r.host, r.map.size)?;
        }
        let this = Arc::new(Self {
            status: Mutex::new(Status::Running),
            changed: Condvar::new(),
            began,
            blocks: stored,
            placed: AtomicU64::new(0),
            on_demand: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            elapsed_ms: AtomicU64::new(0),
        });
        let filler = Filler {
            sealed,
            uffd,
            regions,
            buf,
            progress: this.clone(),
            // Keeps the mappings alive while the thread may still write into them.
            _mem: mem.clone(),
        };
        let me = this.clone();
        std::thread::Builder::new()
            .name("lazy-restore".into())
            .spawn(move || {
                let result = bulwark_sandbox::seccomp::confine_thread(
                    bulwark_sandbox::seccomp::Role::LazyRestore,
                )
                .map_err(|e| format!("cannot install the seccomp filter: {e}"))
                .and_then(|()| filler.run());
                let mut status = me.status.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(()) => {
                        let ms = me.began.elapsed().as_millis() as u64;
                        me.elapsed_ms.store(ms, Ordering::Relaxed);
                        *status = Status::Done;
                        me.changed.notify_all();
                        drop(status);
                        tracing::info!(info = ?me.info(), "lazy restore complete");
                    }
                    Err(reason) => {
                        *status = Status::Failed(reason.clone());
                        me.changed.notify_all();
                        drop(status);
                        on_fatal(reason);
                    }
                }
            })
            .map_err(SnapshotError::Io)?;
        Ok(this)
    }

    /// Waits until every block is in place; an error if one could not be.
    pub fn wait(&self) -> Result<(), SnapshotError> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*status {
                Status::Running => {
                    status = self.changed.wait(status).unwrap_or_else(|e| e.into_inner());
                }
                Status::Done => return Ok(()),
                Status::Failed(reason) => {
                    return Err(SnapshotError::Unsupported(format!(
                        "guest memory was not restored: {reason}"
                    )));
                }
            }
        }
    }

    /// How far it has got.
    pub fn info(&self) -> LazyRestoreInfo {
        let complete = matches!(
            *self.status.lock().unwrap_or_else(|e| e.into_inner()),
            Status::Done
        );
        LazyRestoreInfo {
            blocks: self.blocks,
            placed: self.placed.load(Ordering::Relaxed),
            on_demand: self.on_demand.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            complete,
            elapsed_ms: if complete {
                self.elapsed_ms.load(Ordering::Relaxed)
            } else {
                self.began.elapsed().as_millis() as u64
            },
        }
    }
}

struct Filler {
    sealed: SealedFile,
    uffd: Userfault,
    regions: Vec<Region>,
    buf: Vec<u8>,
    progress: Arc<LazyRestore>,
    _mem: GuestMemoryMmap,
}

impl Filler {
    fn run(mut self) -> Result<(), String> {
        let mut cursor = (0usize, 0u64);
        while self.progress.placed.load(Ordering::Relaxed) < self.progress.blocks {
            let faults = self
                .uffd
                .faults(0)
                .map_err(|e| format!("reading page faults: {e}"))?;
            for addr in &faults {
                let Some((r, b)) = self.locate(*addr) else {
                    continue;
                };
                if self.regions[r].chunk[b as usize].is_some() {
                    if self.fill(r, b)? {
                        self.progress.on_demand.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    self.zero(r, b)?;
                }
            }
            if !faults.is_empty() {
                continue;
            }
            // Nothing waits: place the next stored block in file order.
            while let Some(region) = self.regions.get(cursor.0) {
                if cursor.1 >= region.map.blocks() {
                    cursor = (cursor.0 + 1, 0);
                    continue;
                }
                let b = cursor.1;
                cursor.1 += 1;
                if region.chunk[b as usize].is_some() && !region.filled[b as usize] {
                    self.fill(cursor.0, b)?;
                    break;
                }
            }
        }
        // Every stored block is in place: the rest of RAM is zero, which is what the kernel
        // gives untouched memory anyway. Ending the registration wakes any thread still
        // waiting on a zero page.
        for r in &self.regions {
            self.uffd
                .unregister(r.host, r.map.size)
                .map_err(|e| format!("ending the userfaultfd registration: {e}"))?;
        }
        Ok(())
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (r.host..r.host + r.map.size)
                .contains(&addr)
                .then(|| (i, (addr - r.host) / BLOCK))
        })
    }

    /// Authenticates, decrypts and places stored block `b` of region `r`; `false` if it was
    /// already in place.
    fn fill(&mut self, r: usize, b: u64) -> Result<bool, String> {
        let region = &self.regions[r];
        if region.filled[b as usize] {
            return Ok(false);
        }
        let gpa = region.map.gpa + b * BLOCK;
        let chunk = region.chunk[b as usize].expect("a stored block");
        match self.sealed.read_chunk(chunk, &mut self.buf) {
            Ok(false) if self.buf.len() == MEMORY_BLOCK => {}
            Ok(_) => {
                return Err(format!(
                    "snapshot chunk {chunk} (guest memory at {gpa:#x}) is not a whole memory block"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "snapshot chunk {chunk} (guest memory at {gpa:#x}) cannot be used: {e}; the guest never saw it"
                ));
            }
        }
        let len = region.map.block_len(b) as usize;
        self.uffd
            .copy(region.host + b * BLOCK, &self.buf[..len])
            .map_err(|e| format!("placing guest memory at {gpa:#x}: {e}"))?;
        self.regions[r].filled[b as usize] = true;
        self.progress.placed.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn zero(&mut self, r: usize, b: u64) -> Result<(), String> {
        let region = &self.regions[r];
        self.uffd
            .zero(region.host + b * BLOCK, region.map.block_len(b))
            .map_err(|e| {
                format!(
                    "zeroing guest memory at {:#x}: {e}",
                    region.map.gpa + b * BLOCK
                )
            })?;
        self.progress.zero_faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
