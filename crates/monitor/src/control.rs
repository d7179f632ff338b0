//! Shared stop and pause state of one VM: the first stop reason wins, every thread sees the
//! flag, and the event loop is woken through an eventfd. Pausing parks every vCPU thread at the
//! top of its run loop, outside `KVM_RUN`, until resumed or stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::input::ConsoleInput;
use crate::outcome::StopReason;

#[derive(Debug)]
pub struct VmControl {
    stopping: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    /// Readable once the VM is stopping.
    pub exit_evt: EventFd,
    input: std::sync::Arc<ConsoleInput>,
    /// Fast check for the vCPU loop; the gate below is the truth.
    pause_requested: AtomicBool,
    gate: Mutex<Gate>,
    gate_changed: Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    /// vCPU threads parked at the gate.
    parked: u32,
}

impl VmControl {
    pub fn new(input: std::sync::Arc<ConsoleInput>) -> std::io::Result<Self> {
        Ok(Self {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            input,
            pause_requested: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            gate_changed: Condvar::new(),
        })
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to park. The caller kicks the vCPU threads out of `KVM_RUN` and waits
    /// with [`VmControl::wait_parked`].
    pub fn request_pause(&self) {
        self.gate().paused = true;
        self.pause_requested.store(true, Ordering::Release);
        // vCPUs waiting for console input look again and park.
        self.input.wake();
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.gate().paused = false;
        self.pause_requested.store(false, Ordering::Release);
        self.gate_changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.gate().paused
    }

    /// How many vCPU threads are parked now.
    pub fn parked(&self) -> u32 {
        self.gate().parked
    }

    /// Waits until `n` vCPU threads are parked, calling `kick` every millisecond meanwhile (a
    /// kick can land just before a thread enters `KVM_RUN` and be lost). False on timeout.
    pub fn wait_parked(&self, n: u32, timeout: Duration, kick: &dyn Fn()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.gate();
        loop {
            if g.parked >= n {
                return true;
            }
            if self.is_stopping() || Instant::now() >= deadline {
                return false;
            }
            drop(g);
            kick();
            g = self.gate();
            g = self
                .gate_changed
                .wait_timeout(g, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Called by a vCPU thread outside `KVM_RUN`: parks while a pause is in force. `serve` runs
    /// on the parked thread whenever it is woken (jobs that need the vCPU's own fd).
    pub fn park_if_paused(&self, serve: &mut dyn FnMut()) {
        if !self.pause_requested.load(Ordering::Acquire) {
            return;
        }
        let mut g = self.gate();
        if !g.paused {
            return;
        }
        g.parked += 1;
        self.gate_changed.notify_all();
        while g.paused && !self.is_stopping() {
            drop(g);
            serve();
            g = self.gate();
            if !g.paused || self.is_stopping() {
                break;
            }
            g = self
                .gate_changed
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
        self.gate_changed.notify_all();
    }

    /// Wakes parked threads so they look for work (see `park_if_paused`).
    pub fn nudge(&self) {
        self.gate_changed.notify_all();
    }

    /// Requests a stop. Only the first reason is kept.
    pub fn stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stopping.store(true, Ordering::Release);
        // A full eventfd counter still leaves it readable, which is all the loop needs.
        let _ = self.exit_evt.write(1);
        self.input.wake();
        // Parked vCPUs leave the gate.
        let _g = self.gate();
        self.gate_changed.notify_all();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn flag(&self) -> &AtomicBool {
        &self.stopping
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_first_reason_wins_and_signals() {
        let c = VmControl::new(Default::default()).unwrap();
        assert!(!c.is_stopping());
        c.stop(StopReason::Exited(3));
        c.stop(StopReason::Exited(4));
        assert!(c.is_stopping());
        assert_eq!(c.reason(), Some(StopReason::Exited(3)));
        assert!(c.exit_evt.read().unwrap() >= 1);
    }

    #[test]
    fn pause_parks_threads_until_resume_or_stop() {
        let c = std::sync::Arc::new(VmControl::new(Default::default()).unwrap());
        let running = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (c, running) = (c.clone(), running.clone());
                std::thread::spawn(move || {
                    while !c.is_stopping() {
                        c.park_if_paused(&mut || {});
                        running.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        c.request_pause();
        assert!(c.wait_parked(2, Duration::from_secs(10), &|| {}));
        let at = running.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(running.load(Ordering::Relaxed), at, "a parked thread ran");
        c.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::Relaxed) == at && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(
            running.load(Ordering::Relaxed) > at,
            "resume did not release the threads"
        );
        c.request_pause();
        assert!(c.wait_parked(2, Duration::from_secs(10), &|| {}));
        c.stop(StopReason::Exited(0));
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.parked(), 0);
    }
}
