/* Exercises the port and MMIO buses: the platform-info device (magic, vCPUs, memory,
 * scratch register), the 16550 transmitter, the debug console port and the POST code port;
 * and the CPUID table: the hypervisor leaf names bulwark, SSE2 and long mode are there. */
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
    if (b != 0x776c7542 || c != 0x566b7261 || d != 0x4d4d) /* "BulwarkVMM\0\0" */
        return 7;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(d & (1u << 26)) || !(c & (1u << 31)))
        return 8;
    bw_outb(0x80, 0x42);
    return 0;
}
