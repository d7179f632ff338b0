// Reads a null pointer: the null page is never mapped.
// exit: 123
// stderr: #PF page fault (vector 14)
// stderr: address 0x0, error code 0x4 (not present, read, user)
    .section .text.start, "ax"
    .globl _start
_start:
    mov (0), %rax
    jmp .
