// Loads an x87 value from MMIO: KVM's instruction emulator cannot perform it, so KVM reports
// an emulation failure. The VM stops with the KVM internal error named; the monitor survives.
// exit: 123
// stderr: KVM internal error on vCPU 0: instruction emulation failed (suberror 1) at rip 0x10000a
    .section .text.start, "ax"
    .globl _start
_start:
    mov $0xd0000000, %rax   // platform-info device (10 bytes of code up to here)
    fldt (%rax)
    mov $5, %edi            // not reached
    xor %eax, %eax
    out %eax, $0xb0
