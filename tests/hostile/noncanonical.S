// Reads a non-canonical address: #GP, not #PF.
// exit: 123
// stderr: #GP general protection fault (vector 13)
    .section .text.start, "ax"
    .globl _start
_start:
    movabs $0x8000000000000000, %rax
    mov (%rax), %rbx
    jmp .
