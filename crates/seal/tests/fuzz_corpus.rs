//! Replays the committed `seal_open` fuzz corpus (`fuzz/corpus/seal_open/`) through
//! `bulwark_seal::fuzz::fuzz_open`, so every input the fuzzer kept — crash reproducers
//! included — is a regression test in plain `cargo test`, without cargo-fuzz or nightly.
//!
//! A corpus directory that is missing or empty fails the test: a replay that replays nothing
//! must not pass. So does a corpus in which no file opens with the fuzz key: the fuzzer would
//! then never get past the key wrap (after a format change, regenerate the seeds with
//! `cargo test -p bulwark-seal --test fuzz_corpus -- --ignored` and fuzz again).

#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

use bulwark_seal::fuzz::{FUZZ_KEY, fuzz_open};
use bulwark_seal::{OwnerKey, SealWriter, VM_SNAPSHOT, verify};

fn corpus_dir() -> PathBuf {
    replay::corpus_dir("seal_open")
}

#[test]
fn seal_open_corpus_replays_without_failure() {
    let dir = corpus_dir();
    let files = replay::corpus_files("seal_open");
    let key = OwnerKey::from_bytes(FUZZ_KEY);
    let mut opened = 0;
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("readable corpus file");
            if verify(&data[..], &key, VM_SNAPSHOT).is_ok() {
                opened += 1;
            }
            panic::catch_unwind(AssertUnwindSafe(|| fuzz_open(&data)))
                .is_err()
                .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} seal_open inputs fail (panic messages above); reproduce one with \
         `cargo fuzz run seal_open <file>` in fuzz/:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
    assert!(
        opened > 0,
        "no file in {} opens with the fuzz key: the fuzzer cannot get past the key wrap; \
         regenerate the seeds (see this file's doc)",
        dir.display()
    );
}

/// Writes the seed corpus: valid sealed files under the fuzz key with small chunks (so that
/// mutations reach several chunks and the final-chunk logic), a file of another kind, and
/// junk. Run by hand (`-- --ignored`); the fuzzer and `cargo fuzz cmin` take it from there.
#[test]
#[ignore = "writes fuzz/corpus/seal_open; run by hand to regenerate the seeds"]
fn seal_open_seed_corpus_regenerate() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let key = OwnerKey::from_bytes(FUZZ_KEY);
    let seal = |kind: &str, chunk_size: u32, plain: &[u8]| {
        let mut writer = SealWriter::with_chunk_size(Vec::new(), &key, kind, chunk_size).unwrap();
        writer.write_all(plain).unwrap();
        writer.finish().unwrap()
    };
    let text: Vec<u8> = (0..200u8).collect();
    let seeds: [(&str, Vec<u8>); 10] = [
        ("seed-empty-c16", seal(VM_SNAPSHOT, 16, b"")),
        ("seed-1-c16", seal(VM_SNAPSHOT, 16, b"x")),
        ("seed-16-c16", seal(VM_SNAPSHOT, 16, &text[..16])),
        ("seed-40-c16", seal(VM_SNAPSHOT, 16, &text[..40])),
        ("seed-200-c64", seal(VM_SNAPSHOT, 64, &text)),
        ("seed-10-c64k", seal(VM_SNAPSHOT, 64 * 1024, &text[..10])),
        (
            "seed-kind-migration",
            seal("migration-stream", 16, b"state"),
        ),
        ("seed-junk-magic-only", b"BULWSEAL".to_vec()),
        (
            "seed-junk-version-2",
            b"BULWSEAL\x02\x00\x0bvm-snapshot".to_vec(),
        ),
        ("seed-junk-text", b"not a sealed file at all\n".to_vec()),
    ];
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
