//! Fuzz target: introspection's page-table walk, virtual reads and process-list walk over
//! guest memory the guest controls. The harness and its invariants are in
//! `bulwark_vmi::fuzz::fuzz_walk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_vmi::fuzz::fuzz_walk(data));
