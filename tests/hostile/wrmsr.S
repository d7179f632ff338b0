// Tries to move the SYSCALL entry point (LSTAR) from CPL3.
// exit: 123
// stderr: #GP general protection fault (vector 13)
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0xc0000082, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    jmp .
