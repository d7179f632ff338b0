//! Replays the committed `backend_proto` fuzz corpus (`fuzz/corpus/backend_proto/`) through
//! `bulwark_backends::fuzz::fuzz_proto`, so every input the fuzzer kept is a regression test in
//! plain `cargo test`. A missing or empty corpus fails.

#[path = "../../../fuzz/replay.rs"]
mod replay;

#[test]
fn backend_proto_corpus_replays_without_failure() {
    replay::replay("backend_proto", bulwark_backends::fuzz::fuzz_proto);
}

#[test]
fn backend_proto_seeds_pass_the_harness() {
    for (name, data) in bulwark_backends::fuzz::seeds() {
        bulwark_backends::fuzz::fuzz_proto(&data);
        assert!(!data.is_empty(), "{name}");
    }
}

/// Writes the seed corpus; run by hand (`-- --ignored`), then fuzz.
#[test]
#[ignore = "writes fuzz/corpus/backend_proto; run by hand to regenerate the seeds"]
fn backend_proto_seed_corpus_regenerate() {
    let dir = replay::corpus_dir("backend_proto");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in bulwark_backends::fuzz::seeds() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
