/* Block I/O round trip: a function micro-VM that drives virtio-blk drive 0
 * (bulwark run --payload ... --drive FILE) and writes, flushes and reads back a pattern.
 *
 * Console input: 40 bytes — a 32-byte secret, then u32 LE `rounds`, then u32 LE `blocks`.
 * Each request moves 64 KiB (128 sectors); the disk area used is blocks * 64 KiB from sector 0.
 * In round r the u64 at disk byte offset o is mix(o / 8 + (r << 40)) (the splitmix64
 * finalizer). Every round writes all blocks (a FLUSH after every 8 writes and after the last),
 * then reads every block back and checks it word by word.
 *
 * The secret lives in the same 4 KiB page as the request header and the status byte, but is
 * never part of a descriptor: a device that touches more than the buffers it was given could
 * leak it. The host test scans memory for it while the payload waits at the end.
 *
 * Output: "blk_io: running", then one line
 *   blk_io: ok rounds=R blocks=B bytes=N write_ns=W read_ns=D requests=Q sum=HEX
 * (write_ns / read_ns: time spent in the OUT+FLUSH / IN requests), then "blk_io: waiting";
 * then it waits for one more input byte (or end of input) and exits 0.
 *
 * Exit status: 1 data mismatch, 2 status byte not OK, 3 the device did not return the chain
 * (or returned it wrong), 4 no working virtio-blk device, 5 input ended before 40 bytes. */
#include "bulwark.h"

#define DEV 0xd0001000ull
#define QSIZE 16
#include "virtio_mmio.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

#define BLOCK_BYTES (64u * 1024u)
#define BLOCK_SECTORS (BLOCK_BYTES / 512u)
#define BLOCK_WORDS (BLOCK_BYTES / 8u)
#define FLUSH_EVERY 8u


/* The request page: header and status byte are handed to the device; the secret, in the same
 * page, never is. Identity-mapped, so these addresses are guest-physical. */
struct io_page {
    struct { bw_u32 type, reserved; bw_u64 sector; } hdr; /* 16 bytes, offset 0 */
    bw_u8 status;                                         /* offset 16 */
    bw_u8 pad[15];
    bw_u8 secret[32];                                     /* offset 32 */
};

static struct ring ring __attribute__((aligned(4096)));
static volatile struct io_page io __attribute__((aligned(4096)));
static bw_u64 data[BLOCK_WORDS] __attribute__((aligned(4096)));
static bw_u8 params[8];
static bw_u16 next_avail;

_Static_assert(sizeof(struct io_page) <= 4096, "request page fits one page");
_Static_assert(sizeof io.hdr == 16, "virtio-blk request header is 16 bytes");

static bw_u32 rd(bw_u32 off) { return bw_mmio_read32(DEV + off); }
static void wr(bw_u32 off, bw_u32 v) { bw_mmio_write32(DEV + off, v); }

static bw_u64 mix(bw_u64 x)
{
    bw_u64 z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static __attribute__((noreturn)) void fail(const char *what, bw_u32 round, bw_u32 block, int code)
{
    bw_puts("blk_io: FAILED ");
    bw_puts(what);
    bw_puts(" round=");
    bw_putu(round, 10);
    bw_puts(" block=");
    bw_putu(block, 10);
    bw_puts("\n");
    bw_exit(code);
}

/* bw_read blocks until at least one byte is there, may return fewer bytes than asked, and
 * returns 0 at end of input (negative: an error). Loops until `len` bytes or end of input;
 * returns the bytes read. */
static bw_size read_exact(void *buf, bw_size len)
{
    bw_size got = 0;
    while (got < len) {
        bw_i64 n = bw_read((bw_u8 *)buf + got, len - got);
        if (n <= 0)
            break;
        got += (bw_size)n;
    }
    return got;
}

/* Brings drive 0 up with one 16-entry queue, offering only VIRTIO_F_VERSION_1. */
static bw_u32 bring_up(void)
{
    for (bw_size i = 0; i < sizeof ring; i++)
        ((volatile bw_u8 *)&ring)[i] = 0;
    next_avail = 0;
    wr(R_STATUS, 0);
    wr(R_STATUS, S_ACK);
    wr(R_STATUS, S_ACK | S_DRIVER);
    wr(R_DRV_FEATURES_SEL, 1);
    wr(R_DRV_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
    wr(R_DRV_FEATURES_SEL, 0);
    wr(R_DRV_FEATURES, 1u << 9); /* VIRTIO_BLK_F_FLUSH: this driver sends flushes */
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    wr(R_QUEUE_SEL, 0);
    wr(R_QUEUE_NUM, QSIZE);
    wr(R_DESC_LO, (bw_u32)(bw_u64)&ring.desc);
    wr(R_DESC_HI, 0);
    wr(R_AVAIL_LO, (bw_u32)(bw_u64)&ring.avail_flags);
    wr(R_AVAIL_HI, 0);
    wr(R_USED_LO, (bw_u32)(bw_u64)&ring.used_flags);
    wr(R_USED_HI, 0);
    wr(R_QUEUE_READY, 1);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return rd(R_STATUS);
}

static void set_desc(int i, bw_u64 addr, bw_u32 len, bw_u16 flags, bw_u16 next)
{
    volatile struct desc *x = &ring.desc[i];
    x->addr = addr;
    x->len = len;
    x->flags = flags;
    x->next = next;
}

/* One request: descriptor 0 the header (readable), then for IN/OUT descriptor 1 the 64 KiB
 * data buffer (writable for IN, readable for OUT), then the status byte (writable). The device
 * serves the queue during the notify write, so the used ring is up to date right after it.
 * Returns the time the request took, in ns; fails (exit 3 / 2) if the chain did not come back
 * or its status is not OK. */
static bw_u64 request(bw_u32 type, bw_u64 sector, bw_u32 round, bw_u32 block)
{
    volatile struct ring *r = &ring;
    io.hdr.type = type;
    io.hdr.reserved = 0;
    io.hdr.sector = sector;
    io.status = 0xff;
    set_desc(0, (bw_u64)&io.hdr, sizeof io.hdr, F_NEXT, 1);
    if (type == T_FLUSH) {
        set_desc(1, (bw_u64)&io.status, 1, F_WRITE, 0);
    } else {
        set_desc(1, (bw_u64)data, BLOCK_BYTES, F_NEXT | (type == T_IN ? F_WRITE : 0), 2);
        set_desc(2, (bw_u64)&io.status, 1, F_WRITE, 0);
    }
    bw_u16 before = r->used_idx;
    r->avail_ring[next_avail % QSIZE] = 0;
    next_avail++;
    __asm__ volatile("" ::: "memory");
    r->avail_idx = next_avail;
    __asm__ volatile("" ::: "memory");
    bw_u64 t0 = bw_clock_ns();
    wr(R_NOTIFY, 0);
    bw_u64 t1 = bw_clock_ns();
    __asm__ volatile("" ::: "memory");
    if (r->used_idx != (bw_u16)(before + 1) || r->used_ring[before % QSIZE].id != 0)
        fail("device did not return the chain", round, block, 3);
    if (io.status != 0)
        fail("bad status", round, block, 2);
    if (type == T_IN && r->used_ring[before % QSIZE].len != BLOCK_BYTES + 1)
        fail("short used length", round, block, 3);
    return t1 - t0;
}

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    (void)vcpus;
    (void)info;
    if (vcpu != 0)
        for (;;) /* one driver only; extra vCPUs idle */
            __asm__ volatile("pause");

    /* 1. The secret goes straight into its page (no other copy), then the two counts. */
    if (read_exact((void *)io.secret, sizeof io.secret) != sizeof io.secret ||
        read_exact(params, sizeof params) != sizeof params) {
        bw_puts("blk_io: FAILED input ended before 40 bytes\n");
        bw_exit(5);
    }
    bw_u32 rounds = (bw_u32)params[0] | (bw_u32)params[1] << 8 | (bw_u32)params[2] << 16 |
                    (bw_u32)params[3] << 24;
    bw_u32 blocks = (bw_u32)params[4] | (bw_u32)params[5] << 8 | (bw_u32)params[6] << 16 |
                    (bw_u32)params[7] << 24;

    if (rd(R_MAGIC) != 0x74726976 || rd(R_DEVICE_ID) != 2) {
        bw_puts("blk_io: FAILED no virtio-blk device at 0xd0001000\n");
        bw_exit(4);
    }
    bw_u32 st = bring_up();
    if (!(st & S_DRIVER_OK) || (st & S_NEEDS_RESET)) {
        bw_puts("blk_io: FAILED virtio-blk device did not start\n");
        bw_exit(4);
    }

    bw_puts("blk_io: running\n");

    bw_u64 write_ns = 0, read_ns = 0, requests = 0, bytes = 0;
    for (bw_u32 r = 0; r < rounds; r++) {
        bw_u64 salt = (bw_u64)r << 40;
        for (bw_u32 b = 0; b < blocks; b++) {
            bw_u64 base = (bw_u64)b * BLOCK_WORDS + salt;
            for (bw_u32 i = 0; i < BLOCK_WORDS; i++)
                data[i] = mix(base + i);
            write_ns += request(T_OUT, (bw_u64)b * BLOCK_SECTORS, r, b);
            requests++;
            bytes += BLOCK_BYTES;
            if ((b + 1) % FLUSH_EVERY == 0 || b + 1 == blocks) {
                write_ns += request(T_FLUSH, 0, r, b);
                requests++;
            }
        }
        for (bw_u32 b = 0; b < blocks; b++) {
            /* Poison first, so a read that moves no data cannot pass (volatile: no memset). */
            for (bw_u32 i = 0; i < BLOCK_WORDS; i++)
                ((volatile bw_u64 *)data)[i] = 0x5a5a5a5a5a5a5a5aull ^ i;
            read_ns += request(T_IN, (bw_u64)b * BLOCK_SECTORS, r, b);
            requests++;
            bw_u64 base = (bw_u64)b * BLOCK_WORDS + salt;
            for (bw_u32 i = 0; i < BLOCK_WORDS; i++)
                if (((volatile bw_u64 *)data)[i] != mix(base + i))
                    fail("mismatch", r, b, 1);
        }
    }

    /* Keep the secret alive: fold it into a checksum (FNV-1a, then mixed); never print it. */
    bw_u64 sum = 0xcbf29ce484222325ull;
    for (int i = 0; i < 32; i++)
        sum = (sum ^ io.secret[i]) * 0x100000001b3ull;
    sum = mix(sum);

    bw_puts("blk_io: ok rounds=");
    bw_putu(rounds, 10);
    bw_puts(" blocks=");
    bw_putu(blocks, 10);
    bw_puts(" bytes=");
    bw_putu(bytes, 10);
    bw_puts(" write_ns=");
    bw_putu(write_ns, 10);
    bw_puts(" read_ns=");
    bw_putu(read_ns, 10);
    bw_puts(" requests=");
    bw_putu(requests, 10);
    bw_puts(" sum=");
    bw_putu(sum, 16);
    bw_puts("\n");

    /* 7. Wait for one more byte (the host scans memory meanwhile); end of input also ends it. */
    bw_puts("blk_io: waiting\n");
    bw_u8 last;
    (void)read_exact(&last, 1);
    bw_exit(0);
}
