//! Replaying a committed fuzz corpus (`fuzz/corpus/<target>/`) through its harness in plain
//! `cargo test`, shared by the crates' `tests/fuzz_corpus.rs` (included with `#[path]`). A
//! corpus that is missing or empty fails: a replay that replays nothing must not pass.
#![allow(dead_code)]

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// `fuzz/corpus/<target>` of this repository.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// The corpus files of `target`, sorted; panics if there are none.
pub fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "corpus {} is missing ({e}); seed it and run `cargo fuzz run {target}` in fuzz/",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} is empty; a replay that replays nothing must not pass",
        dir.display()
    );
    files
}

/// Runs `harness` on every corpus file of `target`; fails naming every input that panics.
pub fn replay(target: &str, harness: impl Fn(&[u8])) {
    let files = corpus_files(target);
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("readable corpus file");
            panic::catch_unwind(AssertUnwindSafe(|| harness(&data)))
                .is_err()
                .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs fail (panic messages above); reproduce one with \
         `cargo fuzz run {target} <file>` in fuzz/:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}
