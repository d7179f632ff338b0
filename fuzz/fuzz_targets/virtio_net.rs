//! Fuzz target: a hostile driver's transmit chains and receive buffers against virtio-net's
//! frame parser and receive placement. The harness and its invariants are in
//! `bulwark_monitor::fuzz::virtio_net`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::virtio_net(data));
