//! Devices the guest talks to through port I/O and MMIO exits.
//!
//! This crate holds the guest-facing front halves of devices: the buses that route an exit to
//! a device, the legacy platform devices, and (later) the virtio transports. Devices implement
//! the narrow [`BusDevice`] trait — read and write at an offset — and never see the vCPU or KVM.
//! Every type here is driven by guest-controlled values, so none of it may panic on any input.
//! `unsafe` is confined to [`sys`] (vectored I/O between files and guest memory).
#![deny(unsafe_code)]

pub mod bus;
pub mod console;
pub mod i8042;
pub mod info;
pub mod postcode;
pub mod power;
pub mod rtc;
pub mod serial;
pub mod state;
#[allow(unsafe_code)]
pub mod sys;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, BusRange, BusStats};
