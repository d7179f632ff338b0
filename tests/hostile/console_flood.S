// Writes 64 KiB blocks to the console forever: the console limit caps what reaches the host,
// and the timeout ends the VM.
// args: --timeout 1s --console-limit 100K
// exit: 124
// stdout-bytes: 102400
// stats: console_dropped=
    .section .text.start, "ax"
    .globl _start
_start:
    mov $1, %edi
    mov $0x100000, %esi
    mov $0x10000, %edx
    mov $1, %eax
    out %eax, $0xb0
    jmp _start
