/* Checks the clock and random host calls; prints the first random draw in hex. */
#include <bulwark.h>

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    bw_u64 t1 = bw_clock_ns();
    for (volatile int i = 0; i < 1000000; i++)
        ;
    bw_u64 t2 = bw_clock_ns();
    if (t2 <= t1)
        return 1;
    bw_puts("clock ok ");
    bw_putu(t2 - t1, 10);
    bw_puts(" ns\n");

    bw_u8 a[32], b[32];
    if (bw_random(a, sizeof a) != sizeof a || bw_random(b, sizeof b) != sizeof b)
        return 2;
    int same = 0, zero = 0;
    for (int i = 0; i < 32; i++) {
        same += a[i] == b[i];
        zero += a[i] == 0;
    }
    if (same == 32 || zero == 32)
        return 3;
    bw_puts("random ");
    for (int i = 0; i < 32; i++) {
        if (a[i] < 16)
            bw_puts("0");
        bw_putu(a[i], 16);
    }
    bw_puts("\n");
    return 0;
}
