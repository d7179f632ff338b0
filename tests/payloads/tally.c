/* Keeps state across console lines, so a snapshot and restore can be checked from outside:
 * for each input line it prints "line N: TEXT" (upper-cased) with N counting from 1, and a
 * line "exit" ends the payload with status N (the number of lines before it). A line "clock"
 * prints the host-call clock in milliseconds. A line "fill" writes pseudo-random bytes over all
 * free memory (so a snapshot has no empty blocks to skip) and prints "filled"; a line "sum"
 * reads all of it and prints its FNV-1a hash (so a restore can be checked to have put every
 * byte back). The count lives in memory and registers; a restored VM continues it. */
#include <bulwark.h>

static char line[256];
static bw_u64 count;

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    bw_size len = 0;
    char c;
    for (;;) {
        bw_i64 n = bw_read(&c, 1);
        if (n <= 0)
            return 200;
        if (c != '\n') {
            if (len < sizeof line)
                line[len++] = c >= 'a' && c <= 'z' ? (char)(c - 32) : c;
            continue;
        }
        if (len == 4 && line[0] == 'E' && line[1] == 'X' && line[2] == 'I' && line[3] == 'T')
            return (int)count;
        if (len == 5 && line[0] == 'C' && line[1] == 'L' && line[2] == 'O' && line[3] == 'C' &&
            line[4] == 'K') {
            bw_puts("clock ");
            bw_putu(bw_clock_ns() / 1000000, 10);
            bw_puts(" ms\n");
            len = 0;
            continue;
        }
        if (len == 4 && line[0] == 'F' && line[1] == 'I' && line[2] == 'L' && line[3] == 'L') {
            bw_u64 x = 0x9e3779b97f4a7c15ull;
            for (bw_u64 *p = (bw_u64 *)info->heap_start; (bw_u64)(p + 1) <= info->heap_end; p++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *p = x;
            }
            bw_puts("filled\n");
            len = 0;
            continue;
        }
        if (len == 3 && line[0] == 'S' && line[1] == 'U' && line[2] == 'M') {
            bw_u64 h = 0xcbf29ce484222325ull;
            for (bw_u64 *p = (bw_u64 *)info->heap_start; (bw_u64)(p + 1) <= info->heap_end; p++) {
                h ^= *p;
                h *= 0x100000001b3ull;
            }
            bw_puts("sum ");
            bw_putu(h, 16);
            bw_puts("\n");
            len = 0;
            continue;
        }
        count++;
        bw_puts("line ");
        bw_putu(count, 10);
        bw_puts(": ");
        bw_write(1, line, len);
        bw_puts("\n");
        len = 0;
    }
}
