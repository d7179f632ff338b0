//! [`SealError`]: everything that can go wrong sealing or opening a file, each message naming
//! the problem and what to do about it.

use std::io;
use std::path::PathBuf;

use crate::{FORMAT_VERSION, MAX_CHUNK_SIZE, MAX_KIND_LEN, MIN_CHUNK_SIZE};

/// Why a file could not be sealed or opened, or a key not loaded.
///
/// Inside [`SealReader`](crate::SealReader)'s and [`SealWriter`](crate::SealWriter)'s
/// `io::Read`/`io::Write` impls a `SealError` travels as the payload of an [`io::Error`];
/// `SealError::from(io_error)` takes it back out.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The file does not start with the magic bytes.
    #[error("not a bulwark sealed file (bad magic): check that the path names a sealed file")]
    NotSealed,
    /// The header names a format version this build does not read.
    #[error(
        "unsupported sealed-file format version {found}: this bulwark reads version \
         {FORMAT_VERSION}; open the file with the bulwark release that wrote it"
    )]
    UnsupportedVersion {
        /// The version in the file.
        found: u16,
    },
    /// The file is sealed, but for another purpose.
    #[error(
        "wrong kind of sealed file: expected \"{expected}\", this file is \"{found}\"; \
         pass a file of the expected kind"
    )]
    WrongKind {
        /// The kind the caller asked for.
        expected: String,
        /// The kind the file declares.
        found: String,
    },
    /// The key wrap did not authenticate.
    #[error(
        "the owner key does not unwrap this file's data key: either it is the wrong key (use \
         the owner key the file was written with) or the file's header was modified"
    )]
    WrongKey,
    /// A chunk did not authenticate.
    #[error(
        "chunk {chunk} failed authentication: the file was modified or corrupted (or cut off \
         inside that chunk); no plaintext from that chunk or after it was returned: use an \
         intact copy"
    )]
    Tampered {
        /// Index of the chunk, from 0.
        chunk: u64,
    },
    /// The file ends inside its header.
    #[error("sealed file ends inside its header: it was cut short; use a complete copy")]
    TruncatedHeader,
    /// The file ends before its final chunk.
    #[error(
        "sealed file ends before its final chunk (after {complete_chunks} complete chunks): it \
         was cut short, or its writer never finished; use a complete copy"
    )]
    Truncated {
        /// Chunks that authenticated (or would have) before the cut.
        complete_chunks: u64,
    },
    /// A header field holds a value no writer produces.
    #[error("malformed sealed-file header: {reason}; the file was modified or corrupted")]
    BadHeader {
        /// What is wrong with which field.
        reason: String,
    },
    /// A kind string passed in by the caller is not valid.
    #[error(
        "invalid kind {kind:?}: a kind is 1 to {MAX_KIND_LEN} characters of a-z, 0-9, '.', '_' \
         and '-'"
    )]
    InvalidKind {
        /// The rejected kind.
        kind: String,
    },
    /// A chunk size passed in by the caller is out of range.
    #[error("invalid chunk size {size}: use {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")]
    InvalidChunkSize {
        /// The rejected size.
        size: u32,
    },
    /// [`SealReader::read_chunk`](crate::SealReader::read_chunk) was asked for a chunk past
    /// the end.
    #[error("chunk {index} is out of range: this file has {chunks} chunks")]
    ChunkOutOfRange {
        /// The requested index.
        index: u64,
        /// How many chunks the file has.
        chunks: u64,
    },
    /// The writer ran out of chunk numbers.
    #[error(
        "sealed stream too long: a sealed file holds at most 2^32 chunks; seal less data per \
         file or use a larger chunk size"
    )]
    TooLong,
    /// An earlier operation on this reader or writer failed, so it refuses to go on.
    #[error(
        "an earlier operation on this sealed stream failed (see that error); start over with a \
         new reader or writer"
    )]
    Poisoned,
    /// Owner key text is not 64 hex digits.
    #[error(
        "bad owner key text: {reason}; an owner key is 64 hex characters (32 bytes), \
         optionally followed by one newline"
    )]
    BadKeyText {
        /// What is wrong (never the key text itself).
        reason: String,
    },
    /// An owner key file could not be read.
    #[error("cannot read owner key file {path}")]
    KeyFileRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An owner key file holds something other than a key.
    #[error(
        "owner key file {path} does not hold a key: {reason}; it must hold 64 hex characters \
         (32 bytes), optionally followed by one newline"
    )]
    KeyFileText {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        reason: String,
    },
    /// An owner key file could not be written.
    #[error("cannot write owner key file {path} (it must not exist yet)")]
    KeyFileWrite {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed; nothing was sealed")]
    Random(#[source] getrandom::Error),
    /// Reading or writing the underlying stream failed.
    #[error("I/O error on the sealed file's underlying stream")]
    Io(#[source] io::Error),
}

impl SealError {
    /// The `io::ErrorKind` this error travels as inside `io::Read` / `io::Write`.
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            Self::Io(e) => e.kind(),
            Self::TruncatedHeader | Self::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            Self::InvalidKind { .. } | Self::InvalidChunkSize { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::InvalidData,
        }
    }
}

impl From<SealError> for io::Error {
    fn from(e: SealError) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

impl From<io::Error> for SealError {
    /// Takes a `SealError` back out of an `io::Error` made by this crate; wraps any other
    /// `io::Error` as [`SealError::Io`].
    fn from(e: io::Error) -> Self {
        e.downcast::<SealError>().unwrap_or_else(SealError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_round_trip_seal_error_comes_back() {
        let io_error = io::Error::from(SealError::Tampered { chunk: 3 });
        assert_eq!(io_error.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(
            SealError::from(io_error),
            SealError::Tampered { chunk: 3 }
        ));
        let io_error = io::Error::from(SealError::Truncated { complete_chunks: 1 });
        assert_eq!(io_error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn io_round_trip_plain_io_error_is_wrapped_with_its_os_code() {
        const ENOSPC: i32 = 28;
        match SealError::from(io::Error::from_raw_os_error(ENOSPC)) {
            SealError::Io(e) => assert_eq!(e.raw_os_error(), Some(ENOSPC)),
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn messages_name_the_fix() {
        assert!(
            SealError::WrongKey
                .to_string()
                .contains("use the owner key")
        );
        assert!(SealError::WrongKey.to_string().contains("modified"));
        let version = SealError::UnsupportedVersion { found: 2 }.to_string();
        assert!(version.contains("version 2") && version.contains("reads version 1"));
        assert!(
            SealError::Tampered { chunk: 7 }
                .to_string()
                .contains("chunk 7")
        );
    }
}
