// Overwrites its own PML4: page tables are supervisor-only, so a CPL3 write faults.
// exit: 123
// stderr: #PF page fault
// stderr: address 0x10000, error code 0x7 (protection violation, write, user)
    .section .text.start, "ax"
    .globl _start
_start:
    movq $0, (0x10000)
    jmp .
