//! Introspection of a Linux guest from outside (the survey's VM introspection, Garfinkel &
//! Rosenblum): guest page tables walked from a vCPU's control registers, kernel symbols from
//! the image's `System.map` relocated by the KASLR slide read from the syscall-entry MSR, and
//! structure layouts from the kernel's own BTF — no hand-made profile — and, built on those, the
//! guest's process list. Everything read from the guest is the guest's to forge: walks are
//! bounded and every short read is an error or a result marked partial.
//!
//! `guest` ties them together for a paused VM: [`guest::Profile`] (System.map and BTF) and
//! [`guest::GuestKernel`] (located from one vCPU's registers), which lists processes and
//! modules; `integrity` measures what rootkits change (kernel text and rodata, the system call
//! table, IDT, GDT, MSRs, CR0/CR4 protections) against a baseline and finds modules hidden from
//! the module list. The monitor serves that to the VM's owner over its control channel.
//!
//! `trace` decodes what a breakpoint on a kernel function shows (the process, the exec'd file).

pub mod fuzz;
pub mod guest;
pub mod integrity;
pub mod layout;
pub mod modules;
pub mod pagetable;
pub mod symbols;
pub mod tasks;
pub mod trace;
