// At CPL0, clears CR0.WP and zeroes its PML4: nothing is mapped any more, not even the
// exception stubs, so the next fetch triple-faults. The monitor survives and says so.
// args: --cpl0 --timeout 60s
// exit: 123
// stderr: triple-faulted
    .section .text.start, "ax"
    .globl _start
_start:
    mov %cr0, %rax
    and $~(1 << 16), %rax
    mov %rax, %cr0
    xor %eax, %eax
    mov $0x10000, %rdi
    mov $512, %ecx
    rep stosq
    mov %cr3, %rax
    mov %rax, %cr3
    nop
    jmp .
