//! Fuzz target: the guest agent's protocol decoder, which each side runs on what the other
//! sends (the host on guest-controlled replies). The harness and its invariants — no panic,
//! canonical re-encoding, stream and slice decoders agree — are in
//! `bulwark_agent::proto::fuzz_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_agent::proto::fuzz_decode(data));
