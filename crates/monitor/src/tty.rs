//! Raw terminal mode for a Linux guest's console, and the escape sequence that leaves it.
//!
//! With a terminal on stdin, keystrokes go to the guest unprocessed (Ctrl-C reaches the guest's
//! shell, not bulwark). `Ctrl-A x` ends the VM; `Ctrl-A Ctrl-A` sends one Ctrl-A.

use std::io;

/// First byte of the escape sequence (Ctrl-A).
pub const ESCAPE: u8 = 0x01;
/// Second byte that quits.
pub const QUIT: u8 = b'x';

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawTerminal {
    saved: libc::termios,
}

impl std::fmt::Debug for RawTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawTerminal")
    }
}

impl RawTerminal {
    /// Raw mode if stdin is a terminal; `None` otherwise.
    pub fn enable_if_tty() -> io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills the termios struct we pass for a valid descriptor.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, saved.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded, so the struct is initialised.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads the struct we pass for a valid descriptor.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read at creation on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// Recognises `Ctrl-A <key>` in a stream of input, across reads (`Ctrl-A x` quits a `bulwark
/// run` console, `Ctrl-A d` detaches from a bulwarkd console); `Ctrl-A Ctrl-A` sends one
/// `Ctrl-A`.
#[derive(Debug)]
pub struct EscapeFilter {
    armed: bool,
    key: u8,
}

impl Default for EscapeFilter {
    /// `Ctrl-A x`.
    fn default() -> Self {
        Self::new(QUIT)
    }
}

impl EscapeFilter {
    /// A filter for `Ctrl-A key`.
    pub fn new(key: u8) -> Self {
        Self { armed: false, key }
    }

    /// Filters `data` in place; returns the bytes to pass to the guest and whether the user
    /// asked to quit.
    pub fn filter(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(data.len());
        for &b in data {
            if self.armed {
                self.armed = false;
                match b {
                    k if k == self.key => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_quits_and_double_escape_passes_through() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(
            f.filter(&[ESCAPE, ESCAPE, b'a']),
            (vec![ESCAPE, b'a'], false)
        );
        assert_eq!(f.filter(&[b'q', ESCAPE]), (vec![b'q'], false));
        assert_eq!(f.filter(b"x rest"), (vec![], true), "split across reads");
        assert_eq!(f.filter(&[ESCAPE, b'b']), (vec![ESCAPE, b'b'], false));
    }

    #[test]
    fn escape_with_another_key_detaches_on_it_only() {
        let mut f = EscapeFilter::new(b'd');
        assert_eq!(f.filter(&[ESCAPE, b'x']), (vec![ESCAPE, b'x'], false));
        assert_eq!(f.filter(&[ESCAPE]), (vec![], false));
        assert_eq!(f.filter(b"d"), (vec![], true));
    }
}
