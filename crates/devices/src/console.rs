//! The console sink: where every guest output path (16550, debug port, host calls) writes.
//!
//! A guest can write without end. The sink forwards at most `limit` bytes to its writer and
//! drops and counts the rest, so a flooding guest cannot fill the host's disk or log.

use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Console output shared by all devices of one VM.
pub struct ConsoleSink {
    out: Mutex<Box<dyn Write + Send>>,
    limit: u64,
    written: AtomicU64,
    dropped: AtomicU64,
    warned: AtomicBool,
    watch: Option<Mutex<MarkerWatch>>,
}

/// Watches the output for lines that start with a marker and keeps the rest of the last one
/// (how a guest image reports its job's exit status on the console).
#[derive(Debug)]
struct MarkerWatch {
    prefix: Vec<u8>,
    line: Vec<u8>,
    found: Option<String>,
}

/// Longest line the watch looks at; longer lines cannot be markers.
const MARKER_LINE_MAX: usize = 256;

impl MarkerWatch {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                if let Some(rest) = self.line.strip_prefix(self.prefix.as_slice()) {
                    self.found = Some(String::from_utf8_lossy(rest).trim().to_string());
                }
                self.line.clear();
            } else if self.line.len() < MARKER_LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("limit", &self.limit)
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl ConsoleSink {
    /// A sink that passes at most `limit` bytes to `out`.
    pub fn new(out: Box<dyn Write + Send>, limit: u64) -> Self {
        Self {
            out: Mutex::new(out),
            limit,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            watch: None,
        }
    }

    /// Also watch for lines starting with `prefix`; see [`ConsoleSink::marker`].
    pub fn with_marker(mut self, prefix: &str) -> Self {
        self.watch = Some(Mutex::new(MarkerWatch {
            prefix: prefix.as_bytes().to_vec(),
            line: Vec::new(),
            found: None,
        }));
        self
    }

    /// The rest of the last complete line that started with the marker, if any.
    pub fn marker(&self) -> Option<String> {
        self.watch
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .found
            .clone()
    }

    /// Writes guest output. Returns how many bytes the guest is told were written: all of them,
    /// even when some were dropped at the limit (the guest cannot tell, and must not stall).
    pub fn write(&self, data: &[u8]) -> io::Result<usize> {
        if let Some(w) = &self.watch {
            w.lock().unwrap_or_else(|e| e.into_inner()).feed(data);
        }
        let prev = self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        let room = self.limit.saturating_sub(prev);
        let keep = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if keep < data.len() {
            self.dropped
                .fetch_add((data.len() - keep) as u64, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    limit = self.limit,
                    "console output limit reached; further guest output is dropped (raise it with --console-limit)"
                );
            }
        }
        if keep > 0 {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            out.write_all(&data[..keep])?;
            out.flush()?;
        }
        Ok(data.len())
    }

    /// Bytes the guest tried to write, including dropped ones.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes dropped because the limit was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A one-byte output port (the Bochs/QEMU "debug console" convention, port 0xe9).
#[derive(Debug)]
pub struct DebugPort {
    sink: std::sync::Arc<ConsoleSink>,
}

impl DebugPort {
    pub fn new(sink: std::sync::Arc<ConsoleSink>) -> Self {
        Self { sink }
    }
}

impl crate::BusDevice for DebugPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Reading 0xe9 answers 0xe9 by convention: a guest can probe for the port.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = 0xe9;
        }
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        // Only the low byte of a wider write is a character.
        if let Some(b) = data.first()
            && let Err(e) = self.sink.write(std::slice::from_ref(b))
        {
            tracing::debug!(error = %e, "console write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_limit_drops_and_counts_excess() {
        let buf = Shared::default();
        let sink = ConsoleSink::new(Box::new(buf.clone()), 5);
        assert_eq!(sink.write(b"abc").unwrap(), 3);
        assert_eq!(sink.write(b"defg").unwrap(), 4);
        assert_eq!(sink.write(b"h").unwrap(), 1);
        assert_eq!(&*buf.0.lock().unwrap(), b"abcde");
        assert_eq!((sink.written(), sink.dropped()), (8, 3));
    }

    #[test]
    fn console_marker_keeps_last_matching_line() {
        let sink = ConsoleSink::new(Box::new(io::sink()), 1 << 20).with_marker("job: status ");
        assert_eq!(sink.marker(), None);
        sink.write(b"boot\njob: status 3\n").unwrap();
        sink.write(b"job: st").unwrap();
        sink.write(b"atus 42 \nnoise job: status 9\n").unwrap();
        assert_eq!(sink.marker().as_deref(), Some("42"));
        sink.write(b"job: status 7").unwrap(); // incomplete line: not yet
        assert_eq!(sink.marker().as_deref(), Some("42"));
    }

    #[test]
    fn debug_port_writes_low_byte() {
        use crate::BusDevice;
        let buf = Shared::default();
        let port = DebugPort::new(Arc::new(ConsoleSink::new(Box::new(buf.clone()), 100)));
        port.write(0, &[b'h', 0, 0, 0]);
        port.write(0, b"i");
        let mut d = [0u8; 2];
        port.read(0, &mut d);
        assert_eq!(d, [0xe9, 0]);
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
    }
}
