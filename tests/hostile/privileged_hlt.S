// HLT is privileged: at CPL3 it is a general-protection fault, not a way to stall a host CPU.
// exit: 123
// stderr: #GP general protection fault (vector 13) at rip 0x100000 (CPL3)
    .section .text.start, "ax"
    .globl _start
_start:
    hlt
    jmp .
