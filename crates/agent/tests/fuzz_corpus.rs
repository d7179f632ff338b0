//! Replays the committed `agent_proto` fuzz corpus (`fuzz/corpus/agent_proto/`) through
//! `bulwark_agent::proto::fuzz_decode`, so every input the fuzzer kept — crash reproducers
//! included — is a regression test in plain `cargo test`, without cargo-fuzz or nightly.
//!
//! A corpus directory that is missing or empty fails the test: a replay that replays nothing
//! must not pass.

#[path = "../../../fuzz/replay.rs"]
mod replay;

#[test]
fn agent_proto_corpus_replays_without_failure() {
    replay::replay("agent_proto", |data| {
        bulwark_agent::proto::fuzz_decode(data);
    });
}
