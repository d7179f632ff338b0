// Tries to switch page tables from CPL3.
// exit: 123
// stderr: #GP general protection fault (vector 13)
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0x200000, %rax
    mov %rax, %cr3
    jmp .
