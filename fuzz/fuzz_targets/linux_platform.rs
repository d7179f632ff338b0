//! Fuzz target: a Linux guest's port and MMIO exits to the Linux platform devices.
//! The harness and its invariants are in `bulwark_monitor::fuzz::linux_platform`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::linux_platform(data));
