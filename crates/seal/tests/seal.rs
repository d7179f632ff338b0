//! Sealed files end to end: real files in a temporary directory, written with `SealWriter`
//! and read back with `SealReader` (sequentially and by chunk index) and `verify`; every
//! single-byte change, every truncation, reordered chunks, the wrong key, kind or version are
//! refused with the error that names them.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bulwark_seal::{
    DEFAULT_CHUNK_SIZE, MAGIC, OwnerKey, SealError, SealReader, SealWriter, TAG_LEN, VM_SNAPSHOT,
    verify,
};

/// A directory under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("bulwark-seal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn key() -> OwnerKey {
    OwnerKey::from_bytes([0x5a; 32])
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    getrandom::fill(&mut data).unwrap();
    data
}

/// Header length for a kind of `kind_len` bytes (documented layout: 94 + k).
fn header_len(kind_len: usize) -> usize {
    94 + kind_len
}

/// Seals `plain` into a file with `chunk_size`, in writes of `piece` bytes.
fn seal_file(path: &Path, plain: &[u8], chunk_size: u32, piece: usize) {
    let out = BufWriter::new(File::create(path).unwrap());
    let mut writer = SealWriter::with_chunk_size(out, &key(), VM_SNAPSHOT, chunk_size).unwrap();
    for part in plain.chunks(piece.max(1)) {
        writer.write_all(part).unwrap();
    }
    assert_eq!(writer.bytes_written(), plain.len() as u64);
    let out = writer.finish().unwrap();
    out.into_inner().unwrap().sync_all().unwrap();
}

/// Seals `plain` into memory with `chunk_size`.
fn seal_bytes(plain: &[u8], chunk_size: u32) -> Vec<u8> {
    let mut writer =
        SealWriter::with_chunk_size(Vec::new(), &key(), VM_SNAPSHOT, chunk_size).expect("writer");
    writer.write_all(plain).unwrap();
    writer.finish().unwrap()
}

/// Opens and reads a whole sealed file from memory.
fn open_bytes(data: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut reader = SealReader::open(data, &key(), VM_SNAPSHOT)?;
    let mut plain = Vec::new();
    reader.read_to_end(&mut plain)?;
    Ok(plain)
}

/// Reads every chunk by index from memory.
fn open_bytes_by_index(data: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut reader = SealReader::open(Cursor::new(data), &key(), VM_SNAPSHOT)?;
    let mut plain = Vec::new();
    let mut chunk = Vec::new();
    for index in 0..reader.chunk_count()? {
        reader.read_chunk(index, &mut chunk)?;
        plain.extend_from_slice(&chunk);
    }
    Ok(plain)
}

/// Sealed length of `plain_len` bytes: header, full chunks, the final chunk.
fn sealed_len(plain_len: usize, chunk_size: usize) -> usize {
    let chunks = plain_len.div_ceil(chunk_size).max(1);
    header_len(VM_SNAPSHOT.len()) + plain_len + chunks * TAG_LEN
}

#[test]
fn round_trip_sizes_sequential_and_by_index_give_the_plaintext() {
    let dir = TempDir::new("round-trip");
    let chunk = DEFAULT_CHUNK_SIZE as usize;
    for len in [
        0,
        1,
        chunk - 1,
        chunk,
        chunk + 1,
        2 * chunk,
        1024 * 1024 + 123,
    ] {
        let plain = random_bytes(len);
        let path = dir.join(&format!("sealed-{len}"));
        seal_file(&path, &plain, DEFAULT_CHUNK_SIZE, 10_000);
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            sealed_len(len, chunk),
            "file length for {len} bytes"
        );

        let mut reader = SealReader::open(
            BufReader::new(File::open(&path).unwrap()),
            &key(),
            VM_SNAPSHOT,
        )
        .unwrap();
        assert_eq!(reader.kind(), VM_SNAPSHOT);
        assert_eq!(reader.chunk_size(), DEFAULT_CHUNK_SIZE);
        let mut read_back = Vec::new();
        reader.read_to_end(&mut read_back).unwrap();
        assert!(read_back == plain, "sequential read of {len} bytes");

        let mut reader = SealReader::open(File::open(&path).unwrap(), &key(), VM_SNAPSHOT).unwrap();
        let chunks = reader.chunk_count().unwrap();
        assert_eq!(chunks, len.div_ceil(chunk).max(1) as u64);
        // Every chunk, in an order that jumps around: odd indices down, then even ones up.
        let order = (0..chunks)
            .rev()
            .filter(|i| i % 2 == 1)
            .chain((0..chunks).filter(|i| i % 2 == 0));
        let mut buf = Vec::new();
        for index in order {
            let last = reader.read_chunk(index, &mut buf).unwrap();
            assert_eq!(last, index + 1 == chunks);
            let start = index as usize * chunk;
            let end = (start + chunk).min(len);
            assert!(buf == plain[start..end], "chunk {index} of {len} bytes");
        }

        assert_eq!(
            verify(File::open(&path).unwrap(), &key(), VM_SNAPSHOT).unwrap(),
            len as u64
        );
    }
}

#[test]
fn round_trip_any_write_pattern_gives_the_same_plaintext() {
    let plain = random_bytes(1000);
    for piece in [1, 7, 16, 17, 100, 1000] {
        let sealed = seal_bytes(&plain, 16);
        assert_eq!(sealed.len(), sealed_len(1000, 16));
        let mut writer = SealWriter::with_chunk_size(Vec::new(), &key(), VM_SNAPSHOT, 16).unwrap();
        for part in plain.chunks(piece) {
            writer.write_all(part).unwrap();
        }
        let sealed = writer.finish().unwrap();
        assert_eq!(sealed.len(), sealed_len(1000, 16), "pieces of {piece}");
        assert_eq!(open_bytes(&sealed).unwrap(), plain, "pieces of {piece}");
        assert_eq!(open_bytes_by_index(&sealed).unwrap(), plain);
    }
}

#[test]
fn seal_same_plaintext_twice_gives_unrelated_files() {
    let plain = vec![0; 100];
    let a = seal_bytes(&plain, 16);
    let b = seal_bytes(&plain, 16);
    let header = header_len(VM_SNAPSHOT.len());
    // Fresh nonce prefix, wrap nonce and data key each time: only magic, version, kind and
    // chunk size repeat.
    assert_eq!(a[..header - 79], b[..header - 79]);
    assert_ne!(a[header - 79..header], b[header - 79..header]);
    assert_ne!(a[header..], b[header..]);
}

#[test]
fn header_layout_matches_the_documented_offsets() {
    let sealed = seal_bytes(b"x", 4096);
    let k = VM_SNAPSHOT.len();
    assert_eq!(sealed[..8], MAGIC);
    assert_eq!(&sealed[..8], b"BULWSEAL");
    assert_eq!(sealed[8..10], 1u16.to_le_bytes());
    assert_eq!(usize::from(sealed[10]), k);
    assert_eq!(&sealed[11..11 + k], VM_SNAPSHOT.as_bytes());
    assert_eq!(sealed[11 + k..15 + k], 4096u32.to_le_bytes());
    assert_eq!(sealed.len(), header_len(k) + 1 + TAG_LEN);
}

/// The sealed test file for the tamper tests: 40 bytes in 16-byte chunks (16, 16, 8).
fn three_chunk_file() -> (Vec<u8>, Vec<u8>) {
    let plain: Vec<u8> = (0..40).collect();
    let sealed = seal_bytes(&plain, 16);
    assert_eq!(
        sealed.len(),
        header_len(VM_SNAPSHOT.len()) + 3 * TAG_LEN + 40
    );
    (plain, sealed)
}

/// Reads `data` sequentially and returns the error and how many plaintext bytes came out
/// before it.
fn read_until_error(data: &[u8]) -> Option<(SealError, usize)> {
    let mut reader = match SealReader::open(data, &key(), VM_SNAPSHOT) {
        Ok(reader) => reader,
        Err(e) => return Some((e, 0)),
    };
    let mut returned = 0;
    let mut buf = [0; 5];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => returned += n,
            Err(e) => return Some((SealError::from(e), returned)),
        }
    }
}

#[test]
fn flip_any_byte_anywhere_is_refused_with_the_matching_error() {
    let (_, sealed) = three_chunk_file();
    let k = VM_SNAPSHOT.len();
    let header = header_len(k);
    let chunk_len = 16 + TAG_LEN;
    for position in 0..sealed.len() {
        for mask in [0x01, 0x80, 0xff] {
            let mut bad = sealed.clone();
            bad[position] ^= mask;
            let what = format!("byte {position} ^ {mask:#04x}");
            let (error, returned) = read_until_error(&bad).unwrap_or_else(|| panic!("{what}"));
            match position {
                0..8 => assert!(matches!(error, SealError::NotSealed), "{what}: {error:?}"),
                8..10 => assert!(
                    matches!(error, SealError::UnsupportedVersion { .. }),
                    "{what}: {error:?}"
                ),
                10 => assert!(
                    matches!(
                        error,
                        SealError::BadHeader { .. }
                            | SealError::WrongKind { .. }
                            | SealError::TruncatedHeader
                    ),
                    "{what}: {error:?}"
                ),
                p if p < 11 + k => assert!(
                    matches!(
                        error,
                        SealError::WrongKind { .. } | SealError::BadHeader { .. }
                    ),
                    "{what}: {error:?}"
                ),
                p if p < header => assert!(
                    matches!(error, SealError::WrongKey | SealError::BadHeader { .. }),
                    "{what}: {error:?}"
                ),
                p => {
                    let chunk = ((p - header) / chunk_len) as u64;
                    assert!(
                        matches!(error, SealError::Tampered { chunk: c } if c == chunk),
                        "{what}: {error:?}"
                    );
                    // Only the chunks before the bad one came out.
                    assert_eq!(returned, chunk as usize * 16, "{what}");
                }
            }
            assert_eq!(
                verify(&bad[..], &key(), VM_SNAPSHOT)
                    .unwrap_err()
                    .to_string(),
                error.to_string(),
                "{what}: verify agrees"
            );
            assert!(open_bytes_by_index(&bad).is_err(), "{what}: by index");
        }
    }
}

#[test]
fn truncation_at_every_length_is_refused() {
    let (_, sealed) = three_chunk_file();
    let header = header_len(VM_SNAPSHOT.len());
    let chunk_len = 16 + TAG_LEN;
    for len in 0..sealed.len() {
        let cut = &sealed[..len];
        let (error, _) = read_until_error(cut).unwrap_or_else(|| panic!("cut at {len}"));
        if len < header {
            assert!(
                matches!(error, SealError::TruncatedHeader),
                "cut at {len}: {error:?}"
            );
        } else if (len - header).is_multiple_of(chunk_len) {
            let complete = ((len - header) / chunk_len) as u64;
            assert!(
                matches!(error, SealError::Truncated { complete_chunks } if complete_chunks == complete),
                "cut at {len}: {error:?}"
            );
        } else {
            assert!(
                matches!(
                    error,
                    SealError::Tampered { .. } | SealError::Truncated { .. }
                ),
                "cut at {len}: {error:?}"
            );
        }
        assert!(verify(cut, &key(), VM_SNAPSHOT).is_err(), "cut at {len}");
        assert!(open_bytes_by_index(cut).is_err(), "cut at {len}: by index");
    }
}

#[test]
fn truncation_of_a_file_with_a_full_final_chunk_is_refused() {
    // 32 bytes: two full chunks, the second final.
    let sealed = seal_bytes(&[3; 32], 16);
    let one_chunk = header_len(VM_SNAPSHOT.len()) + 16 + TAG_LEN;
    assert!(matches!(
        open_bytes(&sealed[..one_chunk]),
        Err(SealError::Truncated { complete_chunks: 1 })
    ));
    assert!(matches!(
        open_bytes_by_index(&sealed[..one_chunk]),
        Err(SealError::Truncated { complete_chunks: 1 })
    ));
}

#[test]
fn appended_bytes_are_refused() {
    let (_, sealed) = three_chunk_file();
    let last_chunk = sealed[sealed.len() - 8 - TAG_LEN..].to_vec();
    for extra in [
        vec![0],
        vec![0; 15],
        vec![0; 16],
        vec![0; 17],
        vec![0; 100],
        last_chunk,
    ] {
        let mut bad = sealed.clone();
        bad.extend_from_slice(&extra);
        assert!(open_bytes(&bad).is_err(), "{} bytes appended", extra.len());
        assert!(verify(&bad[..], &key(), VM_SNAPSHOT).is_err());
        assert!(open_bytes_by_index(&bad).is_err());
    }
    // The same with a full final chunk, so that appending makes it look non-final.
    let sealed = seal_bytes(&[1; 32], 16);
    for extra in [1, 16, 32] {
        let mut bad = sealed.clone();
        bad.extend(std::iter::repeat_n(0, extra));
        assert!(open_bytes(&bad).is_err(), "{extra} bytes appended");
        assert!(open_bytes_by_index(&bad).is_err());
    }
}

#[test]
fn chunks_reordered_dropped_duplicated_or_spliced_are_refused() {
    let (_, sealed) = three_chunk_file();
    let header = header_len(VM_SNAPSHOT.len());
    let chunk_len = 16 + TAG_LEN;
    let chunk = |data: &[u8], i: usize| data[header + i * chunk_len..][..chunk_len].to_vec();
    let head = sealed[..header].to_vec();
    let tail = sealed[header + 2 * chunk_len..].to_vec();
    let (c0, c1) = (chunk(&sealed, 0), chunk(&sealed, 1));

    let cases: [(&str, Vec<u8>, u64); 4] = [
        ("0 and 1 swapped", [&head[..], &c1, &c0, &tail].concat(), 0),
        ("1 dropped", [&head[..], &c0, &tail].concat(), 1),
        ("0 twice", [&head[..], &c0, &c0, &tail].concat(), 1),
        ("final chunk dropped", [&head[..], &c0, &c1].concat(), 1),
    ];
    for (what, bad, chunk_index) in cases {
        match open_bytes(&bad) {
            Err(SealError::Tampered { chunk }) => assert_eq!(chunk, chunk_index, "{what}"),
            // Dropping the final chunk leaves a full non-final chunk at the end.
            Err(SealError::Truncated { complete_chunks }) => {
                assert_eq!(complete_chunks, 2, "{what}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(open_bytes_by_index(&bad).is_err(), "{what}");
    }

    // Same key, same plaintext, another file: its chunks do not fit this header.
    let (_, other) = three_chunk_file();
    let spliced = [&head, &other[header..]].concat();
    assert!(matches!(
        open_bytes(&spliced),
        Err(SealError::Tampered { chunk: 0 })
    ));
    let spliced = [&head[..], &c0, &chunk(&other, 1), &tail].concat();
    assert!(matches!(
        open_bytes(&spliced),
        Err(SealError::Tampered { chunk: 1 })
    ));
}

#[test]
fn wrong_key_is_refused_with_the_wrong_key_error() {
    let dir = TempDir::new("wrong-key");
    let path = dir.join("sealed");
    seal_file(&path, b"secret", DEFAULT_CHUNK_SIZE, 100);
    let other = OwnerKey::from_bytes([0x5b; 32]);
    let error = SealReader::open(File::open(&path).unwrap(), &other, VM_SNAPSHOT)
        .err()
        .unwrap();
    assert!(matches!(error, SealError::WrongKey), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("owner key the file was written with")
    );
    assert!(matches!(
        verify(File::open(&path).unwrap(), &other, VM_SNAPSHOT),
        Err(SealError::WrongKey)
    ));
}

#[test]
fn wrong_kind_is_refused_naming_both_kinds() {
    let mut writer = SealWriter::new(Vec::new(), &key(), "migration-stream").unwrap();
    writer.write_all(b"state").unwrap();
    let sealed = writer.finish().unwrap();
    match SealReader::open(&sealed[..], &key(), VM_SNAPSHOT) {
        Err(SealError::WrongKind { expected, found }) => {
            assert_eq!(expected, VM_SNAPSHOT);
            assert_eq!(found, "migration-stream");
        }
        other => panic!("{:?}", other.err()),
    }
    let mut plain = Vec::new();
    SealReader::open(&sealed[..], &key(), "migration-stream")
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, b"state");
}

#[test]
fn version_bump_is_refused_with_the_version_error() {
    let mut sealed = seal_bytes(b"data", 16);
    sealed[8..10].copy_from_slice(&2u16.to_le_bytes());
    let error = open_bytes(&sealed).unwrap_err();
    assert!(
        matches!(error, SealError::UnsupportedVersion { found: 2 }),
        "{error:?}"
    );
    assert!(error.to_string().contains("bulwark release that wrote"));
}

#[test]
fn not_a_sealed_file_is_refused_with_bad_magic() {
    for junk in [&b"BULWSEAX"[..], b"\x7fELF\x02\x01\x01\0\0\0\0\0", b"x"] {
        assert!(matches!(open_bytes(junk), Err(SealError::NotSealed)));
    }
    for short in [&b""[..], b"BULW", b"BULWSEAL\x01"] {
        assert!(matches!(open_bytes(short), Err(SealError::TruncatedHeader)));
    }
}

#[test]
fn writer_dropped_without_finish_leaves_a_truncated_file() {
    let dir = TempDir::new("unfinished");
    let path = dir.join("sealed");
    {
        let mut writer =
            SealWriter::with_chunk_size(File::create(&path).unwrap(), &key(), VM_SNAPSHOT, 16)
                .unwrap();
        writer.write_all(&[7; 50]).unwrap();
    }
    let data = fs::read(&path).unwrap();
    // Three full chunks went out; the fourth (final) never did.
    assert!(matches!(
        open_bytes(&data),
        Err(SealError::Truncated { complete_chunks: 3 })
    ));
}

#[test]
fn invalid_kind_or_chunk_size_is_refused_before_writing() {
    for kind in ["", "Vm", "a b", "ü", &"x".repeat(65)] {
        assert!(matches!(
            SealWriter::new(Vec::new(), &key(), kind),
            Err(SealError::InvalidKind { .. })
        ));
    }
    for size in [0, 15, 1024 * 1024 + 1] {
        assert!(matches!(
            SealWriter::with_chunk_size(Vec::new(), &key(), VM_SNAPSHOT, size),
            Err(SealError::InvalidChunkSize { .. })
        ));
    }
    let sealed = seal_bytes(b"", 16);
    assert!(matches!(
        SealReader::open(&sealed[..], &key(), "Not Valid"),
        Err(SealError::InvalidKind { .. })
    ));
}

#[test]
fn read_chunk_past_the_end_is_out_of_range() {
    let (_, sealed) = three_chunk_file();
    let mut reader = SealReader::open(Cursor::new(&sealed), &key(), VM_SNAPSHOT).unwrap();
    assert_eq!(reader.chunk_count().unwrap(), 3);
    let mut buf = vec![1, 2, 3];
    assert!(matches!(
        reader.read_chunk(3, &mut buf),
        Err(SealError::ChunkOutOfRange {
            index: 3,
            chunks: 3
        })
    ));
    assert!(buf.is_empty());
}

#[test]
fn read_chunk_then_sequential_read_goes_on_after_that_chunk() {
    let (plain, sealed) = three_chunk_file();
    let mut reader = SealReader::open(Cursor::new(&sealed), &key(), VM_SNAPSHOT).unwrap();
    let mut first = [0; 3];
    reader.read_exact(&mut first).unwrap();
    assert_eq!(first, plain[..3]);
    let mut buf = Vec::new();
    assert!(!reader.read_chunk(0, &mut buf).unwrap());
    assert_eq!(buf, plain[..16]);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, plain[16..]);
    assert!(reader.read_chunk(2, &mut buf).unwrap());
    assert_eq!(buf, plain[32..]);
    assert_eq!(reader.read(&mut [0; 4]).unwrap(), 0);
}

#[test]
fn read_chunk_works_when_the_sealed_file_starts_inside_the_input() {
    let (plain, sealed) = three_chunk_file();
    let mut input = Cursor::new([&b"some prefix"[..], &sealed].concat());
    input.seek(SeekFrom::Start(11)).unwrap();
    let mut reader = SealReader::open(input, &key(), VM_SNAPSHOT).unwrap();
    let mut some = [0; 20];
    reader.read_exact(&mut some).unwrap();
    let mut buf = Vec::new();
    reader.read_chunk(1, &mut buf).unwrap();
    assert_eq!(buf, plain[16..32]);
    reader.read_chunk(0, &mut buf).unwrap();
    assert_eq!(buf, plain[..16]);
}

#[test]
fn reads_after_a_failure_are_refused() {
    let (_, mut sealed) = three_chunk_file();
    let header = header_len(VM_SNAPSHOT.len());
    sealed[header + 1] ^= 1;
    let mut reader = SealReader::open(&sealed[..], &key(), VM_SNAPSHOT).unwrap();
    let error = reader.read(&mut [0; 64]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(matches!(
        SealError::from(error),
        SealError::Tampered { chunk: 0 }
    ));
    let again = reader.read(&mut [0; 64]).unwrap_err();
    assert!(matches!(SealError::from(again), SealError::Poisoned));
}

#[test]
fn read_chunk_failure_leaves_other_chunks_readable() {
    let (plain, mut sealed) = three_chunk_file();
    let header = header_len(VM_SNAPSHOT.len());
    sealed[header + 1] ^= 1;
    let mut reader = SealReader::open(Cursor::new(&sealed), &key(), VM_SNAPSHOT).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        reader.read_chunk(0, &mut buf),
        Err(SealError::Tampered { chunk: 0 })
    ));
    assert!(buf.is_empty());
    reader.read_chunk(1, &mut buf).unwrap();
    assert_eq!(buf, plain[16..32]);
}

#[test]
fn verify_counts_plaintext_bytes() {
    for len in [0, 1, 16, 17, 1000] {
        let sealed = seal_bytes(&vec![9; len], 16);
        assert_eq!(
            verify(&sealed[..], &key(), VM_SNAPSHOT).unwrap(),
            len as u64
        );
    }
}

#[test]
fn empty_payload_is_one_empty_final_chunk() {
    let sealed = seal_bytes(b"", 16);
    assert_eq!(sealed.len(), header_len(VM_SNAPSHOT.len()) + TAG_LEN);
    let mut reader = SealReader::open(Cursor::new(&sealed), &key(), VM_SNAPSHOT).unwrap();
    assert_eq!(reader.chunk_count().unwrap(), 1);
    let mut buf = vec![1];
    assert!(reader.read_chunk(0, &mut buf).unwrap());
    assert!(buf.is_empty());
    // The header alone (the final chunk missing) is a truncated file.
    assert!(matches!(
        open_bytes(&sealed[..sealed.len() - TAG_LEN]),
        Err(SealError::Truncated { complete_chunks: 0 })
    ));
}

#[test]
fn owner_key_file_saves_private_and_loads_back() {
    let dir = TempDir::new("key-file");
    let path = dir.join("owner.key");
    let key = OwnerKey::generate().unwrap();
    key.save(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("{}\n", *key.to_hex())
    );
    assert_eq!(*OwnerKey::load(&path).unwrap().to_hex(), *key.to_hex());
    assert!(matches!(
        key.save(&path),
        Err(SealError::KeyFileWrite { .. })
    ));

    // Sealed with the saved key, opened with the loaded one.
    let mut writer = SealWriter::new(Vec::new(), &key, VM_SNAPSHOT).unwrap();
    writer.write_all(b"x").unwrap();
    let sealed = writer.finish().unwrap();
    let loaded = OwnerKey::load(&path).unwrap();
    assert_eq!(verify(&sealed[..], &loaded, VM_SNAPSHOT).unwrap(), 1);
}

#[test]
fn owner_key_file_with_other_content_is_refused() {
    let dir = TempDir::new("key-text");
    let hex = "ab".repeat(32);
    let path = dir.join("key");
    fs::write(&path, &hex).unwrap();
    assert!(OwnerKey::load(&path).is_ok(), "no newline");
    for bad in [
        format!("{hex}\n\n"),
        format!("{hex}\r\n"),
        format!(" {hex}"),
        hex[..62].to_string(),
        String::new(),
    ] {
        fs::write(&path, &bad).unwrap();
        match OwnerKey::load(&path) {
            Err(SealError::KeyFileText { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    fs::write(&path, [0xff; 64]).unwrap();
    assert!(matches!(
        OwnerKey::load(&path),
        Err(SealError::KeyFileText { .. })
    ));
    let missing = dir.join("missing");
    let error = OwnerKey::load(&missing).unwrap_err();
    assert!(matches!(error, SealError::KeyFileRead { .. }));
    assert!(error.to_string().contains("missing"));
}

#[test]
fn write_error_poisons_the_writer() {
    /// Accepts `room` bytes, then fails.
    struct Full {
        room: usize,
    }
    impl Write for Full {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            let n = data.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let header = header_len(VM_SNAPSHOT.len());
    let mut writer =
        SealWriter::with_chunk_size(Full { room: header + 10 }, &key(), VM_SNAPSHOT, 16).unwrap();
    writer.write_all(&[0; 16]).unwrap();
    let error = writer.write_all(&[0; 16]).unwrap_err();
    assert_eq!(error.raw_os_error(), None, "wrapped in a SealError");
    match SealError::from(error) {
        SealError::Io(e) => assert_eq!(e.raw_os_error(), Some(28)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        SealError::from(writer.write(&[0]).unwrap_err()),
        SealError::Poisoned
    ));
    assert!(matches!(writer.finish(), Err(SealError::Poisoned)));
}
