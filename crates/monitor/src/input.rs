//! Console input for payloads: the event loop fills a queue from stdin; the `read` host call
//! drains it; a vCPU whose read finds nothing waits outside the guest (where it can also be
//! paused) until bytes arrive, input ends, or the VM stops.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Most bytes buffered before the event loop stops reading stdin (back-pressure).
pub const INPUT_BUFFER_LIMIT: usize = 1 << 20;

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    eof: bool,
}

#[derive(Debug, Default)]
pub struct ConsoleInput {
    state: Mutex<State>,
    cond: Condvar,
}

impl ConsoleInput {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes from the host.
    pub fn push(&self, data: &[u8]) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.buf.extend(data);
        self.cond.notify_all();
    }

    /// Marks the end of input.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).eof = true;
        self.cond.notify_all();
    }

    /// Wakes every blocked reader (they re-check `stop`).
    pub fn wake(&self) {
        self.cond.notify_all();
    }

    /// A copy of the input not yet read (for snapshots).
    pub fn pending(&self) -> Vec<u8> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.buf.iter().copied().collect()
    }

    /// Whether the queue has room for more host input.
    pub fn has_room(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buf
            .len()
            < INPUT_BUFFER_LIMIT
    }

    /// Moves up to `out.len()` bytes into `out` without blocking: 0 bytes means input ended.
    pub fn try_read(&self, out: &mut [u8], stop: &AtomicBool) -> InputRead {
        if stop.load(Ordering::Acquire) {
            return InputRead::Stopped;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.buf.is_empty() || out.is_empty() {
            let n = out.len().min(s.buf.len());
            for (o, b) in out.iter_mut().zip(s.buf.drain(..n)) {
                *o = b;
            }
            return InputRead::Bytes(n);
        }
        if s.eof {
            return InputRead::Bytes(0);
        }
        InputRead::WouldBlock
    }

    /// Waits until input is there, input ended, [`ConsoleInput::wake`] is called, or `timeout`
    /// passes (a safety net: `wake` is the normal way out). The caller then re-checks.
    pub fn wait(&self, timeout: Duration) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.buf.is_empty() && !s.eof {
            let _ = self.cond.wait_timeout(s, timeout);
        }
    }
}

/// What [`ConsoleInput::try_read`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputRead {
    /// This many bytes were read (0: input ended).
    Bytes(usize),
    /// The VM is stopping.
    Stopped,
    /// Nothing yet: wait and try again.
    WouldBlock,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn input_try_read_drains_then_reports_eof_and_stop() {
        let input = Arc::new(ConsoleInput::new());
        let stop = AtomicBool::new(false);
        let mut b = [0u8; 3];
        assert_eq!(input.try_read(&mut b, &stop), InputRead::WouldBlock);
        let i2 = input.clone();
        let waiter = std::thread::spawn(move || i2.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "wait blocks while the queue is empty"
        );
        input.push(b"hello");
        waiter.join().unwrap();
        assert_eq!(input.try_read(&mut b, &stop), InputRead::Bytes(3));
        assert_eq!(&b, b"hel");
        let mut rest = [0u8; 8];
        assert_eq!(input.try_read(&mut rest, &stop), InputRead::Bytes(2));
        assert_eq!(&rest[..2], b"lo");
        input.close();
        assert_eq!(
            input.try_read(&mut rest, &stop),
            InputRead::Bytes(0),
            "eof after drain"
        );
        stop.store(true, Ordering::Release);
        assert_eq!(input.try_read(&mut rest, &stop), InputRead::Stopped);
    }
}
