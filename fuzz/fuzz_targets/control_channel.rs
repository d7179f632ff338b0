//! Fuzz target: see `bulwark_monitor::fuzz::control_channel` for the harness and its invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::control_channel(data));
