// At CPL0, loads an empty IDT and faults: with no handler the CPU triple-faults.
// args: --cpl0 --timeout 60s
// exit: 123
// stderr: triple-faulted
    .section .text.start, "ax"
    .globl _start
_start:
    lidt idt_null(%rip)
    ud2
    .align 8
idt_null:
    .word 0
    .quad 0
