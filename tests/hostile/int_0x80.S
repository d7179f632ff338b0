// A Linux-style system call gate does not exist: on hardware virtualization int 0x80 is
// refused with #GP (error code 0x402: IDT entry 0x80); kvm_pvm turns user-mode INT n into #UD.
// exit: 123
// stderr-any: error code 0x402 | #UD invalid opcode (vector 6)
// stderr: at rip 0x100000 (CPL3)
    .section .text.start, "ax"
    .globl _start
_start:
    int $0x80
    jmp .
