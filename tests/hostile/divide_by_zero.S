// Divides by zero.
// exit: 123
// stderr: #DE divide error (vector 0) at rip 0x100005
    .section .text.start, "ax"
    .globl _start
_start:
    xor %ecx, %ecx      // 2 bytes
    mov $1, %al         // 2 bytes
    cltd                // 1 byte
    div %ecx            // at 0x100005
    jmp .
