/* harness.c — process-level timing and memory measurements for bench/run.
 *
 *   harness start RUNS CMD [ARGS...]
 *       Runs CMD RUNS times, one after another, with stdout a pipe. For each run prints
 *         run=I first_byte_ns=T1 exit_ns=T2 maxrss_kib=K status=S
 *       where both times count from just before fork(): T1 when the first byte of stdout
 *       arrives, T2 when wait4() reaps the process. K is the child's ru_maxrss.
 *
 *   harness wall CMD [ARGS...]
 *       Runs CMD once with stdout a pipe; prints its stdout, then
 *         wall_ns=T status=S
 *
 *   harness mem CMD [ARGS...]
 *       Runs CMD with stdin and stdout pipes. When a stdout line starting with "ready" arrives
 *       (the payload has touched its memory and is blocked reading the console), reads
 *       /proc/PID/status and /proc/PID/smaps, then closes stdin so the payload exits, and prints
 *         vmhwm_kib= vmrss_kib= rssanon_kib= rssfile_kib= rssshmem_kib= guestram_rss_kib=
 *         maxrss_kib= jail_outer_rss_kib= status= ready=
 *       guestram_rss_kib is the Rss of the guest-RAM memfd mapping in smaps. PID is the monitor:
 *       for a jailed `bulwark run` the only child of the process started, whose own VmRSS (the
 *       jail's outer process, which only waits) is jail_outer_rss_kib (0 without a jail).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static unsigned long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "harness: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Forks CMD with stdout to a new pipe (and stdin from one if `in` is non-NULL). */
static pid_t spawn(char **cmd, int *out, int *in)
{
    int o[2], i[2] = {-1, -1};
    if (pipe2(o, O_CLOEXEC) < 0)
        die("pipe");
    if (in && pipe2(i, O_CLOEXEC) < 0)
        die("pipe");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        dup2(o[1], 1);
        if (in)
            dup2(i[0], 0);
        execvp(cmd[0], cmd);
        _exit(127);
    }
    close(o[1]);
    *out = o[0];
    if (in) {
        close(i[0]);
        *in = i[1];
    }
    return pid;
}

static int status_code(int st)
{
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int cmd_start(int runs, char **cmd)
{
    for (int r = 0; r < runs; r++) {
        int out;
        unsigned long long t0 = now_ns(), t1 = 0;
        pid_t pid = spawn(cmd, &out, NULL);
        char buf[4096];
        ssize_t n;
        while ((n = read(out, buf, sizeof buf)) != 0) {
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                die("read");
            }
            if (!t1)
                t1 = now_ns();
        }
        close(out);
        int st;
        struct rusage ru;
        if (wait4(pid, &st, 0, &ru) < 0)
            die("wait4");
        unsigned long long t2 = now_ns();
        printf("run=%d first_byte_ns=%llu exit_ns=%llu maxrss_kib=%ld status=%d\n", r,
               t1 ? t1 - t0 : 0, t2 - t0, ru.ru_maxrss, status_code(st));
        fflush(stdout);
    }
    return 0;
}

static int cmd_wall(char **cmd)
{
    int out;
    unsigned long long t0 = now_ns();
    pid_t pid = spawn(cmd, &out, NULL);
    char buf[4096];
    ssize_t n;
    while ((n = read(out, buf, sizeof buf)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        fwrite(buf, 1, (size_t)n, stdout);
    }
    int st;
    if (waitpid(pid, &st, 0) < 0)
        die("waitpid");
    printf("wall_ns=%llu status=%d\n", now_ns() - t0, status_code(st));
    return 0;
}

/* Value in kB of the `key:` line of /proc/PID/status, or -1. */
static long status_field(const char *status, const char *key)
{
    const char *p = strstr(status, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

static long guest_ram_rss(pid_t pid)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/smaps", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        die(path);
    long rss = -1;
    int in_ram = 0;
    while (fgets(line, sizeof line, f)) {
        /* A mapping's header line has an address range ("lo-hi") as its first field; the
         * field lines that follow ("Rss:   12 kB") have none. */
        char *space = strchr(line, ' ');
        char *dash = strchr(line, '-');
        if (space && dash && dash < space) {
            in_ram = strstr(line, "memfd:bulwark-guest-ram") != NULL;
            continue;
        }
        if (in_ram && strncmp(line, "Rss:", 4) == 0)
            rss = (rss < 0 ? 0 : rss) + strtol(line + 4, NULL, 10);
    }
    fclose(f);
    return rss;
}

/* The monitor of a jailed `bulwark run`: the only child of the process started (the jail's
 * outer process waits for it); the process itself when it has no child (--no-jail). */
static pid_t monitor_of(pid_t pid)
{
    char path[96], text[256];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return pid;
    size_t len = fread(text, 1, sizeof text - 1, f);
    text[len] = 0;
    fclose(f);
    long child = strtol(text, NULL, 10);
    return child > 0 ? (pid_t)child : pid;
}

/* Reads /proc/PID/status into `status` (size `cap`); 0 on success, -1 if it is gone. */
static int read_status(pid_t pid, char *status, size_t cap)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t len = fread(status, 1, cap - 1, f);
    status[len] = 0;
    fclose(f);
    return 0;
}

static int cmd_mem(char **cmd)
{
    int out, in;
    signal(SIGPIPE, SIG_IGN);
    pid_t pid = spawn(cmd, &out, &in);
    char buf[4096];
    size_t have = 0;
    int ready = 0;
    long hwm = -1, rss = -1, anon = -1, file = -1, shmem = -1, ram = -1, outer = 0;
    for (;;) {
        ssize_t n = read(out, buf + have, sizeof buf - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = 0;
        if (!ready && strstr(buf, "ready") && strchr(strstr(buf, "ready"), '\n')) {
            ready = 1;
            pid_t mon = monitor_of(pid);
            char status[8192];
            if (mon != pid && read_status(pid, status, sizeof status) == 0)
                outer = status_field(status, "VmRSS:");
            if (read_status(mon, status, sizeof status) != 0)
                die("/proc/PID/status of the monitor");
            hwm = status_field(status, "VmHWM:");
            rss = status_field(status, "VmRSS:");
            anon = status_field(status, "RssAnon:");
            file = status_field(status, "RssFile:");
            shmem = status_field(status, "RssShmem:");
            ram = guest_ram_rss(mon);
            close(in);
        }
        if (have > sizeof buf / 2)
            have = 0;
    }
    if (!ready)
        close(in);
    int st;
    struct rusage ru;
    if (wait4(pid, &st, 0, &ru) < 0)
        die("wait4");
    printf("vmhwm_kib=%ld vmrss_kib=%ld rssanon_kib=%ld rssfile_kib=%ld rssshmem_kib=%ld "
           "guestram_rss_kib=%ld maxrss_kib=%ld jail_outer_rss_kib=%ld status=%d ready=%d\n",
           hwm, rss, anon, file, shmem, ram, ru.ru_maxrss, outer, status_code(st), ready);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "start") == 0)
        return cmd_start(atoi(argv[2]), argv + 3);
    if (argc >= 3 && strcmp(argv[1], "wall") == 0)
        return cmd_wall(argv + 2);
    if (argc >= 3 && strcmp(argv[1], "mem") == 0)
        return cmd_mem(argv + 2);
    fprintf(stderr, "usage: harness start RUNS CMD... | wall CMD... | mem CMD...\n");
    return 2;
}
