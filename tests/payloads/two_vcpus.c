/* Two vCPUs at once: vCPU 1 counts without end; vCPU 0 watches the counter move while it
 * never yields itself, which is only possible if both run at the same time. */
#include <bulwark.h>

static volatile bw_u64 counter;
static volatile int started;

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    if (vcpus != 2)
        return 10;
    if (vcpu == 1) {
        started = 1;
        for (;;)
            counter++;
    }
    bw_u64 deadline = bw_clock_ns() + 5000000000ull;
    while (!started)
        if (bw_clock_ns() > deadline)
            return 11;
    bw_u64 c1 = counter;
    for (volatile bw_u64 i = 0; i < 20000000; i++)
        ;
    bw_u64 c2 = counter;
    if (c2 <= c1)
        return 12;
    bw_puts("vcpu 1 counted ");
    bw_putu(c2 - c1, 10);
    bw_puts(" while vcpu 0 ran\n");
    return 0;
}
