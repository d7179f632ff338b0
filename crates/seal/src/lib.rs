//! Sealed files: the container for everything that leaves the VM monitor (VM snapshots now,
//! migration streams later). The management plane that stores a sealed file can neither read
//! it nor change it unnoticed; only the holder of the VM owner's 32-byte key can do either.
//!
//! # Keys
//!
//! Each file gets a fresh random 32-byte *data key* that encrypts its content. The data key is
//! stored in the header, wrapped (encrypted and authenticated) with XChaCha20-Poly1305 under
//! the [`OwnerKey`] and a random 24-byte nonce. Nothing else is derived from the owner key, so
//! a file never reuses a (key, nonce) pair with any other file, whatever its nonces.
//!
//! # Layout (format version 1)
//!
//! Integers in the header are little-endian. `k` is the length of the kind string.
//!
//! | offset   | size | field |
//! | -------- | ---- | ----- |
//! | 0        | 8    | magic `BULWSEAL` |
//! | 8        | 2    | format version, `1` |
//! | 10       | 1    | `k`, the length of the kind, 1..=64 |
//! | 11       | k    | kind, e.g. `vm-snapshot` (ASCII `a-z 0-9 . _ -`) |
//! | 11+k     | 4    | chunk size: plaintext bytes per chunk, 16..=1 MiB (64 KiB by default) |
//! | 15+k     | 7    | stream nonce prefix (random) |
//! | 22+k     | 24   | key-wrap nonce (random) |
//! | 46+k     | 48   | wrapped data key: 32 bytes of ciphertext, 16-byte tag |
//! | 94+k     |      | chunks |
//!
//! The key wrap's associated data is the header up to the wrapped key (bytes `0..46+k`); every
//! chunk's associated data is the whole header (bytes `0..94+k`). So the header is
//! authenticated before any content is decrypted, and each chunk is bound to its header.
//!
//! Chunk `i` is the ChaCha20-Poly1305 encryption of plaintext bytes
//! `i * chunk_size .. (i + 1) * chunk_size` under the data key, followed by its 16-byte tag,
//! with the nonce `prefix (7 bytes) || i (u32, big-endian) || last (1 byte: 1 on the final
//! chunk, else 0)` — the STREAM construction. Every chunk but the final one holds exactly
//! `chunk_size` plaintext bytes, so chunk `i` starts at file offset
//! `94 + k + i * (chunk_size + 16)` ([`SealReader::read_chunk`]). The final chunk holds
//! 0..=`chunk_size` bytes; an empty payload is one empty final chunk. A file holds at most
//! 2^32 chunks (256 TiB at the default chunk size).
//!
//! # What is detected
//!
//! Any change to any byte, a truncation anywhere (also at a chunk boundary: the new last
//! chunk was not sealed as final), appended bytes, and chunks reordered, dropped, duplicated or
//! taken from another file (their nonce or their data key differs). A file of one kind cannot
//! be opened as another ([`SealError::WrongKind`]). See `docs/snapshot-format.md` for the
//! design note: attacker, non-goals and test plan.
//!
//! # Reading
//!
//! [`SealReader`] returns a chunk's plaintext only after that chunk has authenticated. A
//! sequential reader hands out earlier chunks before it sees a later bad one: a consumer that
//! must not act on a partial result either [`verify`]s the file first or discards what it read
//! when a read fails.
#![forbid(unsafe_code)]

mod error;
pub mod fuzz;
mod header;
mod key;
mod reader;
mod writer;

pub use error::SealError;
pub use key::{OWNER_KEY_LEN, OwnerKey};
pub use reader::{SealReader, verify};
pub use writer::SealWriter;

/// The first 8 bytes of every sealed file.
pub const MAGIC: [u8; 8] = *b"BULWSEAL";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Plaintext bytes per chunk that [`SealWriter::new`] uses.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Smallest chunk size a header may declare.
pub const MIN_CHUNK_SIZE: u32 = 16;
/// Largest chunk size a header may declare (bounds what a reader allocates).
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Longest kind string, in bytes.
pub const MAX_KIND_LEN: usize = 64;
/// Poly1305 tag length: every chunk is this much longer sealed than in plaintext.
pub const TAG_LEN: usize = 16;
/// The kind of a VM snapshot.
pub const VM_SNAPSHOT: &str = "vm-snapshot";
