/* hostcall.c — host-call cost benchmark payload.
 *
 * Times CALLS clock host calls (call 3: `out %eax, $0xb0`, answered in rax) back to back and
 * prints "hostcall calls=N ns=T". A host call is a port-I/O exit plus the monitor reading and
 * writing the vCPU's registers; compare with exitloop.c's plain exit.
 */
#include <bulwark.h>

#define CALLS 10000

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    (void)vcpus;
    (void)info;
    if (vcpu != 0)
        for (;;)
            __asm__ volatile("pause");

    bw_u64 t0 = bw_clock_ns(), t1 = t0;
    for (int i = 0; i < CALLS; i++)
        t1 = bw_clock_ns();

    bw_puts("hostcall calls=");
    bw_putu(CALLS, 10);
    bw_puts(" ns=");
    bw_putu(t1 - t0, 10);
    bw_puts("\n");
    return 0;
}
