//! [`SealWriter`]: seals a stream of unknown length, one chunk at a time.

use std::io::{self, Write};

use zeroize::Zeroizing;

use crate::header::ChunkCipher;
use crate::{DEFAULT_CHUNK_SIZE, OwnerKey, SealError, TAG_LEN};

/// Seals what is written to it into `out`. The header goes out at construction; after that
/// one chunk is held back until the writer knows whether it is the final one, that is until
/// more data arrives or [`SealWriter::finish`].
///
/// A writer dropped without `finish` leaves a file without a final chunk, which readers refuse
/// as truncated. After any error the writer refuses further use ([`SealError::Poisoned`]).
pub struct SealWriter<W: Write> {
    out: W,
    cipher: ChunkCipher,
    /// Plaintext of the pending chunk (up to `chunk_size` bytes), sealed in place.
    buf: Zeroizing<Vec<u8>>,
    chunk_size: usize,
    next_index: u64,
    plaintext_len: u64,
    failed: bool,
}

impl<W: Write> SealWriter<W> {
    /// Starts a sealed file of `kind` on `out` with the default 64 KiB chunks, under a fresh
    /// data key wrapped with `key`, and writes the header.
    pub fn new(out: W, key: &OwnerKey, kind: &str) -> Result<Self, SealError> {
        Self::with_chunk_size(out, key, kind, DEFAULT_CHUNK_SIZE)
    }

    /// Like [`SealWriter::new`] with `chunk_size` plaintext bytes per chunk
    /// ([`MIN_CHUNK_SIZE`](crate::MIN_CHUNK_SIZE)..=[`MAX_CHUNK_SIZE`](crate::MAX_CHUNK_SIZE)).
    pub fn with_chunk_size(
        mut out: W,
        key: &OwnerKey,
        kind: &str,
        chunk_size: u32,
    ) -> Result<Self, SealError> {
        let cipher = ChunkCipher::create(key, kind, chunk_size)?;
        out.write_all(cipher.header()).map_err(SealError::Io)?;
        let chunk_size = chunk_size as usize;
        Ok(Self {
            out,
            cipher,
            buf: Zeroizing::new(Vec::with_capacity(chunk_size + TAG_LEN)),
            chunk_size,
            next_index: 0,
            plaintext_len: 0,
            failed: false,
        })
    }

    /// Plaintext bytes accepted so far (sealed or still buffered).
    pub fn bytes_written(&self) -> u64 {
        self.plaintext_len
    }

    /// Seals the pending data as the final chunk (an empty one if nothing is pending), flushes
    /// `out` and returns it.
    pub fn finish(mut self) -> Result<W, SealError> {
        self.emit(true)?;
        self.out.flush().map_err(SealError::Io)?;
        Ok(self.out)
    }

    /// Seals and writes the pending chunk.
    fn emit(&mut self, last: bool) -> Result<(), SealError> {
        if self.failed {
            return Err(SealError::Poisoned);
        }
        // Whatever happens below, the buffer no longer holds plaintext that can be retried.
        self.failed = true;
        self.cipher
            .seal_chunk(self.next_index, last, &mut self.buf)?;
        self.out.write_all(&self.buf).map_err(SealError::Io)?;
        self.buf.clear();
        self.next_index += 1;
        self.failed = false;
        Ok(())
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(SealError::Poisoned.into());
        }
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() == self.chunk_size {
            // More data follows, so the full pending chunk is not the final one.
            self.emit(false)?;
        }
        let n = data.len().min(self.chunk_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.plaintext_len += n as u64;
        Ok(n)
    }

    /// Flushes `out`. A partial chunk stays buffered: chunks are sealed only when full or at
    /// [`SealWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(SealError::Poisoned.into());
        }
        self.out.flush()
    }
}
