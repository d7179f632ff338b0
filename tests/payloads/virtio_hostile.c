/* A hostile virtio driver: a function micro-VM that drives two virtio-blk devices
 * (bulwark run --payload ... --drive A --drive B) and hands the first one every malformed
 * thing a guest can write: descriptor loops, chains longer than the queue, buffers outside
 * RAM or over MMIO, zero and huge lengths, wrong directions, notifications of queues that do
 * not exist, config-space writes at every offset and width, an avail index jump, and a reset
 * between offering a request and notifying it. Each must have its defined outcome, and the
 * device (after a reset) and the second device must still work. Exits 0 when every check
 * held, else the number of the first check that failed. */
#include "bulwark.h"

#define DEV(n) (0xd0001000ull + 0x1000ull * (n))
#define QSIZE 16
#include "virtio_mmio.h"

#define T_IN 0
#define T_OUT 1
#define ST_OK 0
#define ST_IOERR 1


/* One ring per device, page aligned; identity-mapped, so these addresses are guest-physical. */
static struct ring rings[2] __attribute__((aligned(4096)));
static struct { bw_u32 type, reserved; bw_u64 sector; } hdr __attribute__((aligned(16)));
static bw_u8 data[8192] __attribute__((aligned(4096)));
static volatile bw_u8 status_byte;
static bw_u16 next_avail[2];
static int check_no;
static bw_u32 last_used;

static void fail(const char *what)
{
    bw_puts("virtio_hostile: FAILED check ");
    bw_putu((bw_u64)check_no, 10);
    bw_puts(": ");
    bw_puts(what);
    bw_puts("\n");
    bw_exit(check_no);
}

static void check(int ok, const char *what)
{
    check_no++;
    if (!ok)
        fail(what);
}

static bw_u32 rd(int d, bw_u32 off) { return bw_mmio_read32(DEV(d) + off); }
static void wr(int d, bw_u32 off, bw_u32 v) { bw_mmio_write32(DEV(d) + off, v); }

/* Brings device d up with one 16-entry queue over rings[d]. Returns the final status. */
static bw_u32 bring_up(int d)
{
    struct ring *r = &rings[d];
    for (bw_size i = 0; i < sizeof *r; i++)
        ((volatile bw_u8 *)r)[i] = 0;
    next_avail[d] = 0;
    wr(d, R_STATUS, 0);
    wr(d, R_STATUS, S_ACK);
    wr(d, R_STATUS, S_ACK | S_DRIVER);
    wr(d, R_DRV_FEATURES_SEL, 1);
    wr(d, R_DRV_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
    wr(d, R_DRV_FEATURES_SEL, 0);
    wr(d, R_DRV_FEATURES, 0);
    wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    wr(d, R_QUEUE_SEL, 0);
    wr(d, R_QUEUE_NUM, QSIZE);
    wr(d, R_DESC_LO, (bw_u32)(bw_u64)&r->desc);
    wr(d, R_DESC_HI, 0);
    wr(d, R_AVAIL_LO, (bw_u32)(bw_u64)&r->avail_flags);
    wr(d, R_AVAIL_HI, 0);
    wr(d, R_USED_LO, (bw_u32)(bw_u64)&r->used_flags);
    wr(d, R_USED_HI, 0);
    wr(d, R_QUEUE_READY, 1);
    wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return rd(d, R_STATUS);
}

static void set_desc(int d, int i, bw_u64 addr, bw_u32 len, bw_u16 flags, bw_u16 next)
{
    volatile struct desc *x = &rings[d].desc[i];
    x->addr = addr;
    x->len = len;
    x->flags = flags;
    x->next = next;
}

/* Offers head, notifies queue 0, and returns the used length (the device runs the queue
 * during the notify write). Fails the check if nothing came back. */
static bw_u32 offer(int d, bw_u16 head)
{
    volatile struct ring *r = &rings[d];
    bw_u16 before = r->used_idx;
    r->avail_ring[next_avail[d] % QSIZE] = head;
    next_avail[d]++;
    __asm__ volatile("" ::: "memory");
    r->avail_idx = next_avail[d];
    wr(d, R_NOTIFY, 0);
    __asm__ volatile("" ::: "memory");
    check(r->used_idx == (bw_u16)(before + 1), "the device returned the chain");
    return r->used_ring[before % QSIZE].len;
}

/* A request in the usual layout: header, data, status. Returns the status byte. */
static bw_u8 request(int d, bw_u32 type, bw_u64 sector, bw_u64 addr, bw_u32 len, int data_writable)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status_byte = 0xff;
    set_desc(d, 0, (bw_u64)&hdr, sizeof hdr, F_NEXT, 1);
    set_desc(d, 1, addr, len, F_NEXT | (data_writable ? F_WRITE : 0), 2);
    set_desc(d, 2, (bw_u64)&status_byte, 1, F_WRITE, 0);
    last_used = offer(d, 0);
    return status_byte;
}

int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info)
{
    (void)vcpu;
    (void)vcpus;
    (void)info;

    /* 1-3: both devices are virtio-blk and come up. */
    check(rd(0, R_MAGIC) == 0x74726976 && rd(0, R_DEVICE_ID) == 2, "device 0 is virtio-blk");
    check(bring_up(0) & S_DRIVER_OK, "device 0 starts");
    check(bring_up(1) & S_DRIVER_OK, "device 1 starts");

    /* 4-7: an honest write and read back. */
    for (int i = 0; i < 512; i++)
        data[i] = (bw_u8)(i * 7 + 1);
    check(request(0, T_OUT, 3, (bw_u64)data, 512, 0) == ST_OK, "write succeeds");
    for (int i = 0; i < 512; i++)
        data[i] = 0;
    check(request(0, T_IN, 3, (bw_u64)data, 512, 1) == ST_OK, "read succeeds");
    int same = 1;
    for (int i = 0; i < 512; i++)
        same &= data[i] == (bw_u8)(i * 7 + 1);
    check(same, "read returns what was written");

    /* 8: a descriptor that chains to itself. */
    set_desc(0, 5, (bw_u64)&hdr, sizeof hdr, F_NEXT, 5);
    offer(0, 5);
    /* 9: a chain that runs around the whole table (longer than the queue). */
    for (int i = 0; i < QSIZE; i++)
        set_desc(0, i, (bw_u64)&hdr, sizeof hdr, F_NEXT, (bw_u16)((i + 1) % QSIZE));
    offer(0, 0);
    check(rd(0, R_STATUS) & S_DRIVER_OK, "loops leave the device running");

    /* 10-13: buffers outside RAM, over the MMIO window, zero-length and huge. */
    check(request(0, T_IN, 0, 0x7fff00000000ull, 512, 1) == ST_IOERR, "buffer outside RAM fails");
    check(request(0, T_IN, 0, 0xd0000000ull, 512, 1) == ST_IOERR, "buffer over MMIO fails");
    check(request(0, T_IN, 0, (bw_u64)data, 0xffffff00u, 1) == ST_IOERR, "huge length fails");
    /* A chain whose lengths add up past 4 GiB ends where it overflows (virtio-queue's walk):
     * no status byte is reached, so the chain comes back unused and untouched. */
    check(request(0, T_IN, 0, (bw_u64)data, 0xffffffffu, 1) == 0xff && last_used == 0,
          "overflowing chain returned unused");
    check(request(0, T_OUT, 0, (bw_u64)data, 100, 0) == ST_IOERR, "partial sector fails");
    /* 14-15: wrong directions. */
    check(request(0, T_IN, 0, (bw_u64)data, 512, 0) == ST_IOERR, "read into a read-only buffer fails");
    check(request(0, T_OUT, 0, (bw_u64)data, 512, 1) == ST_IOERR, "write from a write-only buffer fails");
    /* 16: past the end of the disk. */
    check(request(0, T_IN, 0xffffffffffull, (bw_u64)data, 512, 1) == ST_IOERR, "past the end fails");

    /* 17: notifications of queues that do not exist are ignored. */
    wr(0, R_NOTIFY, 7);
    wr(0, R_NOTIFY, 0xffffffffu);
    check(rd(0, R_STATUS) & S_DRIVER_OK, "bogus notifications ignored");

    /* 18: config-space writes at every offset and width change nothing. */
    bw_u32 cap_lo = rd(0, R_CONFIG), cap_hi = rd(0, R_CONFIG + 4);
    for (bw_u32 off = 0; off < 0x100; off++) {
        *(volatile bw_u8 *)(DEV(0) + R_CONFIG + off) = 0xa5;
        if ((off & 1) == 0)
            *(volatile bw_u16 *)(DEV(0) + R_CONFIG + off) = 0xa5a5;
        if ((off & 3) == 0)
            *(volatile bw_u32 *)(DEV(0) + R_CONFIG + off) = 0xa5a5a5a5;
        if ((off & 7) == 0)
            *(volatile bw_u64 *)(DEV(0) + R_CONFIG + off) = 0xa5a5a5a5a5a5a5a5ull;
    }
    check(rd(0, R_CONFIG) == cap_lo && rd(0, R_CONFIG + 4) == cap_hi && cap_lo == 4096,
          "capacity unchanged by config writes (2 MiB disk)");

    /* 19: a reset between offering a request and notifying it: nothing is served. */
    request(0, T_IN, 0, (bw_u64)data, 512, 1);
    rings[0].avail_ring[next_avail[0] % QSIZE] = 0;
    rings[0].avail_idx = (bw_u16)(next_avail[0] + 1);
    wr(0, R_STATUS, 0);
    check(rd(0, R_STATUS) == 0, "reset");
    wr(0, R_NOTIFY, 0);
    check(bring_up(0) & S_DRIVER_OK, "device 0 restarts after the reset");

    /* 21-22: an avail index far ahead breaks the queue: NEEDS_RESET, not a hang or a crash. */
    rings[0].avail_idx = (bw_u16)(next_avail[0] + 1000);
    wr(0, R_NOTIFY, 0);
    check(rd(0, R_STATUS) & S_NEEDS_RESET, "avail index jump sets NEEDS_RESET");
    /* 22: the other device is unaffected. */
    check(request(1, T_IN, 0, (bw_u64)data, 512, 1) == ST_OK, "device 1 still serves");

    /* 23-24: after a reset, device 0 serves again and the data is still there. */
    check(bring_up(0) & S_DRIVER_OK && !(rd(0, R_STATUS) & S_NEEDS_RESET), "device 0 recovers");
    check(request(0, T_IN, 3, (bw_u64)data, 512, 1) == ST_OK && data[1] == 8,
          "device 0 serves after the reset");

    bw_puts("virtio_hostile: all ");
    bw_putu((bw_u64)check_no, 10);
    bw_puts(" checks held\n");
    return 0;
}
