//! A minimal i8042 keyboard controller: enough for Linux to find it quickly (self test,
//! command byte, keyboard reset and identify answered) and to reset the machine through it
//! (command 0xfe, which `reboot=k` uses). No keys are ever pressed.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::power::{PowerEvent, PowerSignal};

pub const I8042_DATA_PORT: u64 = 0x60;
pub const I8042_COMMAND_PORT: u64 = 0x64;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_COMMAND: u8 = 1 << 3;
/// Initial controller configuration byte: keyboard interrupt on, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;

#[derive(Debug)]
struct State {
    output: VecDeque<u8>,
    ctr: u8,
    /// The next data-port write is the argument of this command.
    pending: Option<u8>,
    last_was_command: bool,
}

pub struct I8042 {
    state: Mutex<State>,
    signal: PowerSignal,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    pub fn new(signal: PowerSignal) -> Self {
        Self {
            state: Mutex::new(State {
                output: VecDeque::new(),
                ctr: CTR_DEFAULT,
                pending: None,
                last_was_command: false,
            }),
            signal,
        }
    }

    /// Handles a write; `port` is 0 for data, 4 for command.
    fn write_port(&self, port: u64, v: u8) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A guest cannot grow the queue without bound.
        if s.output.len() > 16 {
            s.output.clear();
        }
        if port == 4 {
            s.last_was_command = true;
            match v {
                0x20 => {
                    let ctr = s.ctr;
                    s.output.push_back(ctr);
                }
                0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => s.pending = Some(v),
                0xaa => s.output.push_back(0x55), // controller self test passed
                0xab => s.output.push_back(0x00), // keyboard interface test passed
                0xfe => {
                    drop(s);
                    (self.signal)(PowerEvent::Reset);
                }
                _ => {} // enable/disable ports and the rest: nothing to answer
            }
            return;
        }
        s.last_was_command = false;
        match s.pending.take() {
            Some(0x60) => s.ctr = v,
            Some(_) => {} // output port, aux writes: accepted, no effect
            None => {
                // A command to the keyboard itself.
                s.output.push_back(0xfa); // ACK
                match v {
                    0xff => s.output.push_back(0xaa),      // reset: self test passed
                    0xf2 => s.output.extend([0xab, 0x83]), // identify: MF2 keyboard
                    _ => {}
                }
            }
        }
    }
}

impl crate::BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *b = match offset {
            0 => s.output.pop_front().unwrap_or(0),
            4 => {
                let mut st = STATUS_SYSTEM;
                if !s.output.is_empty() {
                    st |= STATUS_OUTPUT_FULL;
                }
                if s.last_was_command {
                    st |= STATUS_COMMAND;
                }
                st
            }
            _ => 0,
        };
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first()
            && (offset == 0 || offset == 4)
        {
            self.write_port(offset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::Arc;

    fn dev() -> (I8042, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            I8042::new(Arc::new(move |e| s.lock().unwrap().push(e))),
            seen,
        )
    }

    fn read(d: &I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn i8042_self_test_and_command_byte() {
        let (d, _) = dev();
        assert_eq!(read(&d, 4) & STATUS_OUTPUT_FULL, 0);
        d.write(4, &[0xaa]);
        assert_ne!(read(&d, 4) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&d, 0), 0x55);
        d.write(4, &[0x60]);
        d.write(0, &[0x47]);
        d.write(4, &[0x20]);
        assert_eq!(read(&d, 0), 0x47);
        d.write(0, &[0xf2]);
        assert_eq!((read(&d, 0), read(&d, 0), read(&d, 0)), (0xfa, 0xab, 0x83));
    }

    #[test]
    fn i8042_reset_command_resets_and_queue_is_bounded() {
        let (d, seen) = dev();
        for _ in 0..1000 {
            d.write(4, &[0xaa]);
        }
        let mut n = 0;
        while read(&d, 4) & STATUS_OUTPUT_FULL != 0 {
            read(&d, 0);
            n += 1;
        }
        assert!(n <= 17, "{n} bytes queued");
        d.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
