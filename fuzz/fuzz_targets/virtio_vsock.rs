//! Fuzz target: virtio-vsock between a hostile guest and real unix sockets.
//! The harness and its invariants are in `bulwark_monitor::fuzz::virtio_vsock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::virtio_vsock(data));
