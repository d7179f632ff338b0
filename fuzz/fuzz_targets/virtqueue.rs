//! Fuzz target: the split-ring walker (serve_queue, chain walks, streams) on hostile rings.
//! The harness and its invariants are in `bulwark_monitor::fuzz::virtqueue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::virtqueue(data));
