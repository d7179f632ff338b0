//! virtio-blk with its file I/O in a back-end process (`backend=process`): a guest driver's
//! ring in real memory, a real image file, a real launcher and back-end process, real
//! `kill -9`s. Checks that the requests of one queue notification travel to the back-end
//! together (more than one in flight), that requests larger than the I/O window and batches
//! larger than it arrive intact, and that a back-end that dies in the middle of a batch (the
//! debug-build probe makes it call exit_group after 20 requests), between batches
//! or at any moment (`kill -9` from a racing thread) is replaced, with every request answered
//! OK and every byte where the guest put it. Not a libtest harness: the launcher must be
//! forked while the process has one thread.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bulwark_backends::launcher::Launcher;
use bulwark_backends::window::BLOCK_WINDOW;
use bulwark_devices::virtio::block::{Block, DriveConfig, SECTOR, req, status};
use bulwark_devices::virtio::driver::SplitRing;
use bulwark_devices::virtio::{
    Interrupt, InterruptLine, Isolation, VIRTIO_F_VERSION_1, VirtioDevice,
};
use common::{backend_pid, kill9};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 64 << 20;
const RING: u16 = 256;
/// Request headers and status bytes: 32 bytes per request slot.
const SLOTS: u64 = 0x10000;
/// Data buffers, from here on.
const DATA: u64 = 1 << 20;
const IMAGE: u64 = 32 << 20;
const BLOCK: u64 = 64 << 10;

struct Line(AtomicU32);
impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request of a batch: type, first sector, guest data address and length.
#[derive(Clone, Copy)]
struct Req {
    kind: u32,
    sector: u64,
    data: u64,
    len: u32,
}

struct Guest {
    dev: Block,
    mem: GuestMemoryMmap,
    ring: SplitRing,
    image: PathBuf,
}

impl Guest {
    /// Offers every request of `batch` before the device looks, then lets it serve the queue
    /// once (one notification); returns each request's status byte and used length.
    fn run(&mut self, batch: &[Req]) -> Vec<(u8, u32)> {
        let before = self.ring.used_idx(&self.mem);
        let mut heads = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            let slot = SLOTS + 32 * i as u64;
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&r.kind.to_le_bytes());
            hdr[8..16].copy_from_slice(&r.sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(slot)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(slot + 16)).unwrap();
            let mut bufs = vec![(slot, 16, false)];
            if r.len > 0 {
                bufs.push((r.data, r.len, r.kind != req::OUT));
            }
            bufs.push((slot + 16, 1, true));
            heads.push(self.ring.push(&self.mem, &bufs));
        }
        self.dev.process_queue(0);
        let after = self.ring.used_idx(&self.mem);
        assert_eq!(
            after.wrapping_sub(before) as usize,
            batch.len(),
            "every request of the batch is answered in one pass"
        );
        (0..batch.len())
            .map(|n| {
                let (id, len) = self
                    .ring
                    .used_elem(&self.mem, before.wrapping_add(n as u16));
                let i = heads
                    .iter()
                    .position(|&h| u32::from(h) == id)
                    .expect("a used id the guest offered");
                let st: u8 = self
                    .mem
                    .read_obj(GuestAddress(SLOTS + 32 * i as u64 + 16))
                    .unwrap();
                (i, st, len)
            })
            .fold(vec![(0xff, 0); batch.len()], |mut out, (i, st, len)| {
                out[i] = (st, len);
                out
            })
    }

    fn fill(&self, at: u64, len: u64, seed: u64) {
        self.mem
            .write_slice(&pattern(len, seed), GuestAddress(at))
            .unwrap();
    }

    fn read(&self, at: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn file(&self, offset: u64, len: u64) -> Vec<u8> {
        let f = std::fs::File::open(&self.image).unwrap();
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, offset).unwrap();
        v
    }

    fn stats(&self) -> bulwark_devices::virtio::DeviceCounters {
        self.dev.stats().snapshot()
    }
}

/// `len` bytes that differ with `seed` and along the run.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 8).wrapping_mul(0x9E37_79B9).wrapping_add(seed * 131) >> 3) as u8)
        .collect()
}

/// `n` 64 KiB requests of `kind` at blocks `first..first+n`, their data at consecutive guest
/// buffers from `DATA`.
fn blocks(kind: u32, first: u64, n: u64) -> Vec<Req> {
    (0..n)
        .map(|i| Req {
            kind,
            sector: (first + i) * BLOCK / SECTOR,
            data: DATA + i * BLOCK,
            len: BLOCK as u32,
        })
        .collect()
}

fn flush() -> Req {
    Req {
        kind: req::FLUSH,
        sector: 0,
        data: 0,
        len: 0,
    }
}

fn all_ok(answers: &[(u8, u32)], what: &str) {
    for (i, (st, _)) in answers.iter().enumerate() {
        assert_eq!(*st, status::OK, "{what}: request {i} answered {st}");
    }
}

/// The first back-end's probe: exit_group after 20 requests (outside a jail no seccomp policy
/// is installed, so the probe's call must end the process by itself).
const PROBE: &str = "blk0:231";

fn main() {
    // The probe is read from the environment the launcher inherits: run again with it set.
    if std::env::var_os("BULWARK_BACKEND_PROBE").is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env("BULWARK_BACKEND_PROBE", PROBE)
            .status()
            .expect("the test run again with the back-end probe");
        std::process::exit(status.code().unwrap_or(1));
    }
    let launcher = Launcher::start()
        .expect("the back-end launcher (forked while this test has one thread)")
        .install();
    let dir = std::env::temp_dir().join(format!("bulwark-blk-backend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE)
        .unwrap();
    let mut dev = Block::open(
        &DriveConfig {
            path: image.clone(),
            read_only: false,
            direct: false,
            serial: "batch-test".into(),
            isolation: Isolation::Process,
        },
        "blk0",
    )
    .expect("a drive with a back-end");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let ring = SplitRing::new(0x1000, 0x2000, 0x3000, RING);
    let irq = Interrupt::new(Arc::new(Line(AtomicU32::new(0))));
    dev.activate(mem.clone(), VIRTIO_F_VERSION_1, vec![ring.queue()], irq)
        .unwrap();
    let mut g = Guest {
        dev,
        mem,
        ring,
        image,
    };
    let first = backend_pid(launcher.pid(), "bw-blk0").expect("a bw-blk0 process");

    // One notification: 40 writes of 64 KiB (1.25 windows), one 3 MiB write (larger than the
    // window: sent in pieces), a flush. The first back-end exits after answering 20 of the
    // first window-full: the next one gets the other 12 and the rest.
    let mut batch = blocks(req::OUT, 0, 40);
    let big = Req {
        kind: req::OUT,
        sector: 40 * BLOCK / SECTOR,
        data: DATA + 40 * BLOCK,
        len: 3 << 20,
    };
    assert!(u64::from(big.len) > BLOCK_WINDOW);
    batch.push(big);
    batch.push(flush());
    g.fill(DATA, 40 * BLOCK + u64::from(big.len), 1);
    all_ok(&g.run(&batch), "writes");
    let written = 40 * BLOCK + u64::from(big.len);
    assert!(
        g.file(0, written) == pattern(written, 1),
        "the file holds what the guest wrote"
    );
    let s = g.stats();
    assert!(
        s.backend_peak_in_flight >= BLOCK_WINDOW / BLOCK,
        "a window-full of requests travels together: {s}"
    );
    assert_eq!(
        (s.restarts, s.io_errors),
        (1, 0),
        "the probe's exit cost one restart and no request: {s}"
    );
    let first = {
        let now = backend_pid(launcher.pid(), "bw-blk0").expect("a new bw-blk0 process");
        assert_ne!(now, first);
        now
    };

    // Read it all back into other buffers, in one notification.
    g.fill(DATA, written, 99);
    let mut reads = blocks(req::IN, 0, 40);
    reads.push(Req {
        kind: req::IN,
        ..big
    });
    let answers = g.run(&reads);
    all_ok(&answers, "reads");
    assert!(
        answers[..40]
            .iter()
            .all(|&(_, n)| u64::from(n) == BLOCK + 1)
            && answers[40].1 == big.len + 1,
        "a read's used length is its data and the status byte: {:?}",
        &answers[38..]
    );
    assert!(
        g.read(DATA, written) == pattern(written, 1),
        "the guest reads back what it wrote"
    );

    // The back-end is killed between notifications: the next batch starts a new one.
    assert_eq!(kill9(first), 0);
    while backend_pid(launcher.pid(), "bw-blk0") == Some(first) {
        std::thread::sleep(Duration::from_millis(1));
    }
    g.fill(DATA, 20 * BLOCK, 2);
    let mut batch = blocks(req::OUT, 0, 20);
    batch.push(flush());
    all_ok(&g.run(&batch), "writes after a kill");
    assert!(g.file(0, 20 * BLOCK) == pattern(20 * BLOCK, 2));
    assert_eq!(g.stats().restarts, 2, "one kill, one restart");

    // Killed while it serves a batch (a killer thread races the device): whatever it had
    // not answered goes to the next back-end; every request ends OK with its data in place.
    let mut kills = 2;
    for round in 0..6u64 {
        let victim = backend_pid(launcher.pid(), "bw-blk0").expect("a live back-end");
        let delay = Duration::from_micros(200 + 700 * round);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            kill9(victim)
        });
        let seed = 10 + round;
        g.fill(DATA, 80 * BLOCK, seed);
        let mut batch = blocks(req::OUT, 0, 80);
        batch.push(flush());
        all_ok(&g.run(&batch), "writes under a kill");
        assert_eq!(killer.join().unwrap(), 0);
        kills += 1;
        g.fill(DATA, 80 * BLOCK, 0);
        all_ok(&g.run(&blocks(req::IN, 0, 80)), "reads after a kill");
        assert!(
            g.read(DATA, 80 * BLOCK) == pattern(80 * BLOCK, seed),
            "round {round}: every write of the batch landed and reads back"
        );
    }
    // A kill that came after its batch was served is found by the next request.
    all_ok(&g.run(&[flush()]), "a last flush");
    let s = g.stats();
    assert_eq!(s.restarts, kills, "every death cost one restart: {s}");
    assert_eq!(s.io_errors, 0, "{s}");
    println!(
        "block back-end: batches, pieces, an exit mid-batch, {} kills: ok ({s})",
        kills - 1
    );
    drop(g);
    let _ = std::fs::remove_dir_all(&dir);
}
