/* Copies console input to the console in upper case until end of input; exits with the
 * number of bytes read, modulo 256. */
#include <bulwark.h>

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    char buf[100]; /* smaller than typical input, so reads are partial */
    bw_u64 total = 0;
    for (;;) {
        bw_i64 n = bw_read(buf, sizeof buf);
        if (n < 0)
            return 200;
        if (n == 0)
            break;
        for (bw_i64 i = 0; i < n; i++)
            if (buf[i] >= 'a' && buf[i] <= 'z')
                buf[i] -= 32;
        bw_write(1, buf, (bw_size)n);
        total += (bw_u64)n;
    }
    return (int)(total % 256);
}
