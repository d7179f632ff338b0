/* bulwark.h — function micro-VM host-call ABI, version 1.
 *
 * A payload runs with no OS, in 64-bit mode at CPL3 (or CPL0 with --cpl0), identity-mapped,
 * with its stack set up by the monitor. `bulwark payload build` compiles C or assembly against
 * this header and links it at 0x100000. See docs/payload-abi.md for the full description.
 */
#ifndef BULWARK_H
#define BULWARK_H

typedef unsigned char bw_u8;
typedef unsigned short bw_u16;
typedef unsigned int bw_u32;
typedef unsigned long bw_u64;
typedef long bw_i64;
typedef unsigned long bw_size;

#define BW_HOSTCALL_PORT 0xb0
#define BW_CALL_EXIT 0
#define BW_CALL_WRITE 1
#define BW_CALL_READ 2
#define BW_CALL_CLOCK 3
#define BW_CALL_RANDOM 4

#define BW_EBADF 9
#define BW_EFAULT 14
#define BW_ENOSYS 38

#define BW_INFO_MAGIC 0x4b574c42u
#define BW_FLAG_CPL0 1u

/* The read-only info page; its address is the third argument of bw_main. */
struct bw_info {
    bw_u32 magic;      /* BW_INFO_MAGIC */
    bw_u32 version;    /* ABI version, 1 */
    bw_u32 vcpus;
    bw_u32 flags;      /* BW_FLAG_CPL0 */
    bw_u64 mem_size;   /* guest RAM in bytes */
    bw_u64 heap_start; /* first free byte after the image */
    bw_u64 heap_end;   /* end of free memory (stacks start above) */
    bw_u64 arg_len;
    bw_u64 mmio_base;  /* the platform-info device */
    bw_u64 reserved;
    char arg[];        /* NUL-terminated argument string */
};

/* Entry point of a C payload, called on every vCPU. Its return value is the exit status. */
int bw_main(bw_u32 vcpu, bw_u32 vcpus, const struct bw_info *info);

static inline bw_i64 bw_hostcall(bw_u32 nr, bw_u64 a, bw_u64 b, bw_u64 c)
{
    bw_u64 rax = nr;
    __asm__ volatile("outl %%eax, $0xb0" : "+a"(rax) : "D"(a), "S"(b), "d"(c) : "memory");
    return (bw_i64)rax;
}

static inline __attribute__((noreturn)) void bw_exit(int status)
{
    bw_hostcall(BW_CALL_EXIT, (bw_u64)status, 0, 0);
    for (;;)
        ;
}

static inline bw_i64 bw_write(int fd, const void *buf, bw_size len)
{
    return bw_hostcall(BW_CALL_WRITE, (bw_u64)fd, (bw_u64)buf, len);
}

static inline bw_i64 bw_read(void *buf, bw_size len)
{
    return bw_hostcall(BW_CALL_READ, (bw_u64)buf, len, 0);
}

static inline bw_u64 bw_clock_ns(void)
{
    return (bw_u64)bw_hostcall(BW_CALL_CLOCK, 0, 0, 0);
}

static inline bw_i64 bw_random(void *buf, bw_size len)
{
    return bw_hostcall(BW_CALL_RANDOM, (bw_u64)buf, len, 0);
}

static inline void bw_outb(bw_u16 port, bw_u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline bw_u8 bw_inb(bw_u16 port)
{
    bw_u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline bw_u32 bw_mmio_read32(bw_u64 addr)
{
    return *(volatile bw_u32 *)addr;
}

static inline void bw_mmio_write32(bw_u64 addr, bw_u32 v)
{
    *(volatile bw_u32 *)addr = v;
}

static inline bw_size bw_strlen(const char *s)
{
    bw_size n = 0;
    while (s[n])
        n++;
    return n;
}

static inline void bw_puts(const char *s)
{
    bw_write(1, s, bw_strlen(s));
}

/* Writes `v` in base 10 (or 16) to the console. */
static inline void bw_putu(bw_u64 v, int base)
{
    char buf[24];
    int i = sizeof buf;
    do {
        buf[--i] = "0123456789abcdef"[v % (bw_u64)base];
        v /= (bw_u64)base;
    } while (v && i > 0);
    bw_write(1, buf + i, sizeof buf - (bw_size)i);
}

#endif
