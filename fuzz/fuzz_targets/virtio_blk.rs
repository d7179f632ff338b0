//! Fuzz target: a hostile driver's requests to virtio-blk on a real image file.
//! The harness and its invariants are in `bulwark_monitor::fuzz::virtio_blk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::virtio_blk(data));
