//! Linux guests: boot protocols, ACPI, platform set-up.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
pub mod vm;

pub use vm::{LinuxError, LinuxVmConfig, restore_linux, run_linux};
