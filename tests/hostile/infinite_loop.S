// Spins forever: the timeout stops it.
// args: --timeout 500ms
// exit: 124
// stderr: timed out after 0.5
    .section .text.start, "ax"
    .globl _start
_start:
    jmp _start
