/* touchmem.c — memory-overhead benchmark payload.
 *
 * Writes TOUCH_MIB MiB of its heap (every byte, so every page is faulted in), prints
 * "ready touched=BYTES\n", then blocks reading the console until end of input and exits. The
 * harness reads /proc/PID/{status,smaps} while the payload is blocked, then closes stdin.
 * The argument string selects the amount in MiB ("0" touches nothing).
 */
#include <bulwark.h>

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    (void)vcpus;
    if (vcpu != 0)
        for (;;)
            __asm__ volatile("pause");

    bw_u64 mib = 0;
    for (const char *p = info->arg; *p >= '0' && *p <= '9'; p++)
        mib = mib * 10 + (bw_u64)(*p - '0');
    bw_u64 len = mib << 20;
    if (len > info->heap_end - info->heap_start) {
        bw_puts("touchmem: heap too small\n");
        return 1;
    }
    volatile bw_u64 *heap = (volatile bw_u64 *)info->heap_start;
    for (bw_u64 i = 0; i < len / 8; i++)
        heap[i] = i;

    bw_puts("ready touched=");
    bw_putu(len, 10);
    bw_puts("\n");
    char c;
    while (bw_read(&c, 1) > 0)
        ;
    return 0;
}
