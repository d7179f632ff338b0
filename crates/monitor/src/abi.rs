//! The function micro-VM host-call ABI (version 1), as seen by the guest.
//!
//! The full description, with examples, is in `docs/payload-abi.md`. In short:
//!
//! * A host call is `out 0xb0, eax` ([`HOSTCALL_PORT`]) with `eax` the call number; arguments
//!   are in `rdi`, `rsi`, `rdx` (as for a Linux system call); the result comes back in `rax`.
//!   Errors are negative errno values. `in eax, 0xb0` returns [`ABI_VERSION`].
//! * Port `0xe9` (one byte out) is a raw console; port `0x80` records POST codes; COM1 (0x3f8)
//!   is a 16550; the platform-info device is at the start of the MMIO window.
//! * At entry `rdi` holds the vCPU index, `rsi` the vCPU count, `rdx` the info page address.

/// Port of the host-call doorbell.
pub const HOSTCALL_PORT: u16 = 0xb0;
/// Port the monitor's own exception stubs report faults on.
pub const FAULT_PORT: u16 = 0xb1;
/// Bochs-style debug console.
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;
/// POST-code port.
pub const POSTCODE_PORT: u16 = 0x80;

pub const ABI_VERSION: u32 = 1;

/// Host-call numbers.
pub mod call {
    /// `exit(status)`: stop the VM; `status` (low 8 bits) is the process exit status.
    pub const EXIT: u32 = 0;
    /// `write(fd, buf, len) -> len`: fd 1 is the console (stdout), fd 2 is stderr.
    pub const WRITE: u32 = 1;
    /// `read(buf, len) -> n`: console input; blocks until at least one byte; 0 at end of input.
    pub const READ: u32 = 2;
    /// `clock() -> ns`: monotonic nanoseconds since the VM was created.
    pub const CLOCK: u32 = 3;
    /// `random(buf, len) -> len`: bytes from the host's CSPRNG (getrandom).
    pub const RANDOM: u32 = 4;
}

/// Negative errno values returned in `rax`.
pub mod errno {
    pub const EBADF: i64 = 9;
    pub const EFAULT: i64 = 14;
    pub const EIO: i64 = 5;
    pub const ENOSYS: i64 = 38;
}

/// Layout of the read-only info page at `INFO_ADDR`.
pub mod info {
    pub const MAGIC: u32 = 0x4b57_4c42; // "BLWK"
    pub const OFF_MAGIC: usize = 0x00;
    pub const OFF_VERSION: usize = 0x04;
    pub const OFF_VCPUS: usize = 0x08;
    /// Bit 0: the payload runs at CPL0.
    pub const OFF_FLAGS: usize = 0x0c;
    pub const OFF_MEM_SIZE: usize = 0x10;
    /// First free byte after the image (page-aligned).
    pub const OFF_HEAP_START: usize = 0x18;
    /// End of the heap (start of the stack region).
    pub const OFF_HEAP_END: usize = 0x20;
    pub const OFF_ARG_LEN: usize = 0x28;
    pub const OFF_MMIO_BASE: usize = 0x30;
    /// The argument string, NUL-terminated.
    pub const OFF_ARG: usize = 0x40;
    pub const FLAG_CPL0: u32 = 1;
}
