// Jumps past the end of RAM, where nothing is mapped.
// exit: 123
// stderr: #PF page fault
// stderr: rip 0x40000000
// stderr: (not present, instruction fetch, user)
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0x40000000, %rax
    jmp *%rax
