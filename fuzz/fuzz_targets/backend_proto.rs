//! Fuzz target: the messages between a monitor and a device back-end (`crates/backends`), which
//! a compromised back-end controls, through the decoder and the I/O window's ownership table.
//! The harness and its invariants are in `bulwark_backends::fuzz::fuzz_proto`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_backends::fuzz::fuzz_proto(data));
