//! The sealed-file header (layout in the crate docs) and the chunk cipher it keys: writing a
//! new header with a fresh data key, reading one back and unwrapping its data key, and
//! sealing and opening chunks under the STREAM nonce.

use std::io::{self, Read};

use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{
    AeadInOut, ChaCha20Poly1305, Key, KeyInit, Nonce, Tag, XChaCha20Poly1305, XNonce,
};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    FORMAT_VERSION, MAGIC, MAX_CHUNK_SIZE, MAX_KIND_LEN, MIN_CHUNK_SIZE, OwnerKey, SealError,
    TAG_LEN,
};

/// Length of the random per-file prefix of every chunk nonce.
const PREFIX_LEN: usize = 7;
/// Length of the key-wrap nonce.
const WRAP_NONCE_LEN: usize = 24;
/// Length of the data key.
const DATA_KEY_LEN: usize = 32;
/// Header bytes before the kind: magic, version, kind length.
const FIXED_BEFORE_KIND: usize = MAGIC.len() + 2 + 1;
/// Header bytes after the kind: chunk size, nonce prefix, wrap nonce, wrapped key and its tag.
const FIXED_AFTER_KIND: usize = 4 + PREFIX_LEN + WRAP_NONCE_LEN + DATA_KEY_LEN + TAG_LEN;

/// Checks a kind string: 1..=64 bytes of `a-z 0-9 . _ -`.
fn kind_is_valid(kind: &[u8]) -> bool {
    (1..=MAX_KIND_LEN).contains(&kind.len())
        && kind
            .iter()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

fn check_kind(kind: &str) -> Result<(), SealError> {
    if kind_is_valid(kind.as_bytes()) {
        Ok(())
    } else {
        Err(SealError::InvalidKind {
            kind: kind.to_string(),
        })
    }
}

/// Checks a chunk size a caller asked for.
fn check_chunk_size(size: u32) -> Result<(), SealError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(SealError::InvalidChunkSize { size })
    }
}

/// A parsed, authenticated header together with the cipher for its chunks.
pub(crate) struct ChunkCipher {
    /// The whole header as stored: the associated data of every chunk.
    header: Vec<u8>,
    kind_len: usize,
    chunk_size: u32,
    prefix: [u8; PREFIX_LEN],
    aead: ChaCha20Poly1305,
}

impl ChunkCipher {
    /// A new header for `kind` with a fresh random data key wrapped under `key`.
    pub(crate) fn create(key: &OwnerKey, kind: &str, chunk_size: u32) -> Result<Self, SealError> {
        check_kind(kind)?;
        check_chunk_size(chunk_size)?;
        let mut prefix = [0; PREFIX_LEN];
        let mut wrap_nonce = [0; WRAP_NONCE_LEN];
        let mut data_key = Zeroizing::new([0; DATA_KEY_LEN]);
        for buf in [&mut prefix[..], &mut wrap_nonce[..], &mut data_key[..]] {
            getrandom::fill(buf).map_err(SealError::Random)?;
        }

        let mut header = Vec::with_capacity(FIXED_BEFORE_KIND + kind.len() + FIXED_AFTER_KIND);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // check_kind bounded the length to MAX_KIND_LEN, which fits a byte.
        header.push(kind.len() as u8);
        header.extend_from_slice(kind.as_bytes());
        header.extend_from_slice(&chunk_size.to_le_bytes());
        header.extend_from_slice(&prefix);
        header.extend_from_slice(&wrap_nonce);

        let mut wrapped = Zeroizing::new(*data_key);
        let tag = wrap_cipher(key)
            .encrypt_inout_detached(
                &XNonce::from(wrap_nonce),
                &header,
                InOutBuf::from(&mut wrapped[..]),
            )
            // Only fails for messages of 256 GiB and more.
            .map_err(|_| SealError::TooLong)?;
        header.extend_from_slice(&wrapped[..]);
        header.extend_from_slice(&tag);

        Ok(Self {
            kind_len: kind.len(),
            chunk_size,
            prefix,
            aead: ChaCha20Poly1305::new(<&Key>::from(&*data_key)),
            header,
        })
    }

    /// Reads a header from `input` and unwraps its data key with `key`.
    ///
    /// Checks in this order, so that each failure gets the most useful error: magic, version,
    /// kind (against `expected_kind`), the other fields, and last the key wrap, which
    /// authenticates every header byte before the wrapped key.
    pub(crate) fn read(
        input: &mut impl Read,
        key: &OwnerKey,
        expected_kind: &str,
    ) -> Result<Self, SealError> {
        check_kind(expected_kind)?;
        let mut header = vec![0; FIXED_BEFORE_KIND];
        let got = read_up_to(input, &mut header[..MAGIC.len()], &mut 0)?;
        if header[..got] != MAGIC[..got] {
            return Err(SealError::NotSealed);
        }
        if got < MAGIC.len() {
            return Err(SealError::TruncatedHeader);
        }
        read_header_bytes(input, &mut header[MAGIC.len()..])?;
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION {
            return Err(SealError::UnsupportedVersion { found: version });
        }
        let kind_len = usize::from(header[10]);
        if !(1..=MAX_KIND_LEN).contains(&kind_len) {
            return Err(SealError::BadHeader {
                reason: format!("kind length {kind_len} is outside 1..={MAX_KIND_LEN}"),
            });
        }

        header.resize(FIXED_BEFORE_KIND + kind_len + FIXED_AFTER_KIND, 0);
        read_header_bytes(input, &mut header[FIXED_BEFORE_KIND..][..kind_len])?;
        let kind = &header[FIXED_BEFORE_KIND..][..kind_len];
        if !kind_is_valid(kind) {
            return Err(SealError::BadHeader {
                reason: "the kind holds characters other than a-z, 0-9, '.', '_' and '-'"
                    .to_string(),
            });
        }
        if kind != expected_kind.as_bytes() {
            return Err(SealError::WrongKind {
                expected: expected_kind.to_string(),
                // kind_is_valid allows ASCII only.
                found: String::from_utf8_lossy(kind).into_owned(),
            });
        }

        let after_kind = FIXED_BEFORE_KIND + kind_len;
        read_header_bytes(input, &mut header[after_kind..])?;
        let (chunk_size_bytes, rest) = header[after_kind..].split_at(4);
        let (prefix, rest) = rest.split_at(PREFIX_LEN);
        let (wrap_nonce, rest) = rest.split_at(WRAP_NONCE_LEN);
        let (wrapped_key, tag) = rest.split_at(DATA_KEY_LEN);
        let chunk_size = u32::from_le_bytes(array(chunk_size_bytes));
        if check_chunk_size(chunk_size).is_err() {
            return Err(SealError::BadHeader {
                reason: format!(
                    "chunk size {chunk_size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
                ),
            });
        }
        let prefix: [u8; PREFIX_LEN] = array(prefix);
        let wrap_nonce: [u8; WRAP_NONCE_LEN] = array(wrap_nonce);
        let tag = Tag::from(array::<TAG_LEN>(tag));
        let mut data_key = Zeroizing::new(array::<DATA_KEY_LEN>(wrapped_key));
        let wrap_aad_len = header.len() - DATA_KEY_LEN - TAG_LEN;
        wrap_cipher(key)
            .decrypt_inout_detached(
                &XNonce::from(wrap_nonce),
                &header[..wrap_aad_len],
                InOutBuf::from(&mut data_key[..]),
                &tag,
            )
            .map_err(|_| SealError::WrongKey)?;

        Ok(Self {
            kind_len,
            chunk_size,
            prefix,
            aead: ChaCha20Poly1305::new(<&Key>::from(&*data_key)),
            header,
        })
    }

    /// The header as stored.
    pub(crate) fn header(&self) -> &[u8] {
        &self.header
    }

    /// The kind the header declares.
    pub(crate) fn kind(&self) -> &str {
        // Checked to be ASCII when the header was made or read.
        std::str::from_utf8(&self.header[FIXED_BEFORE_KIND..][..self.kind_len]).unwrap_or("")
    }

    /// Plaintext bytes per chunk.
    pub(crate) fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Encrypts the plaintext in `buf` as chunk `index` and appends the tag.
    ///
    /// Fails with [`SealError::TooLong`] past the last chunk number, and for a chunk that
    /// would use the last number without being final (no final chunk could follow it).
    pub(crate) fn seal_chunk(
        &self,
        index: u64,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if index == u64::from(u32::MAX) && !last {
            return Err(SealError::TooLong);
        }
        let nonce = chunk_nonce(&self.prefix, index, last).ok_or(SealError::TooLong)?;
        let tag = self
            .aead
            .encrypt_inout_detached(&nonce, &self.header, InOutBuf::from(&mut buf[..]))
            .map_err(|_| SealError::TooLong)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Authenticates and decrypts chunk `index` (ciphertext and tag) in `buf`, leaving the
    /// plaintext. On failure `buf` holds no plaintext: it is left as it was, or emptied.
    ///
    /// A chunk read as final that fails but authenticates as a non-final chunk means the file
    /// was cut at the chunk boundary after it: that is reported as [`SealError::Truncated`].
    pub(crate) fn open_chunk(
        &self,
        index: u64,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let Some(plain_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(SealError::Truncated {
                complete_chunks: index,
            });
        };
        if self.try_open(index, last, buf) {
            buf.truncate(plain_len);
            return Ok(());
        }
        let full = plain_len == self.chunk_size as usize;
        if last && full && self.try_open(index, false, buf) {
            buf.zeroize();
            return Err(SealError::Truncated {
                complete_chunks: index + 1,
            });
        }
        Err(SealError::Tampered { chunk: index })
    }

    /// One authentication attempt; decrypts in place only on success.
    fn try_open(&self, index: u64, last: bool, buf: &mut [u8]) -> bool {
        let Some(nonce) = chunk_nonce(&self.prefix, index, last) else {
            return false;
        };
        let (ciphertext, tag) = buf.split_at_mut(buf.len() - TAG_LEN);
        let tag = Tag::from(array::<TAG_LEN>(tag));
        self.aead
            .decrypt_inout_detached(&nonce, &self.header, InOutBuf::from(ciphertext), &tag)
            .is_ok()
    }
}

/// The STREAM nonce of chunk `index`: prefix, the index as a big-endian u32, the last-chunk
/// flag. `None` past 2^32 chunks.
fn chunk_nonce(prefix: &[u8; PREFIX_LEN], index: u64, last: bool) -> Option<Nonce> {
    let counter = u32::try_from(index).ok()?;
    let mut nonce = [0; 12];
    nonce[..PREFIX_LEN].copy_from_slice(prefix);
    nonce[PREFIX_LEN..11].copy_from_slice(&counter.to_be_bytes());
    nonce[11] = u8::from(last);
    Some(Nonce::from(nonce))
}

fn wrap_cipher(key: &OwnerKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(<&Key>::from(key.bytes()))
}

/// Copies a slice of known length into an array.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(bytes);
    out
}

/// Reads header bytes; the file ending first is a truncated header.
fn read_header_bytes(input: &mut impl Read, buf: &mut [u8]) -> Result<(), SealError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SealError::TruncatedHeader,
        _ => SealError::Io(e),
    })
}

/// Reads until `buf` is full or the input ends; returns how much was read. Adds every byte
/// read to `consumed`, also when it fails partway.
pub(crate) fn read_up_to(
    input: &mut impl Read,
    buf: &mut [u8],
    consumed: &mut u64,
) -> Result<usize, SealError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                *consumed += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SealError::Io(e)),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_nonce_is_prefix_big_endian_counter_and_flag() {
        let prefix = [1, 2, 3, 4, 5, 6, 7];
        let nonce = chunk_nonce(&prefix, 0x0a0b_0c0d, true).unwrap();
        assert_eq!(
            nonce.as_slice(),
            &[1, 2, 3, 4, 5, 6, 7, 0x0a, 0x0b, 0x0c, 0x0d, 1]
        );
        let nonce = chunk_nonce(&prefix, 0, false).unwrap();
        assert_eq!(&nonce.as_slice()[7..], &[0, 0, 0, 0, 0]);
        assert!(chunk_nonce(&prefix, u64::from(u32::MAX), true).is_some());
        assert!(chunk_nonce(&prefix, u64::from(u32::MAX) + 1, true).is_none());
    }

    #[test]
    fn seal_chunk_last_number_only_for_the_final_chunk() {
        let key = OwnerKey::from_bytes([7; 32]);
        let cipher = ChunkCipher::create(&key, "test", 16).unwrap();
        let last_index = u64::from(u32::MAX);
        assert!(matches!(
            cipher.seal_chunk(last_index, false, &mut vec![0; 16]),
            Err(SealError::TooLong)
        ));
        let mut buf = vec![5; 3];
        cipher.seal_chunk(last_index, true, &mut buf).unwrap();
        cipher.open_chunk(last_index, true, &mut buf).unwrap();
        assert_eq!(buf, [5; 3]);
        assert!(matches!(
            cipher.seal_chunk(last_index + 1, true, &mut vec![0; 16]),
            Err(SealError::TooLong)
        ));
    }

    #[test]
    fn open_chunk_full_non_final_chunk_read_as_final_is_truncation() {
        let key = OwnerKey::from_bytes([7; 32]);
        let cipher = ChunkCipher::create(&key, "test", 16).unwrap();
        let mut buf = vec![9; 16];
        cipher.seal_chunk(4, false, &mut buf).unwrap();
        let sealed = buf.clone();
        assert!(matches!(
            cipher.open_chunk(4, true, &mut buf),
            Err(SealError::Truncated { complete_chunks: 5 })
        ));
        let mut buf = sealed.clone();
        assert!(matches!(
            cipher.open_chunk(5, false, &mut buf),
            Err(SealError::Tampered { chunk: 5 })
        ));
        assert_eq!(buf, sealed, "a failed open leaves the ciphertext as it was");
    }

    #[test]
    fn kind_is_valid_accepts_only_the_documented_alphabet() {
        assert!(kind_is_valid(b"vm-snapshot"));
        assert!(kind_is_valid(b"a.b_c-9"));
        assert!(kind_is_valid(&[b'x'; MAX_KIND_LEN]));
        for bad in [
            &b""[..],
            b"VM",
            b"a b",
            b"a\n",
            b"\xc3\xa9",
            &[b'x'; MAX_KIND_LEN + 1],
        ] {
            assert!(!kind_is_valid(bad), "{bad:?}");
        }
    }
}
