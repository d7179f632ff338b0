// Reads and writes every one of the 65536 ports except the ABI's: unknown ones are
// ignored and counted, then the payload exits cleanly. (0x3f8..0x3ff is the UART, 0x80 the
// POST code port, 0xe9 the debug console; those are real devices, written with 0 here.)
// args: --timeout 30s
// exit: 0
// stats: unhandled_pio=131048
    .section .text.start, "ax"
    .globl _start
_start:
    xor %edx, %edx
1:  cmp $0xb0, %dx
    je 2f
    cmp $0xb1, %dx
    je 2f
    cmp $0xe9, %dx
    je 2f
    in %dx, %al
    xor %eax, %eax
    out %al, %dx
2:  inc %edx
    cmp $0x10000, %edx
    jne 1b
    xor %edi, %edi
    xor %eax, %eax
    out %eax, $0xb0
