// Pretends to be the monitor's exception stub by writing to the fault port: the monitor
// checks where the report came from, ignores it, and the payload exits normally.
// exit: 7
// stats: unhandled_pio=1
    .section .text.start, "ax"
    .globl _start
_start:
    mov $14, %eax
    out %eax, $0xb1
    mov $7, %edi
    xor %eax, %eax
    out %eax, $0xb0
