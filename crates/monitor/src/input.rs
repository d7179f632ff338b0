//! Console input for payloads: the event loop fills a queue from stdin; the `read` host call
//! drains it, blocking its vCPU until bytes arrive, input ends, or the VM stops.

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

    /// Whether the queue has room for more host input.
    pub fn has_room(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buf
            .len()
            < INPUT_BUFFER_LIMIT
    }

    /// Moves up to `out.len()` bytes into `out`. Blocks until at least one byte is there, input
    /// ended (returns 0) or `stop` is set (returns `None`).
    pub fn read(&self, out: &mut [u8], stop: &AtomicBool) -> Option<usize> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            if !s.buf.is_empty() || out.is_empty() {
                let n = out.len().min(s.buf.len());
                for (o, b) in out.iter_mut().zip(s.buf.drain(..n)) {
                    *o = b;
                }
                return Some(n);
            }
            if s.eof {
                return Some(0);
            }
            // The timeout is a safety net: `wake` is the normal way out.
            s = self
                .cond
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn input_read_blocks_until_push_then_eof() {
        let input = Arc::new(ConsoleInput::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2) = (input.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 3];
            let n = i2.read(&mut b, &s2).unwrap();
            b[..n].to_vec()
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !reader.is_finished(),
            "reader blocks while the queue is empty"
        );
        input.push(b"hello");
        assert_eq!(reader.join().unwrap(), b"hel");
        let mut rest = [0u8; 8];
        assert_eq!(input.read(&mut rest, &stop), Some(2));
        assert_eq!(&rest[..2], b"lo");
        input.close();
        assert_eq!(input.read(&mut rest, &stop), Some(0), "eof after drain");
    }

    #[test]
    fn input_read_returns_none_when_stopped() {
        let input = ConsoleInput::new();
        let stop = AtomicBool::new(true);
        assert_eq!(input.read(&mut [0u8; 4], &stop), None);
    }
}
