//! Fuzz target: a guest driving the virtio-mmio transport and the virtio-rng device.
//! The harness and its invariants are in `bulwark_monitor::fuzz::virtio_mmio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::virtio_mmio(data));
