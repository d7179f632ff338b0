//! The tests that boot stock Debian Linux guests in the nested rig (QEMU TCG with emulated SVM,
//! real kvm_amd in L1). Each module runs all its checks in one rig boot, as sections of one
//! script. They are one test binary so that the boots can overlap: each L1 is a single QEMU
//! TCG thread, so a two-core host runs two at full speed.
//!
//! When the binary runs unfiltered (as `cargo test` runs it), every boot is queued at the first
//! test, longest first, and as many lanes as the host has CPUs (`BULWARK_RIG_LANES` to choose)
//! take them in turn; tests wait for their module's boot. With a filter only the boots that a
//! selected test asks for run, one at a time. Host-side preparation (guest images, C test
//! programs) runs one boot at a time either way: boots share image directories under
//! `target/`. `BULWARK_RIG_ECHO=1` copies the consoles to stderr (interleaved when boots
//! overlap); each boot's wall time goes to stderr when it ends.

#[path = "../common/mod.rs"]
mod common;

mod backends_linux;
mod control_plane_linux;
mod linux_boot;
mod virtio_devices;
mod vmi_linux;

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::Instant;

use bulwark_testrig::{RigRun, RigSpec};

/// A module's rig boot.
struct Boot {
    name: &'static str,
    make: fn() -> (RigSpec, String),
}

/// Every boot, longest first (on 2026-11-28: virtio_devices 400–500 s, backends_linux ~350 s,
/// control_plane_linux ~180 s, vmi_linux ~100 s, linux_boot ~95 s), so that two lanes finish
/// close together.
const BOOTS: &[Boot] = &[
    Boot {
        name: "virtio_devices",
        make: virtio_devices::rig_spec,
    },
    Boot {
        name: "backends_linux",
        make: backends_linux::rig_spec,
    },
    Boot {
        name: "control_plane_linux",
        make: control_plane_linux::rig_spec,
    },
    Boot {
        name: "vmi_linux",
        make: vmi_linux::rig_spec,
    },
    Boot {
        name: "linux_boot",
        make: linux_boot::rig_spec,
    },
];

/// Where a boot is. A result is kept for the whole run (a failure too, so that every test of
/// the module reports it instead of booting again).
enum Slot {
    Queued,
    Running,
    Done(&'static Result<RigRun, String>),
}

struct Board {
    slots: Vec<Slot>,
    /// Lanes take every queued boot: a test only waits.
    lanes: bool,
}

static BOARD: Mutex<Option<Board>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();
/// Host-side preparation, one boot at a time.
static PREPARE: Mutex<()> = Mutex::new(());
static LANES: Once = Once::new();

fn board() -> BoardGuard {
    BOARD.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rig run of module `name` (a key of [`BOOTS`]); panics with the boot's error if it failed.
pub fn rig_run(name: &str) -> &'static RigRun {
    let i = BOOTS
        .iter()
        .position(|b| b.name == name)
        .unwrap_or_else(|| panic!("no rig boot named {name}"));
    LANES.call_once(start_lanes);
    let mut guard = board();
    loop {
        let b = guard.as_mut().expect("board set up by start_lanes");
        match b.slots[i] {
            Slot::Done(r) => return r.as_ref().unwrap_or_else(|e| panic!("{e}")),
            Slot::Running => {}
            Slot::Queued if b.lanes => {}
            Slot::Queued => {
                guard = take_and_boot(guard, i);
                continue;
            }
        }
        guard = CHANGED.wait(guard).unwrap_or_else(|e| e.into_inner());
    }
}

type BoardGuard = MutexGuard<'static, Option<Board>>;

/// Marks boot `i` running, runs it without holding the board, and records its result.
fn take_and_boot(mut guard: BoardGuard, i: usize) -> BoardGuard {
    if let Some(b) = guard.as_mut() {
        b.slots[i] = Slot::Running;
    }
    drop(guard);
    let r = boot(i);
    let mut guard = board();
    if let Some(b) = guard.as_mut() {
        b.slots[i] = Slot::Done(Box::leak(Box::new(r)));
    }
    CHANGED.notify_all();
    guard
}

/// Sets up the board, and starts the lanes when the binary runs unfiltered.
fn start_lanes() {
    let lanes = if unfiltered() { lane_count() } else { 0 };
    *board() = Some(Board {
        slots: BOOTS.iter().map(|_| Slot::Queued).collect(),
        lanes: lanes > 0,
    });
    for n in 0..lanes {
        std::thread::Builder::new()
            .name(format!("rig-lane-{n}"))
            .spawn(lane)
            .expect("spawning a rig lane");
    }
}

/// Takes queued boots, in order, until none is left.
fn lane() {
    loop {
        let guard = board();
        let Some(b) = guard.as_ref() else { return };
        let Some(i) = b.slots.iter().position(|s| matches!(s, Slot::Queued)) else {
            return;
        };
        drop(take_and_boot(guard, i));
    }
}

/// Prepares and runs boot `i`; a panic while preparing becomes its error.
fn boot(i: usize) -> Result<RigRun, String> {
    let b = &BOOTS[i];
    let t = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        common::require_kvm();
        let (spec, script) = {
            let _one = PREPARE.lock().unwrap_or_else(|e| e.into_inner());
            (b.make)()
        };
        match bulwark_testrig::run_script(&spec, &script) {
            Ok(run) if run.status == 0 => Ok(run),
            Ok(run) => Err(format!("rig script failed:\n{}", run.output)),
            Err(e) => Err(format!("rig: {e}")),
        }
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("preparing the rig boot failed: {msg}"))
    });
    // Straight to stderr: `eprintln!` here would go to the captured output of whichever test
    // started the lanes.
    let woken = match &r {
        Ok(run) if run.l1_woken > 0 => {
            format!(
                " (L1 lost its interrupts and a nudge woke it {} times)",
                run.l1_woken
            )
        }
        _ => String::new(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "rig boot {}: {} after {:.0?}{woken}",
        b.name,
        if r.is_ok() { "done" } else { "FAILED" },
        t.elapsed()
    );
    r
}

/// `BULWARK_RIG_LANES`, else the host's CPU count, at most one per boot.
fn lane_count() -> usize {
    let n = std::env::var("BULWARK_RIG_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    n.clamp(1, BOOTS.len())
}

/// Whether the test binary was started to run all its tests.
fn unfiltered() -> bool {
    // libtest's options that take a value.
    const VALUED: &[&str] = &[
        "--test-threads",
        "--skip",
        "--format",
        "--logfile",
        "--color",
        "-Z",
        "--shuffle-seed",
    ];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // A name filter, tests skipped, only ignored ones, or only a listing: boot on demand.
        if !a.starts_with('-') || ["--list", "--skip", "--ignored", "--exact"].contains(&a.as_str())
        {
            return false;
        }
        if VALUED.contains(&a.as_str()) {
            args.next();
        }
    }
    true
}

/// Output of rig script section `name` and the `status=N` it ended with.
pub fn section_status(run: &RigRun, name: &str) -> (String, i32) {
    let sections = run.sections();
    let out = sections
        .get(name)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.output))
        .to_string();
    let status = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("status="))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no status in section {name}:\n{out}"));
    (out, status)
}
