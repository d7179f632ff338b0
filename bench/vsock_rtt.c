/* vsock_rtt — round-trip latency for bench/virtio, built static (runs on the rig's L1 and in
 * the guest). The other end echoes (tests/guest/vsock_echo.c: `serve PORT` in the guest,
 * `uds-serve PATH` on the host).
 *
 *   vsock_rtt uds PATH N SIZE...          plain unix-socket connection to PATH (the baseline)
 *   vsock_rtt uds PATH:PORT N SIZE...     bulwark's host side: connect to the --vsock socket
 *                                         PATH, `CONNECT PORT`, expect `OK ...`; retried for up
 *                                         to 60 s while the guest is not yet listening
 *   vsock_rtt vsock PORT N SIZE...        from the guest to the host (CID 2) PORT
 *
 * For each SIZE: 10 warm-up round trips, then N timed ones (write SIZE bytes, read SIZE bytes
 * back), one line each on stdout:
 *   vsock_rtt size=S n=N mean_us=X median_us=X p99_us=X min_us=X
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define MAX_SIZE 65536

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "vsock_rtt: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int full(int fd, char *p, size_t n, int write_side) {
    while (n > 0) {
        ssize_t r = write_side ? write(fd, p, n) : read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int uds_connect(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        close(s);
        return -1;
    }
    return s;
}

/* bulwark's host-side convention; -1 if the guest does not accept (yet). */
static int bulwark_connect(const char *path, const char *port) {
    int s = uds_connect(path);
    if (s < 0) return -1;
    char line[64];
    int n = snprintf(line, sizeof line, "CONNECT %s\n", port);
    if (full(s, line, (size_t)n, 1) < 0) { close(s); return -1; }
    size_t len = 0;
    char c;
    while (len + 1 < sizeof line && read(s, &c, 1) == 1) {
        line[len++] = c;
        if (c == '\n') break;
    }
    line[len] = 0;
    if (len < 3 || strncmp(line, "OK ", 3) != 0) { close(s); return -1; }
    return s;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void pingpong(int s, int n, size_t size) {
    static char out[MAX_SIZE], in[MAX_SIZE];
    uint64_t *t = calloc((size_t)n, sizeof *t);
    if (!t) die("calloc");
    memset(out, 'p', size);
    for (int i = -10; i < n; i++) {
        uint64_t t0 = now_ns();
        if (full(s, out, size, 1) < 0) die("write");
        if (full(s, in, size, 0) < 0) die("read (did the echo end close?)");
        if (i >= 0) t[i] = now_ns() - t0;
    }
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) sum += t[i];
    qsort(t, (size_t)n, sizeof *t, cmp);
    double med = n % 2 ? (double)t[n / 2] : ((double)t[n / 2 - 1] + (double)t[n / 2]) / 2;
    printf("vsock_rtt size=%zu n=%d mean_us=%.1f median_us=%.1f p99_us=%.1f min_us=%.1f\n", size, n,
           (double)sum / n / 1e3, med / 1e3, (double)t[(size_t)((n - 1) * 0.99)] / 1e3, (double)t[0] / 1e3);
    fflush(stdout);
    free(t);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: vsock_rtt uds PATH[:PORT] N SIZE... | vsock PORT N SIZE...\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* a connection refused mid-handshake is retried, not fatal */
    int s = -1;
    if (strcmp(argv[1], "uds") == 0) {
        char *port = strrchr(argv[2], ':');
        if (port) *port++ = 0;
        for (int tries = 0; tries < 600 && s < 0; tries++) {
            s = port ? bulwark_connect(argv[2], port) : uds_connect(argv[2]);
            if (s < 0) usleep(100000);
        }
        if (s < 0) die(argv[2]);
    } else if (strcmp(argv[1], "vsock") == 0) {
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
                                .svm_port = (unsigned)atoi(argv[2])};
        s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    } else {
        fprintf(stderr, "vsock_rtt: unknown mode %s\n", argv[1]);
        return 2;
    }
    int n = atoi(argv[3]);
    if (n < 1) { fprintf(stderr, "vsock_rtt: N must be at least 1\n"); return 2; }
    for (int i = 4; i < argc; i++) {
        size_t size = (size_t)atoi(argv[i]);
        if (size < 1 || size > MAX_SIZE) { fprintf(stderr, "vsock_rtt: SIZE must be 1..%d\n", MAX_SIZE); return 2; }
        pingpong(s, n, size);
    }
    close(s);
    return 0;
}
