// SYSCALL is disabled (EFER.SCE clear): invalid opcode on hardware virtualization. kvm_pvm
// delivers SYSCALL to LSTAR (0, unmapped) whatever EFER says, which faults at rip 0. Either
// way the payload is stopped with a report, never handled as a host call.
// exit: 123
// stderr-any: #UD invalid opcode (vector 6) | page fault (vector 14) at rip 0x0
    .section .text.start, "ax"
    .globl _start
_start:
    syscall
    jmp .
