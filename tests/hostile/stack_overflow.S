// Recurses without end: the guard page below the stack stops it (16 MiB VM, vCPU 0 guard at
// 16M - 64K - 4K = 0xfef000).
// exit: 123
// stderr: #PF page fault
// stderr: address 0xfefff8, error code 0x6 (not present, write, user)
    .section .text.start, "ax"
    .globl _start
_start:
    call _start
