// int3 is allowed from CPL3 and reports as a breakpoint.
// exit: 123
// stderr: #BP breakpoint (vector 3)
    .section .text.start, "ax"
    .globl _start
_start:
    int3
    jmp .
