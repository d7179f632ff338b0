//! Linux guests: boot protocols, ACPI, platform set-up.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
