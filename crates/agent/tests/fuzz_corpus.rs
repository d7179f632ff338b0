//! Replays the committed `agent_proto` fuzz corpus (`fuzz/corpus/agent_proto/`) through
//! `bulwark_agent::proto::fuzz_decode`, so every input the fuzzer kept — crash reproducers
//! included — is a regression test in plain `cargo test`, without cargo-fuzz or nightly.
//!
//! A corpus directory that is missing or empty fails the test: a replay that replays nothing
//! must not pass.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[test]
fn agent_proto_corpus_replays_without_failure() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/agent_proto");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "corpus {} is missing ({e}); seed it and run `cargo fuzz run agent_proto` in fuzz/",
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
    let failed: Vec<String> = files
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).expect("readable corpus file");
            panic::catch_unwind(AssertUnwindSafe(|| {
                bulwark_agent::proto::fuzz_decode(&data);
            }))
            .is_err()
            .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} agent_proto inputs fail (panic messages above); reproduce one with \
         `cargo fuzz run agent_proto <file>` in fuzz/:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}
