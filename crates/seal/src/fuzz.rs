//! Fuzz harness body for `fuzz/fuzz_targets/seal_open.rs`, replayed by `tests/fuzz_corpus.rs`.
//!
//! The bytes are a sealed file opened with [`FUZZ_KEY`] as a [`VM_SNAPSHOT`]. The seed corpus
//! holds files sealed with that key, so mutations reach past the key wrap into the chunks.

use std::io::{Cursor, Read, Write};

use crate::{OwnerKey, SealError, SealReader, SealWriter, VM_SNAPSHOT, verify};

/// The owner key the fuzz target opens files with: bytes 0, 1, .., 31. Public knowledge; it
/// only exists so that seeds can be valid sealed files.
pub const FUZZ_KEY: [u8; 32] = {
    let mut key = [0; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = i as u8;
        i += 1;
    }
    key
};

/// Opens `data` as a sealed file three ways — sequential `Read`, [`verify`], and
/// [`SealReader::read_chunk`] over every chunk — and panics unless they agree. When the file
/// opens, seals the plaintext again (same kind and chunk size, fresh keys) and panics unless
/// that reopens to the same plaintext.
pub fn fuzz_open(data: &[u8]) {
    let key = OwnerKey::from_bytes(FUZZ_KEY);

    let sequential = read_sequential(data, &key);
    let verified = verify(data, &key, VM_SNAPSHOT);
    match (&sequential, &verified) {
        (Ok((plain, _)), Ok(len)) => assert_eq!(plain.len() as u64, *len, "verify's length"),
        (Err(read_error), Err(verify_error)) => assert_eq!(
            read_error.to_string(),
            verify_error.to_string(),
            "read and verify fail the same way"
        ),
        (read, verify) => panic!("read gave {read:?} but verify gave {verify:?}"),
    }

    let random = read_by_index(data, &key);
    match (&sequential, &random) {
        (Ok((plain, _)), Ok(by_index)) => assert!(plain == by_index, "by-index plaintext"),
        (Err(_), Err(_)) => {}
        (read, random) => panic!("read gave {read:?} but read_chunk gave {random:?}"),
    }

    if let Ok((plain, chunk_size)) = sequential {
        let mut writer =
            SealWriter::with_chunk_size(Vec::new(), &key, VM_SNAPSHOT, chunk_size).expect("new");
        writer.write_all(&plain).expect("sealing into memory");
        let resealed = writer.finish().expect("finish");
        let (again, _) = read_sequential(&resealed, &key).expect("a resealed file opens");
        assert!(again == plain, "resealing keeps the plaintext");
    }
}

/// The plaintext and chunk size through `io::Read`.
fn read_sequential(data: &[u8], key: &OwnerKey) -> Result<(Vec<u8>, u32), SealError> {
    let mut reader = SealReader::open(data, key, VM_SNAPSHOT)?;
    let mut plain = Vec::new();
    reader.read_to_end(&mut plain)?;
    Ok((plain, reader.chunk_size()))
}

/// The plaintext through `read_chunk`, last chunk first, checking the final flag.
fn read_by_index(data: &[u8], key: &OwnerKey) -> Result<Vec<u8>, SealError> {
    let mut reader = SealReader::open(Cursor::new(data), key, VM_SNAPSHOT)?;
    let chunks = reader.chunk_count()?;
    let mut parts = vec![Vec::new(); usize::try_from(chunks).expect("fits: input is in memory")];
    for (index, part) in parts.iter_mut().enumerate().rev() {
        let last = reader.read_chunk(index as u64, part)?;
        assert_eq!(
            last,
            index as u64 + 1 == chunks,
            "final flag of chunk {index}"
        );
    }
    Ok(parts.concat())
}
