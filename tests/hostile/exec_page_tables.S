// Jumps into its page tables: supervisor, non-executable memory.
// exit: 123
// stderr: #PF page fault
// stderr: address 0x10000, error code 0x15 (protection violation, instruction fetch, user)
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0x10000, %rax
    jmp *%rax
