// Tries to replace the page-fault gate in the IDT.
// exit: 123
// stderr: #PF page fault
// stderr: address 0x20e0
    .section .text.start, "ax"
    .globl _start
_start:
    movq $0x100000, (0x2000 + 14 * 16)
    jmp .
