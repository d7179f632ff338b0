/* bench/trbench.c — the guest side of bench/vmi-trace: times N repetitions of one operation
 * inside the guest and prints "mode=M n=N ns_per_op=X".
 *   pio N      outb to port 0x80 (the monitor's post-code latch): each one exits to the monitor
 *   getppid N  the getppid system call (what a breakpoint on __x64_sys_getppid stops)
 *   exec N     fork, execve /bin/true, wait (what a breakpoint on bprm_execve stops)
 * Static, no dependencies beyond libc; needs root for ioperm (the agent runs as root). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: trbench pio|getppid|exec N\n");
        return 2;
    }
    const char *mode = argv[1];
    long n = atol(argv[2]);
    if (n <= 0) {
        fprintf(stderr, "trbench: N must be positive\n");
        return 2;
    }
    if (strcmp(mode, "pio") == 0 && ioperm(0x80, 1, 1) != 0) {
        perror("trbench: ioperm");
        return 1;
    }
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (strcmp(mode, "pio") == 0) {
            outb((unsigned char)i, 0x80);
        } else if (strcmp(mode, "getppid") == 0) {
            syscall(SYS_getppid);
        } else if (strcmp(mode, "exec") == 0) {
            pid_t p = fork();
            if (p == 0) {
                execl("/bin/true", "true", (char *)NULL);
                _exit(127);
            }
            int st;
            if (p < 0 || waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "trbench: exec of /bin/true failed\n");
                return 1;
            }
        } else {
            fprintf(stderr, "trbench: unknown mode %s\n", mode);
            return 2;
        }
    }
    long long t1 = now_ns();
    printf("mode=%s n=%ld ns_per_op=%lld\n", mode, n, (t1 - t0) / n);
    return 0;
}
