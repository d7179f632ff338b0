// At CPL0, HLT with interrupts off can never wake: the VM stops with a message.
// args: --cpl0 --timeout 60s
// exit: 123
// stderr: executed HLT
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    hlt
    jmp .
