/* blkbench — O_DIRECT block-device benchmark for bench/virtio, built static so the same binary
 * runs on the rig's L1 (the host side) and in the guest (on /dev/vda). No fio in busybox.
 *
 *   blkbench write DEV MIB          sequential 1 MiB writes from offset 0, then fdatasync
 *   blkbench read DEV MIB           sequential 1 MiB reads from offset 0
 *   blkbench randread DEV SECS QD   4 KiB reads at random 4 KiB-aligned offsets over the whole
 *                                   device for SECS seconds; QD 1 is a pread loop, QD > 1 keeps
 *                                   QD reads in flight with Linux native AIO (io_submit and
 *                                   io_getevents as raw syscalls: no libaio needed)
 *
 * Every buffer is 2 MiB-aligned (see aligned()), every offset and length a multiple of 4 KiB. Times come from
 * CLOCK_MONOTONIC. One result line on stdout, KEY=VALUE fields:
 *   blkbench op=read bytes=N ns=N mib_s=X buf_thp_kib=N   (huge-page backing of the buffer)
 *   blkbench op=randread qd=N ios=N ns=N iops=X mean_us=X
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)
#define BLK 4096u
#define MAX_QD 256

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "blkbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Buffers sit inside one 2 MiB-aligned transparent huge page where the kernel has THP, so a
 * 1 MiB transfer is physically contiguous: with scattered 4 KiB pages it would need 256
 * segments, and a guest driver limited to fewer (virtio-blk seg_max) splits it in two requests,
 * which varies from boot to boot. */
static void *aligned(size_t n) {
    size_t huge = 2u * MIB, len = (n + huge - 1) / huge * huge + huge;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("mmap");
    p = (char *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(p, len - huge, MADV_HUGEPAGE); /* best effort; whole huge pages, or none fits */
    memset(p, 0, n);
    return p;
}

static int open_dev(const char *path, int flags) {
    int fd = open(path, flags | O_DIRECT);
    if (fd < 0) die(path);
    return fd;
}

static uint64_t dev_size(int fd) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) == 0) return size;
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    return (uint64_t)st.st_size;
}

/* KiB of the mapping around p that transparent huge pages back (AnonHugePages in smaps). */
static unsigned long thp_kib(const void *p) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[256];
    int inside = 0;
    unsigned long kib = 0, lo, hi;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) inside = lo <= (uintptr_t)p && (uintptr_t)p < hi;
        else if (inside && sscanf(line, "AnonHugePages: %lu kB", &kib) == 1) break;
    }
    fclose(f);
    return inside ? kib : 0;
}

static void sequential(const char *path, int write, uint64_t mib) {
    int fd = open_dev(path, write ? O_WRONLY : O_RDONLY);
    char *buf = aligned(MIB);
    memset(buf, 0xa5, MIB); /* not zero: no side can shortcut a zero page */
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < mib; i++) {
        ssize_t n = write ? pwrite(fd, buf, MIB, (off_t)(i * MIB)) : pread(fd, buf, MIB, (off_t)(i * MIB));
        if (n != (ssize_t)MIB) {
            if (n >= 0) errno = EIO;
            die(write ? "pwrite" : "pread");
        }
    }
    if (write && fdatasync(fd) < 0) die("fdatasync");
    uint64_t ns = now_ns() - t0;
    printf("blkbench op=%s bytes=%llu ns=%llu mib_s=%.1f buf_thp_kib=%lu\n", write ? "write" : "read",
           (unsigned long long)(mib * MIB), (unsigned long long)ns, (double)mib / ((double)ns / 1e9), thp_kib(buf));
    close(fd);
}

/* xorshift64*: the same offsets on both sides of the comparison. */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_block(uint64_t blocks) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (rng * 0x2545f4914f6cdd1dull) % blocks;
}

static long io_setup(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long io_submit(aio_context_t ctx, long n, struct iocb **cbs) { return syscall(SYS_io_submit, ctx, n, cbs); }
static long io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev) {
    return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

static void randread(const char *path, double secs, int qd) {
    int fd = open_dev(path, O_RDONLY);
    uint64_t blocks = dev_size(fd) / BLK;
    if (blocks == 0) { errno = EINVAL; die("device size"); }
    char *bufs = aligned((size_t)qd * BLK);
    uint64_t ios = 0, t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), t;
    if (qd == 1) {
        do {
            for (int i = 0; i < 64; i++) {
                if (pread(fd, bufs, BLK, (off_t)(next_block(blocks) * BLK)) != (ssize_t)BLK) die("pread");
            }
            ios += 64;
        } while ((t = now_ns()) < end);
    } else {
        aio_context_t ctx = 0;
        static struct iocb cbs[MAX_QD];
        struct iocb *ptrs[MAX_QD];
        static struct io_event ev[MAX_QD];
        if (io_setup((unsigned)qd, &ctx) < 0) die("io_setup");
        for (int i = 0; i < qd; i++) {
            memset(&cbs[i], 0, sizeof cbs[i]);
            cbs[i].aio_fildes = (uint32_t)fd;
            cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
            cbs[i].aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)i * BLK);
            cbs[i].aio_nbytes = BLK;
            cbs[i].aio_offset = (int64_t)(next_block(blocks) * BLK);
            cbs[i].aio_data = (uint64_t)i;
            ptrs[i] = &cbs[i];
        }
        if (io_submit(ctx, qd, ptrs) != qd) die("io_submit");
        long inflight = qd;
        int stopping = 0;
        while (inflight > 0) {
            long n = io_getevents(ctx, 1, qd, ev);
            if (n < 0) {
                if (errno == EINTR) continue;
                die("io_getevents");
            }
            inflight -= n;
            long again = 0;
            for (long i = 0; i < n; i++) {
                if (ev[i].res != (int64_t)BLK) { errno = ev[i].res < 0 ? (int)-ev[i].res : EIO; die("aio read"); }
                ios++;
                if (!stopping) {
                    struct iocb *cb = &cbs[ev[i].data];
                    cb->aio_offset = (int64_t)(next_block(blocks) * BLK);
                    ptrs[again++] = cb;
                }
            }
            if (!stopping && now_ns() >= end) stopping = 1, again = 0;
            if (again > 0) {
                if (io_submit(ctx, again, ptrs) != again) die("io_submit");
                inflight += again;
            }
        }
        t = now_ns();
    }
    double s = (double)(t - t0) / 1e9;
    printf("blkbench op=randread qd=%d ios=%llu ns=%llu iops=%.0f mean_us=%.1f\n", qd,
           (unsigned long long)ios, (unsigned long long)(t - t0), (double)ios / s,
           s * 1e6 / (double)ios * qd);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc == 4 && (strcmp(argv[1], "write") == 0 || strcmp(argv[1], "read") == 0)) {
        sequential(argv[2], argv[1][0] == 'w', strtoull(argv[3], NULL, 10));
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "randread") == 0) {
        int qd = atoi(argv[4]);
        if (qd < 1 || qd > MAX_QD) { fprintf(stderr, "blkbench: QD must be 1..%d\n", MAX_QD); return 2; }
        randread(argv[2], atof(argv[3]), qd);
        return 0;
    }
    fprintf(stderr, "usage: blkbench write|read DEV MIB | randread DEV SECS QD\n");
    return 2;
}
