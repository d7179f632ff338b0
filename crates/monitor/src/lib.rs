//! The per-VM monitor: the trusted core of one VM.
//!
//! It owns the KVM VM, guest memory (a sealed memfd), the vCPU threads and one event loop, and
//! routes every exit through [`exit::dispatch`]. This crate talks to KVM and guest memory, so it
//! may use `unsafe`; each use carries its safety argument.

pub mod abi;
pub mod control;
pub mod exit;
#[doc(hidden)]
pub mod fuzz;
pub mod hostcall;
pub mod input;
pub mod introspect;
pub mod kvm;
pub mod linux;
pub mod managed;
pub mod memory;
pub mod outcome;
pub mod payload;
pub mod runner;
pub mod snapshot;
pub mod tty;
pub mod uffd;
pub mod vcpu;
pub mod vm;

pub use bulwark_backends as backends;
pub use bulwark_devices::virtio::block::{DriveConfig, Isolation};
pub use bulwark_devices::virtio::net::{NetConfig, preopen_tap, random_mac};
pub use bulwark_devices::virtio::vsock::VsockConfig;
pub use introspect::IntrospectionConfig;
pub use linux::{LinuxVmConfig, restore_linux, run_linux};
pub use outcome::{FaultReport, RunReport, StopReason, VmStats};
pub use vm::{ConsoleIn, ConsoleIo, FunctionVmConfig, VmError, restore_function, run_function};
