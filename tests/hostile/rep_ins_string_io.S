// String port input: KVM may hand a whole `rep ins` to the monitor in one exit. Every element
// must be answered by the device (not just the first, leaving stale bytes from earlier exits).
// The payload checks all 24 bytes itself and exits with 1 + the index of the first wrong one.
// exit: 0
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0x1234, %ax
    out %ax, $0x80              // POST code 0x1234
    lea buf(%rip), %rdi
    mov $8, %ecx
    mov $0xe9, %dx
    rep insb                    // 8 x 0xe9
    mov $0x80, %dx
    mov $8, %ecx
    rep insw                    // 8 x 34 12
    lea buf(%rip), %rsi
    xor %ecx, %ecx
1:  movzbl (%rsi,%rcx), %eax
    mov $0xe9, %edx
    cmp $8, %ecx
    jb 2f
    mov $0x34, %edx             // odd/even bytes of the words
    test $1, %ecx
    jz 2f
    mov $0x12, %edx
2:  cmp %edx, %eax
    jne 9f
    inc %ecx
    cmp $24, %ecx
    jne 1b
    xor %edi, %edi
    jmp 8f
9:  lea 1(%rcx), %edi
8:  xor %eax, %eax
    out %eax, $0xb0
    .data
buf: .fill 32, 1, 0x77
