// Asks the host to read or write the system area, wrap around the address space, or use a
// bad fd or call number. Each call must fail with the right errno; the payload exits with the
// number of the first check that did not (0 if all passed).
// exit: 0
    .section .text.start, "ax"
    .globl _start
#define CALL(nr, a, b, c) mov $a, %rdi; mov $b, %rsi; mov $c, %rdx; mov $nr, %eax; out %eax, $0xb0
#define EXPECT(v, n) cmp $v, %rax; mov $n, %edi; jne fail
_start:
    CALL(1, 1, 0x10000, 8)                 // write the page tables to the console
    EXPECT(-14, 1)
    CALL(2, 0x2000, 16, 0)                 // read console input into the IDT
    EXPECT(-14, 2)
    CALL(4, 0x80000, 64, 0)                // random bytes onto the exception stack
    EXPECT(-14, 3)
    movabs $0xfffffffffffffff0, %rsi
    mov $1, %edi; mov $32, %edx; mov $1, %eax; out %eax, $0xb0   // wrapping buffer
    EXPECT(-14, 4)
    mov $1, %edi; mov $0x100000, %esi; movabs $0xffffffffffff, %rdx; mov $1, %eax; out %eax, $0xb0
    EXPECT(-14, 5)                         // huge length
    CALL(1, 7, 0x100000, 1)                // bad fd
    EXPECT(-9, 6)
    CALL(99, 0, 0, 0)                      // unknown call
    EXPECT(-38, 7)
    mov $0, %edi
fail:
    xor %eax, %eax
    out %eax, $0xb0
