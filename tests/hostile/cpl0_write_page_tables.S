// At CPL0 the page tables are still read-only (CR0.WP): the write faults and is reported.
// args: --cpl0 --timeout 60s
// exit: 123
// stderr: #PF page fault
// stderr: (CPL0)
// stderr: (protection violation, write, supervisor)
    .section .text.start, "ax"
    .globl _start
_start:
    movq $0, (0x10000)
    jmp .
