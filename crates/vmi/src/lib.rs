//! Introspection of a Linux guest from outside (the survey's VM introspection, Garfinkel &
//! Rosenblum): guest page tables walked from a vCPU's control registers, kernel symbols from
//! the image's `System.map` relocated by the KASLR slide read from the syscall-entry MSR, and
//! structure layouts from the kernel's own BTF — no hand-made profile — and, built on those, the
//! guest's process list. Everything read from the guest is the guest's to forge: walks are
//! bounded and every short read is an error or a result marked partial.
//!
//! Not yet here (issue 6): reading a running VM's memory and vCPU state through the monitor,
//! the CLI and API, modules, integrity baselines, write traps, breakpoints and cross-view.

pub mod fuzz;
pub mod layout;
pub mod pagetable;
pub mod symbols;
pub mod tasks;
