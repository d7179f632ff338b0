//! [`SealReader`]: opens a sealed file, sequentially (`io::Read`) or one chunk at a time by
//! index on seekable input; [`verify`]: authenticates a whole file without keeping plaintext.

use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;

use zeroize::Zeroizing;

use crate::header::{ChunkCipher, read_up_to};
use crate::{OwnerKey, SealError, TAG_LEN};

/// Where the sequential reader stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// More chunks to read.
    Reading,
    /// The final chunk has been read.
    Done,
    /// A read failed; sequential reading stops here.
    Failed,
}

/// Where the chunks lie in seekable input, found from its length.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Input offset of the first chunk.
    first_chunk: u64,
    /// Number of chunks.
    chunks: u64,
    /// Sealed length of the final chunk.
    last_len: u64,
}

/// Opens a sealed file. As `io::Read` it yields the plaintext, each chunk only after it has
/// authenticated; every failure is an `io::Error` carrying a [`SealError`] (take it out with
/// `SealError::from`). After a failed read, further reads fail with [`SealError::Poisoned`].
///
/// On `Read + Seek` input, [`SealReader::read_chunk`] reads any chunk by index.
pub struct SealReader<R: Read> {
    input: R,
    cipher: ChunkCipher,
    /// The current chunk: sealed after reading, plaintext after opening.
    buf: Zeroizing<Vec<u8>>,
    /// The part of `buf` not yet handed out.
    pending: Range<usize>,
    /// One byte read past the current chunk to learn whether it was the final one.
    lookahead: Option<u8>,
    next_index: u64,
    state: State,
    /// Bytes taken from `input` since `open`, header included.
    consumed: u64,
    layout: Option<Layout>,
}

impl<R: Read> SealReader<R> {
    /// Reads the header, checks it is a sealed file of `kind` in a format this build reads,
    /// and unwraps the data key with `key` (which authenticates the header).
    pub fn open(mut input: R, key: &OwnerKey, kind: &str) -> Result<Self, SealError> {
        let cipher = ChunkCipher::read(&mut input, key, kind)?;
        let capacity = cipher.chunk_size() as usize + TAG_LEN + 1;
        Ok(Self {
            input,
            consumed: cipher.header().len() as u64,
            cipher,
            buf: Zeroizing::new(Vec::with_capacity(capacity)),
            pending: 0..0,
            lookahead: None,
            next_index: 0,
            state: State::Reading,
            layout: None,
        })
    }

    /// The kind the file declares (the one passed to `open`).
    pub fn kind(&self) -> &str {
        self.cipher.kind()
    }

    /// Plaintext bytes per chunk (the final chunk may hold fewer).
    pub fn chunk_size(&self) -> u32 {
        self.cipher.chunk_size()
    }

    /// Reads and opens the next chunk into `buf`; `Ok(false)` once the final chunk has been
    /// read.
    fn next_chunk(&mut self) -> Result<bool, SealError> {
        match self.state {
            State::Done => return Ok(false),
            State::Failed => return Err(SealError::Poisoned),
            State::Reading => {}
        }
        self.pending = 0..0;
        let result = self.read_next_chunk();
        self.state = match &result {
            Err(_) => State::Failed,
            Ok(true) => State::Done,
            Ok(false) => State::Reading,
        };
        result.map(|_| true)
    }

    /// Reads one chunk sequentially; returns whether it was the final one. A chunk is final
    /// when the input ends within one sealed chunk length plus one byte.
    fn read_next_chunk(&mut self) -> Result<bool, SealError> {
        let sealed_len = self.cipher.chunk_size() as usize + TAG_LEN;
        self.buf.clear();
        self.buf.resize(sealed_len + 1, 0);
        let mut filled = 0;
        if let Some(byte) = self.lookahead.take() {
            self.buf[0] = byte;
            filled = 1;
        }
        filled += read_up_to(&mut self.input, &mut self.buf[filled..], &mut self.consumed)?;
        let last = filled <= sealed_len;
        if !last {
            self.lookahead = Some(self.buf[sealed_len]);
            filled = sealed_len;
        }
        self.buf.truncate(filled);
        let index = self.next_index;
        self.cipher.open_chunk(index, last, &mut self.buf)?;
        self.pending = 0..self.buf.len();
        self.next_index += 1;
        Ok(last)
    }
}

impl<R: Read + Seek> SealReader<R> {
    /// Number of chunks in the file, from the input's length (it is at least 1). Whether the
    /// file really ends there is known only once its final chunk has authenticated.
    pub fn chunk_count(&mut self) -> Result<u64, SealError> {
        Ok(self.layout()?.chunks)
    }

    /// Authenticates and decrypts chunk `index` into `buf` (replacing its content); returns
    /// whether it is the final chunk. Chunk `index` holds plaintext bytes
    /// `index * chunk_size ..`. On failure `buf` is left empty.
    ///
    /// Afterwards sequential reads go on with the chunk after this one (or after a failure,
    /// refuse to go on); further `read_chunk` calls work whatever happened before.
    pub fn read_chunk(&mut self, index: u64, buf: &mut Vec<u8>) -> Result<bool, SealError> {
        buf.clear();
        let layout = self.layout()?;
        if index >= layout.chunks {
            return Err(SealError::ChunkOutOfRange {
                index,
                chunks: layout.chunks,
            });
        }
        let sealed_len = u64::from(self.cipher.chunk_size()) + TAG_LEN as u64;
        let last = index + 1 == layout.chunks;
        let len = if last { layout.last_len } else { sealed_len };
        // index < chunks, so the chunk lies within the input's length: no overflow.
        let offset = layout.first_chunk + index * sealed_len;

        self.state = State::Failed;
        self.pending = 0..0;
        self.lookahead = None;
        self.input
            .seek(SeekFrom::Start(offset))
            .map_err(SealError::Io)?;
        buf.resize(len as usize, 0);
        if let Err(e) = self.input.read_exact(buf) {
            buf.clear();
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof => SealError::Truncated {
                    complete_chunks: index,
                },
                _ => SealError::Io(e),
            });
        }
        if let Err(e) = self.cipher.open_chunk(index, last, buf) {
            buf.clear();
            return Err(e);
        }
        self.next_index = index + 1;
        self.consumed = offset + len - (layout.first_chunk - self.cipher.header().len() as u64);
        self.state = if last { State::Done } else { State::Reading };
        Ok(last)
    }

    /// Finds (once) where the chunks lie: the input's length fixes the number of chunks and
    /// the length of the final one. Leaves the input where it was.
    fn layout(&mut self) -> Result<Layout, SealError> {
        if let Some(layout) = self.layout {
            return Ok(layout);
        }
        let here = self.input.stream_position().map_err(SealError::Io)?;
        let end = self.input.seek(SeekFrom::End(0)).map_err(SealError::Io)?;
        self.input
            .seek(SeekFrom::Start(here))
            .map_err(SealError::Io)?;
        // The header started `consumed` bytes before the current position.
        let first_chunk = here.saturating_sub(self.consumed) + self.cipher.header().len() as u64;
        let body = end.saturating_sub(first_chunk);
        if body == 0 {
            return Err(SealError::Truncated { complete_chunks: 0 });
        }
        let sealed_len = u64::from(self.cipher.chunk_size()) + TAG_LEN as u64;
        let chunks = body.div_ceil(sealed_len);
        let last_len = body - (chunks - 1) * sealed_len;
        if last_len < TAG_LEN as u64 {
            return Err(SealError::Truncated {
                complete_chunks: chunks - 1,
            });
        }
        let layout = Layout {
            first_chunk,
            chunks,
            last_len,
        };
        self.layout = Some(layout);
        Ok(layout)
    }
}

impl<R: Read> Read for SealReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pending.is_empty() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.pending.len());
        let start = self.pending.start;
        out[..n].copy_from_slice(&self.buf[start..start + n]);
        self.pending.start += n;
        Ok(n)
    }
}

/// Authenticates a whole sealed file of `kind` under `key` without keeping its plaintext;
/// returns the number of plaintext bytes.
pub fn verify<R: Read>(input: R, key: &OwnerKey, kind: &str) -> Result<u64, SealError> {
    let mut reader = SealReader::open(input, key, kind)?;
    let mut total = 0;
    while reader.next_chunk()? {
        total += reader.pending.len() as u64;
    }
    Ok(total)
}
