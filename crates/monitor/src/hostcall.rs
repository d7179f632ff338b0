//! Host calls of function micro-VMs (ABI in [`crate::abi`]). Every argument is guest-controlled:
//! buffers the host writes must lie entirely in the payload's own memory, never in the system
//! area the monitor built (page tables, descriptor tables, stubs), so a host call cannot be used
//! to rewrite them; buffers the host reads may also lie in the read-only info page.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use bulwark_devices::console::ConsoleSink;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi::{call, errno};
use crate::input::{ConsoleInput, InputRead};
use crate::payload::Layout;

/// Data is moved in chunks of this size, so a huge buffer costs no huge allocation.
const CHUNK: usize = 64 * 1024;

/// Where the `read` host call gets its bytes.
#[derive(Debug)]
pub enum InputSource {
    /// Filled by the event loop (pipes, terminals, in-memory input).
    Queue(Arc<ConsoleInput>),
    /// Read straight from the monitor's stdin (regular files, which epoll cannot watch).
    DirectStdin,
}

/// What the vCPU does after a host call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCallResult {
    /// Put this value in `rax` and resume.
    Return(u64),
    /// The payload asked to exit with this status.
    Exit(u32),
    /// No input yet: the vCPU waits outside the guest and makes the call again.
    WouldBlock,
    /// The VM is stopping; abandon the call.
    Stopped,
}

fn err(e: i64) -> HostCallResult {
    HostCallResult::Return((-e) as u64)
}

#[derive(Debug)]
pub struct HostCalls {
    pub layout: Layout,
    pub stdout: Arc<ConsoleSink>,
    pub stderr: Arc<ConsoleSink>,
    pub input: InputSource,
    pub start: Instant,
}

impl HostCalls {
    /// Serves call `nr` with arguments `args` (rdi, rsi, rdx).
    pub fn handle(
        &self,
        mem: &GuestMemoryMmap,
        nr: u32,
        args: [u64; 3],
        stop: &AtomicBool,
    ) -> HostCallResult {
        match nr {
            call::EXIT => HostCallResult::Exit((args[0] & 0xff) as u32),
            call::WRITE => self.write(mem, args[0], args[1], args[2]),
            call::READ => self.read(mem, args[0], args[1], stop),
            call::CLOCK => HostCallResult::Return(
                u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX),
            ),
            call::RANDOM => self.random(mem, args[0], args[1]),
            _ => err(errno::ENOSYS),
        }
    }

    /// Waits (at most `timeout`) for console input after a read found none.
    pub fn wait_for_input(&self, timeout: std::time::Duration) {
        match &self.input {
            InputSource::Queue(q) => q.wait(timeout),
            InputSource::DirectStdin => {}
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, fd: u64, ptr: u64, len: u64) -> HostCallResult {
        let sink = match fd {
            1 => &self.stdout,
            2 => &self.stderr,
            _ => return err(errno::EBADF),
        };
        if !self.layout.is_host_readable(ptr, len) {
            return err(errno::EFAULT);
        }
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            if mem
                .read_slice(&mut buf[..n], GuestAddress(ptr + done))
                .is_err()
            {
                return err(errno::EFAULT);
            }
            if sink.write(&buf[..n]).is_err() {
                return err(errno::EIO);
            }
            done += n as u64;
        }
        HostCallResult::Return(len)
    }

    fn read(&self, mem: &GuestMemoryMmap, ptr: u64, len: u64, stop: &AtomicBool) -> HostCallResult {
        if !self.layout.is_payload_memory(ptr, len) {
            return err(errno::EFAULT);
        }
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let n = match &self.input {
            InputSource::Queue(q) => match q.try_read(&mut buf, stop) {
                InputRead::Bytes(n) => n,
                InputRead::Stopped => return HostCallResult::Stopped,
                InputRead::WouldBlock => return HostCallResult::WouldBlock,
            },
            InputSource::DirectStdin => match std::io::stdin().lock().read(&mut buf) {
                Ok(n) => n,
                Err(_) => return err(errno::EIO),
            },
        };
        if mem.write_slice(&buf[..n], GuestAddress(ptr)).is_err() {
            return err(errno::EFAULT);
        }
        HostCallResult::Return(n as u64)
    }

    fn random(&self, mem: &GuestMemoryMmap, ptr: u64, len: u64) -> HostCallResult {
        if !self.layout.is_payload_memory(ptr, len) {
            return err(errno::EFAULT);
        }
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min((len - done) as usize);
            if getrandom::fill(&mut buf[..n]).is_err() {
                return err(errno::EIO);
            }
            if mem
                .write_slice(&buf[..n], GuestAddress(ptr + done))
                .is_err()
            {
                return err(errno::EFAULT);
            }
            done += n as u64;
        }
        HostCallResult::Return(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::layout::{PAGE_TABLES_ADDR, PAYLOAD_ADDR};
    use std::io::Write;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn setup() -> (HostCalls, GuestMemoryMmap, Shared, Arc<ConsoleInput>) {
        let out = Shared::default();
        let input = Arc::new(ConsoleInput::new());
        let hc = HostCalls {
            layout: Layout::new(4 << 20, 1).unwrap(),
            stdout: Arc::new(ConsoleSink::new(Box::new(out.clone()), 1 << 20)),
            stderr: Arc::new(ConsoleSink::new(Box::new(std::io::sink()), 1 << 20)),
            input: InputSource::Queue(input.clone()),
            start: Instant::now(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        (hc, mem, out, input)
    }

    #[test]
    fn hostcall_write_copies_guest_buffer() {
        let (hc, mem, out, _) = setup();
        let stop = AtomicBool::new(false);
        mem.write_slice(b"hi there", GuestAddress(PAYLOAD_ADDR))
            .unwrap();
        let r = hc.handle(&mem, call::WRITE, [1, PAYLOAD_ADDR, 8], &stop);
        assert_eq!(r, HostCallResult::Return(8));
        assert_eq!(&*out.0.lock().unwrap(), b"hi there");
        assert_eq!(
            hc.handle(&mem, call::WRITE, [7, PAYLOAD_ADDR, 1], &stop),
            err(errno::EBADF)
        );
    }

    #[test]
    fn hostcall_buffers_outside_payload_memory_get_efault() {
        let (hc, mem, _, input) = setup();
        let stop = AtomicBool::new(false);
        input.push(b"x");
        for (nr, args) in [
            (call::WRITE, [1, PAGE_TABLES_ADDR, 8]),
            (call::WRITE, [1, u64::MAX - 4, 8]),
            (call::WRITE, [1, PAYLOAD_ADDR, u64::MAX]),
            (call::READ, [PAGE_TABLES_ADDR, 1, 0]),
            (call::RANDOM, [0, 16, 0]),
            (call::RANDOM, [(4 << 20) - 8, 16, 0]),
        ] {
            assert_eq!(
                hc.handle(&mem, nr, args, &stop),
                err(errno::EFAULT),
                "{nr} {args:?}"
            );
        }
        let mut pt = [0u8; 8];
        mem.read_slice(&mut pt, GuestAddress(PAGE_TABLES_ADDR))
            .unwrap();
        assert_eq!(pt, [0; 8], "system area untouched");
    }

    #[test]
    fn hostcall_read_random_clock_exit_unknown() {
        let (hc, mem, _, input) = setup();
        let stop = AtomicBool::new(false);
        input.push(b"abc");
        assert_eq!(
            hc.handle(&mem, call::READ, [PAYLOAD_ADDR, 16, 0], &stop),
            HostCallResult::Return(3)
        );
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(PAYLOAD_ADDR)).unwrap();
        assert_eq!(&b, b"abc");
        input.close();
        assert_eq!(
            hc.handle(&mem, call::READ, [PAYLOAD_ADDR, 16, 0], &stop),
            HostCallResult::Return(0)
        );
        assert_eq!(
            hc.handle(&mem, call::RANDOM, [PAYLOAD_ADDR, 200_000, 0], &stop),
            HostCallResult::Return(200_000)
        );
        let mut r = vec![0u8; 200_000];
        mem.read_slice(&mut r, GuestAddress(PAYLOAD_ADDR)).unwrap();
        assert!(
            r.iter().filter(|&&x| x == 0).count() < 10_000,
            "looks random"
        );
        let HostCallResult::Return(t1) = hc.handle(&mem, call::CLOCK, [0; 3], &stop) else {
            panic!()
        };
        let HostCallResult::Return(t2) = hc.handle(&mem, call::CLOCK, [0; 3], &stop) else {
            panic!()
        };
        assert!(t2 >= t1);
        assert_eq!(
            hc.handle(&mem, call::EXIT, [0x1_2a, 0, 0], &stop),
            HostCallResult::Exit(0x2a)
        );
        assert_eq!(hc.handle(&mem, 99, [0; 3], &stop), err(errno::ENOSYS));
    }
}
