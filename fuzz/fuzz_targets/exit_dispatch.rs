//! Fuzz target: vCPU exits through the monitor's exit dispatch to its real devices.
//! The harness and its invariants are in `bulwark_monitor::fuzz::exit_dispatch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bulwark_monitor::fuzz::exit_dispatch(data));
