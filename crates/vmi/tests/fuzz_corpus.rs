//! Replays the committed `vmi_walk` fuzz corpus (`fuzz/corpus/vmi_walk/`) through
//! `bulwark_vmi::fuzz::fuzz_walk`, so every input the fuzzer kept is a regression test in plain
//! `cargo test`. A missing or empty corpus fails.

#[path = "../../../fuzz/replay.rs"]
mod replay;

#[test]
fn vmi_walk_corpus_replays_without_failure() {
    replay::replay("vmi_walk", bulwark_vmi::fuzz::fuzz_walk);
}

#[test]
fn vmi_walk_seeds_pass_the_harness() {
    for (name, data) in bulwark_vmi::fuzz::seeds() {
        bulwark_vmi::fuzz::fuzz_walk(&data);
        assert!(data.len() > 25, "{name}");
    }
}

/// Writes the seed corpus; run by hand (`-- --ignored`), then fuzz.
#[test]
#[ignore = "writes fuzz/corpus/vmi_walk; run by hand to regenerate the seeds"]
fn vmi_walk_seed_corpus_regenerate() {
    let dir = replay::corpus_dir("vmi_walk");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in bulwark_vmi::fuzz::seeds() {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
