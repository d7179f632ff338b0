/* Exercises the port and MMIO buses: the platform-info device (magic, vCPUs, memory,
 * scratch register), the 16550 transmitter, the debug console port and the POST code port;
 * and the CPUID table: SSE2 and the hypervisor bit are there, and the hypervisor leaf's
 * signature is printed ("hv BulwarkVMM" where CPUID traps to the monitor; on a kvm_pvm host
 * whose CPUs cannot fault CPUID at CPL3 it runs natively and shows the host's). */
#include <bulwark.h>

#define COM1 0x3f8

static void uart_puts(const char *s)
{
    for (; *s; s++) {
        while (!(bw_inb(COM1 + 5) & 0x20)) /* LSR: transmitter holding register empty */
            ;
        bw_outb(COM1, (bw_u8)*s);
    }
}

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    bw_u64 dev = info->mmio_base;
    if (bw_mmio_read32(dev) != BW_INFO_MAGIC)
        return 1;
    if (bw_mmio_read32(dev + 8) != vcpus)
        return 2;
    if (*(volatile bw_u64 *)(dev + 0x10) != info->mem_size)
        return 3;
    bw_mmio_write32(dev + 0x18, 0xc0ffee);
    if (bw_mmio_read32(dev + 0x18) != 0xc0ffee)
        return 4;
    bw_mmio_write32(dev, 0); /* read-only register: ignored */
    if (bw_mmio_read32(dev) != BW_INFO_MAGIC)
        return 5;
    uart_puts("uart ok\n");
    for (const char *s = "e9 ok\n"; *s; s++)
        bw_outb(0xe9, (bw_u8)*s);
    if (bw_inb(0xe9) != 0xe9)
        return 6;
    bw_u32 a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000000), "c"(0));
    char sig[17] = "hv ";
    bw_u32 words[3] = {b, c, d};
    for (int i = 0; i < 12; i++)
        sig[3 + i] = (char)(words[i / 4] >> (8 * (i % 4)));
    sig[15] = 0;
    uart_puts(sig);
    uart_puts("\n");
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(d & (1u << 26)) || !(c & (1u << 31)))
        return 8;
    bw_outb(0x80, 0x42);
    return 0;
}
