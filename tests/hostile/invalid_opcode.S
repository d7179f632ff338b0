// Executes ud2.
// exit: 123
// stderr: #UD invalid opcode (vector 6) at rip 0x100000
    .section .text.start, "ax"
    .globl _start
_start:
    ud2
