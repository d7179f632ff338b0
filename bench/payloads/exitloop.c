/* exitloop.c — exit-cost benchmark payload.
 *
 * Times EXITS port-I/O exits (`out %al, $0x80`, the POST-code port: a real device that only
 * records the value) with the clock host call before and after the loop, and prints
 *   exitloop exits=N ns=T
 * on the console. The same flat binary runs under bench/rawkvm, which implements the three host
 * calls used here (clock, write, exit) itself, so both sides time the identical guest code in
 * the identical way.
 */
#include <bulwark.h>

#ifndef EXITS
#define EXITS 100000
#endif

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    (void)vcpus;
    (void)info;
    if (vcpu != 0)
        for (;;)
            __asm__ volatile("pause");

    bw_u64 t0 = bw_clock_ns();
    bw_u32 n = EXITS;
    if (n)
        __asm__ volatile("1: outb %%al, $0x80\n\t"
                         "dec %0\n\t"
                         "jnz 1b"
                         : "+r"(n)
                         : "a"(0)
                         : "memory");
    bw_u64 t1 = bw_clock_ns();

    bw_puts("exitloop exits=");
    bw_putu(EXITS, 10);
    bw_puts(" ns=");
    bw_putu(t1 - t0, 10);
    bw_puts("\n");
    return 0;
}
