/* vsock test tool, built static. In the guest (added to a test image with `--add`):
 *   vsock_echo serve PORT           accept one connection on vsock PORT and echo it back
 *   vsock_echo connect PORT         connect to the host (CID 2) PORT, send stdin, half-close,
 *                                   and copy everything received to stdout
 * On the host, the other end of bulwark's unix-socket convention:
 *   vsock_echo uds-serve PATH       accept one connection on unix socket PATH and echo it
 *   vsock_echo uds-connect PATH PORT  connect to PATH, write "CONNECT PORT\n", print the
 *                                   answer line to stderr, then send stdin, half-close, and
 *                                   copy everything received to stdout
 * TCP, with 64 KiB reads and writes (busybox nc moves 1 KiB per system call, which under the
 * nested rig's emulation makes a 100 MiB stream take minutes):
 *   vsock_echo tcp-serve PORT       accept one connection on TCP PORT, copy it to stdout
 *   vsock_echo tcp-connect ADDR PORT  connect, send stdin, half-close, and copy everything
 *                                   received to stdout until the peer closes (so when it
 *                                   returns, the peer has read all of it)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int pump(int from, int to) {
    static char buf[65536];
    for (;;) {
        ssize_t n = read(from, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        if (write_all(to, buf, (size_t)n) < 0) return -1;
    }
}

static int uds(const char *path, int serve) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); exit(1); }
    if (!serve) {
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
        return s;
    }
    unlink(path);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) { perror("bind"); exit(1); }
    return s;
}

/* Sends stdin from a child while the parent receives: an echo of more data than the path
 * buffers would otherwise stop with both ends blocked in write. */
static int send_and_receive(int s) {
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 1; }
    if (child == 0) {
        if (pump(0, s) < 0) { perror("send"); _exit(1); }
        shutdown(s, SHUT_WR);
        _exit(0);
    }
    int rc = pump(s, 1) < 0;
    if (rc) perror("receive");
    int st = 0;
    waitpid(child, &st, 0);
    return rc || !WIFEXITED(st) || WEXITSTATUS(st) != 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "uds-serve") == 0) {
        int s = uds(argv[2], 1);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        return pump(c, c) < 0;
    }
    if (argc == 4 && strcmp(argv[1], "uds-connect") == 0) {
        int s = uds(argv[2], 0);
        char line[64];
        int n = snprintf(line, sizeof line, "CONNECT %s\n", argv[3]);
        if (write_all(s, line, (size_t)n) < 0) { perror("write"); return 1; }
        /* The answer line, byte by byte so no data after it is consumed. */
        size_t len = 0;
        char c;
        while (len + 1 < sizeof line && read(s, &c, 1) == 1) {
            line[len++] = c;
            if (c == '\n') break;
        }
        line[len] = 0;
        fprintf(stderr, "answer: %s", len ? line : "(closed)\n");
        if (len < 3 || strncmp(line, "OK ", 3) != 0) return 1;
        return send_and_receive(s);
    }
    if (argc == 3 && strcmp(argv[1], "tcp-serve") == 0) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
        int one = 1;
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) { perror("bind"); return 1; }
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        int rc = pump(c, 1);
        close(c);
        return rc < 0;
    }
    if (argc == 4 && strcmp(argv[1], "tcp-connect") == 0) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3]))};
        if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", argv[2]); return 2; }
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 1; }
        return send_and_receive(s);
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s serve|connect PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = (unsigned)atoi(argv[2])};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    if (strcmp(argv[1], "serve") == 0) {
        addr.svm_cid = VMADDR_CID_ANY;
        if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
        if (listen(s, 1) < 0) { perror("listen"); return 1; }
        printf("listening\n");
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        int rc = pump(c, c);
        close(c);
        return rc < 0;
    }
    addr.svm_cid = VMADDR_CID_HOST;
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 1; }
    return send_and_receive(s);
}
