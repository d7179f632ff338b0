/* Exercises the port and MMIO buses: the platform-info device (magic, vCPUs, memory,
 * scratch register), the 16550 transmitter, the debug console port and the POST code port. */
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
    bw_outb(0x80, 0x42);
    return 0;
}
