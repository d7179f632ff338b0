// Touches the MMIO window outside the platform device: ignored and counted; unmapped reads
// return all ones.
// exit: 0
// stats: unhandled_mmio=256
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0xd0001000, %rbx
    mov $128, %ecx
1:  mov (%rbx), %eax
    cmp $0xffffffff, %eax
    jne 9f
    movl $0x12345678, (%rbx)
    add $0x1000, %rbx
    dec %ecx
    jnz 1b
    xor %edi, %edi
    xor %eax, %eax
    out %eax, $0xb0
9:  mov $1, %edi
    xor %eax, %eax
    out %eax, $0xb0
