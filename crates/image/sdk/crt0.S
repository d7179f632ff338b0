/* Entry of C payloads: rdi = vCPU index, rsi = vCPU count, rdx = info page (see bulwark.h). */
    .section .text.start, "ax"
    .globl _start
_start:
    xor %ebp, %ebp
    call bw_main
    mov %eax, %edi          /* exit(status) */
    xor %eax, %eax
    out %eax, $0xb0
1:  jmp 1b
