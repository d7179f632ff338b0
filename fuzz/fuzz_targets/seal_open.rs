//! Fuzz target: opening a sealed file (snapshot, later migration stream), whose bytes come from
//! storage the management plane controls. The harness and its invariants — no panic; `Read`,
//! `verify` and `read_chunk` agree; what opens reseals to the same plaintext — are in
//! `bulwark_seal::fuzz::fuzz_open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_seal::fuzz::fuzz_open(data));
