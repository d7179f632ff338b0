/* memscan PID NEEDLE...: searches the whole readable address space of process PID
 * (/proc/PID/maps, /proc/PID/mem; needs root) for each NEEDLE string and prints one line
 *   memscan PID comm=COMM regions=N bytes=B needle=NEEDLE found|absent
 * per needle, plus "guest-ram=yes|no" (whether PID maps bulwark's guest-RAM memfd). Used by the
 * back-end tests in the nested rig, whose L1 has no other tool for it. Exit 0 unless the
 * process cannot be read at all. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1 << 20)

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: memscan PID NEEDLE...\n");
        return 2;
    }
    const char *pid = argv[1];
    int n = argc - 2;
    int *found = calloc((size_t)n, sizeof *found);
    char path[64], comm[64] = "?";
    snprintf(path, sizeof path, "/proc/%s/comm", pid);
    FILE *c = fopen(path, "r");
    if (c) {
        if (fgets(comm, sizeof comm, c))
            comm[strcspn(comm, "\n")] = 0;
        fclose(c);
    }
    snprintf(path, sizeof path, "/proc/%s/maps", pid);
    FILE *maps = fopen(path, "r");
    snprintf(path, sizeof path, "/proc/%s/mem", pid);
    int mem = open(path, O_RDONLY);
    if (!maps || mem < 0 || !found) {
        perror(path);
        return 1;
    }
    size_t maxlen = 0;
    for (int i = 0; i < n; i++)
        if (strlen(argv[i + 2]) > maxlen)
            maxlen = strlen(argv[i + 2]);
    char *buf = malloc(CHUNK + maxlen);
    char line[512];
    long regions = 0;
    unsigned long long bytes = 0;
    int guest_ram = 0;
    while (fgets(line, sizeof line, maps)) {
        unsigned long long a, b;
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s", &a, &b, perms) != 3 || perms[0] != 'r')
            continue;
        if (strstr(line, "bulwark-guest-ram"))
            guest_ram = 1;
        if (strstr(line, "[vvar]") || strstr(line, "[vsyscall]"))
            continue;
        regions++;
        for (unsigned long long at = a; at < b;) {
            size_t want = b - at < CHUNK ? (size_t)(b - at) : CHUNK;
            ssize_t got = pread(mem, buf, want, (off_t)at);
            if (got <= 0)
                break;
            bytes += (unsigned long long)got;
            for (int i = 0; i < n; i++)
                if (!found[i] && memmem(buf, (size_t)got, argv[i + 2], strlen(argv[i + 2])))
                    found[i] = 1;
            /* Step back by the longest needle so a match across two reads is seen. */
            if ((size_t)got <= maxlen || at + (unsigned long long)got >= b)
                break;
            at += (unsigned long long)got - maxlen;
        }
    }
    for (int i = 0; i < n; i++)
        printf("memscan %s comm=%s regions=%ld bytes=%llu guest-ram=%s needle=%s %s\n", pid, comm,
               regions, bytes, guest_ram ? "yes" : "no", argv[i + 2],
               found[i] ? "found" : "absent");
    return 0;
}
