//! Fuzz target: host calls with guest-controlled numbers, pointers and lengths.
//! The harness and its invariants are in `bulwark_monitor::fuzz::hostcall`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::hostcall(data));
