/* hello.c — the example function micro-VM.
 *
 * Build and run:
 *   bulwark payload build examples/payloads/hello.c -o hello.elf
 *   bulwark run --payload hello.elf --arg "world"
 *
 * It greets the argument, shows what the monitor told it about its VM, asks the host for the
 * time and for random bytes, and exits with status 0.
 */
#include <bulwark.h>

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    if (vcpu != 0) /* this example does its work on vCPU 0 only */
        for (;;)
            __asm__ volatile("pause");

    bw_u64 t0 = bw_clock_ns();
    bw_puts("hello, ");
    bw_puts(info->arg_len ? info->arg : "world");
    bw_puts(", from a bulwark function micro-VM\n");

    bw_puts("  vCPUs: ");
    bw_putu(vcpus, 10);
    bw_puts(", memory: ");
    bw_putu(info->mem_size >> 20, 10);
    bw_puts(" MiB, free heap: ");
    bw_putu((info->heap_end - info->heap_start) >> 10, 10);
    bw_puts(" KiB\n");

    bw_u8 rnd[8];
    bw_random(rnd, sizeof rnd);
    bw_puts("  8 random bytes from the host: ");
    for (unsigned i = 0; i < sizeof rnd; i++) {
        if (rnd[i] < 16)
            bw_puts("0");
        bw_putu(rnd[i], 16);
    }
    bw_puts("\n  platform device magic: 0x");
    bw_putu(bw_mmio_read32(info->mmio_base), 16);
    bw_puts("\n  this took ");
    bw_putu((bw_clock_ns() - t0) / 1000, 10);
    bw_puts(" us of guest time\n");
    return 0;
}
