/* Exits with the status given as the argument (decimal); writes "bye" to stderr first. */
#include <bulwark.h>

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    int v = 0;
    for (const char *p = info->arg; *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (*p - '0');
    bw_write(2, "bye\n", 4);
    return v;
}
