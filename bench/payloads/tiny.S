/* tiny.S — function-start benchmark payload: one console byte, then exit(0).
 * Built with --no-crt0 --flat: the monitor enters it at its first byte. */
    .section .text.start, "ax"
    .globl _start
_start:
    mov $'x', %al
    out %al, $0xe9          /* one byte on the debug console (stdout) */
    xor %edi, %edi          /* exit(0) */
    xor %eax, %eax
    out %eax, $0xb0
1:  jmp 1b
