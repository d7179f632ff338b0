//! Fuzz target: the payload (ELF or flat) parser on arbitrary files.
//! The harness and its invariants are in `bulwark_monitor::fuzz::payload_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::payload_image(data));
