//! Shared stop state of one VM: the first stop reason wins, every thread sees the flag, and the
//! event loop is woken through an eventfd.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

impl VmControl {
    pub fn new(input: std::sync::Arc<ConsoleInput>) -> std::io::Result<Self> {
        Ok(Self {
            stopping: AtomicBool::new(false),
            reason: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            input,
        })
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
}
