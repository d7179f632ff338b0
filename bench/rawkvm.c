/* rawkvm.c — the smallest KVM program that runs a bulwark flat payload at CPL3, for comparing
 * exit cost against bulwark on the same host in the same run.
 *
 *   rawkvm PAYLOAD.bin
 *
 * It does what crates/monitor/src/payload/ does, minus everything a benchmark does not need:
 * one memory slot (16 MiB, anonymous), one vCPU, identity page tables of 2 MiB pages (user,
 * read-write-execute), a GDT with kernel and user segments and a 64-bit TSS whose I/O
 * permission bitmap allows every port (kvm_pvm ignores RFLAGS.IOPL at CPL3 but honours the
 * bitmap; IOPL is 3 as well), and entry at 0x100000 in 64-bit mode at CPL3 with the stack at the
 * top of RAM. There is no IDT: a guest fault is a triple fault, reported and fatal.
 *
 * The exit loop is KVM_RUN, then resume on KVM_EXIT_IO. Port 0x80 writes are counted and
 * dropped. Port 0xb0 implements the three host calls the bench payloads use, with bulwark's ABI:
 * 0 exit(status = rdi), 1 write(fd = rdi, buf = rsi, len = rdx) to stdout/stderr, 3 clock
 * (ns since the VM was created, in rax). Port 0xe9 writes one byte to stdout.
 *
 * On stderr it also reports a host-side timing of the exit loop: from the first port-0x80 exit
 * to the next host call. With RAWKVM_TIMING=1 in the environment it prints how long each set-up
 * step took (and tears the VM down explicitly, timing that too): where launch time goes. With
 * RAWKVM_SYNC_REGS=1 host calls use KVM_CAP_SYNC_REGS instead of KVM_GET_REGS/KVM_SET_REGS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16ULL << 20)
#define PAYLOAD_ADDR 0x100000ULL
#define GDT_ADDR 0x1000ULL
#define TSS_ADDR 0x3000ULL
#define TSS_SIZE 104
#define IOPB_LEN (8192 + 1) /* 65536 bits, then the all-ones end byte */
#define EXC_STACK_TOP 0x9000ULL
#define PML4_ADDR 0x10000ULL
#define PDPT_ADDR 0x11000ULL
#define PD_ADDR 0x12000ULL

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS (0x18 | 3)
#define USER_CS (0x20 | 3)
#define TSS_SEL 0x28

#define PTE_P 1ULL
#define PTE_W 2ULL
#define PTE_U 4ULL
#define PTE_PS 0x80ULL

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* RAWKVM_TIMING=1: print how long each set-up and tear-down step took, to stderr. */
static int timing;
static uint64_t step_t;

static void step(const char *what)
{
    uint64_t t = now_ns();
    if (timing && what)
        fprintf(stderr, "rawkvm: step %-28s %7.1f us\n", what, (double)(t - step_t) / 1e3);
    step_t = t;
}

static void die(const char *what)
{
    fprintf(stderr, "rawkvm: %s: %s\n", what, strerror(errno));
    exit(125);
}

/* A flat (non-system) segment descriptor: base 0, limit 0xfffff, `flags` = G, D/B, L, AVL. */
static uint64_t segment(uint64_t access, uint64_t flags)
{
    return 0xffffULL | (access << 40) | (0xfULL << 48) | (flags << 52);
}

static void build_system_area(uint8_t *mem)
{
    /* GDT: null, kernel code/data, user data/code, one 16-byte TSS descriptor. */
    uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
    gdt[0] = 0;
    gdt[1] = segment(0x9b, 0xa);
    gdt[2] = segment(0x93, 0xc);
    gdt[3] = segment(0xf3, 0xc);
    gdt[4] = segment(0xfb, 0xa);
    uint64_t limit = TSS_SIZE + IOPB_LEN - 1;
    gdt[5] = (limit & 0xffff) | ((TSS_ADDR & 0xffffff) << 16) | (0x8bULL << 40) |
             (((limit >> 16) & 0xf) << 48) | (((TSS_ADDR >> 24) & 0xff) << 56);
    gdt[6] = TSS_ADDR >> 32;

    /* TSS: RSP0 and IST1 on a small stack, the I/O bitmap right after the TSS, all ports
     * allowed (zero bits), then the terminating 0xff byte. */
    uint8_t *tss = mem + TSS_ADDR;
    uint64_t top = EXC_STACK_TOP;
    memcpy(tss + 4, &top, 8);
    memcpy(tss + 36, &top, 8);
    uint16_t iopb = TSS_SIZE;
    memcpy(tss + 102, &iopb, 2);
    memset(tss + TSS_SIZE, 0, IOPB_LEN - 1);
    tss[TSS_SIZE + IOPB_LEN - 1] = 0xff;

    /* Identity page tables: 2 MiB pages over all of RAM, user read-write-execute. */
    uint64_t *pml4 = (uint64_t *)(mem + PML4_ADDR);
    uint64_t *pdpt = (uint64_t *)(mem + PDPT_ADDR);
    uint64_t *pd = (uint64_t *)(mem + PD_ADDR);
    pml4[0] = PDPT_ADDR | PTE_P | PTE_W | PTE_U;
    pdpt[0] = PD_ADDR | PTE_P | PTE_W | PTE_U;
    for (uint64_t i = 0; i < MEM_SIZE >> 21; i++)
        pd[i] = (i << 21) | PTE_P | PTE_W | PTE_U | PTE_PS;
}

static struct kvm_segment flat_seg(uint16_t selector, int code)
{
    struct kvm_segment s = {
        .base = 0,
        .limit = 0xffffffff,
        .selector = selector,
        .type = code ? 0xb : 0x3,
        .present = 1,
        .dpl = selector & 3,
        .db = !code,
        .s = 1,
        .l = !!code,
        .g = 1,
    };
    return s;
}

static void setup_vcpu(int kvm, int vcpu)
{
    /* Same CPUID as bulwark: everything KVM supports. */
    int n = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + n * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = n;
    step(NULL);
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    step("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");
    step("KVM_SET_CPUID2");
    free(cpuid);

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs = flat_seg(USER_CS, 1);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat_seg(USER_DS, 0);
    struct kvm_segment tr = {
        .base = TSS_ADDR,
        .limit = TSS_SIZE + IOPB_LEN - 1,
        .selector = TSS_SEL,
        .type = 0xb,
        .present = 1,
    };
    sregs.tr = tr;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    /* PE MP ET NE WP PG; PAE OSFXSR OSXMMEXCPT; LME LMA NXE: as bulwark's entry_state. */
    sregs.cr0 = 1 | 2 | 0x10 | 0x20 | (1 << 16) | (1UL << 31);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
    sregs.efer = (1 << 8) | (1 << 10) | (1 << 11);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");

    struct kvm_regs regs = {
        .rip = PAYLOAD_ADDR,
        .rsp = MEM_SIZE,
        .rflags = 0x2 | (3 << 12), /* reserved bit, IOPL 3 */
        .rdi = 0,                  /* vCPU index */
        .rsi = 1,                  /* vCPU count */
        .rdx = 0,                  /* no info page: the bench payloads do not read it */
    };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    struct kvm_fpu fpu = {.fcw = 0x37f, .mxcsr = 0x1f80};
    if (ioctl(vcpu, KVM_SET_FPU, &fpu) < 0)
        die("KVM_SET_FPU");
    step("SET_SREGS/REGS/FPU");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: rawkvm PAYLOAD.bin (a flat payload, entered at 0x100000)\n");
        return 125;
    }
    timing = getenv("RAWKVM_TIMING") != NULL;
    step(NULL);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    step("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    step("KVM_CREATE_VM");
    uint64_t vm_start = now_ns();

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    step("mmap + SET_USER_MEMORY_REGION");

    build_system_area(mem);
    FILE *f = fopen(argv[1], "rb");
    if (!f)
        die(argv[1]);
    size_t len = fread(mem + PAYLOAD_ADDR, 1, MEM_SIZE - PAYLOAD_ADDR - (1 << 20), f);
    fclose(f);
    if (len == 0) {
        fprintf(stderr, "rawkvm: %s is empty\n", argv[1]);
        return 125;
    }

    step("system area + load payload");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    step("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    setup_vcpu(kvm, vcpu);
    /* RAWKVM_SYNC_REGS=1: host calls read and write registers through kvm_run (one ioctl per
     * exit) instead of KVM_GET_REGS + KVM_SET_REGS (three). */
    int sync_regs = getenv("RAWKVM_SYNC_REGS") != NULL;
    if (sync_regs) {
        if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) <= 0) {
            fprintf(stderr, "rawkvm: KVM_CAP_SYNC_REGS is not available\n");
            return 125;
        }
        run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    }

    uint64_t port80 = 0, first80 = 0, loop_ns = 0, loop_exits = 0, runs = 0;
    for (;;) {
        if (runs++ == 0)
            step(NULL);
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "rawkvm: unexpected exit reason %u\n", run->exit_reason);
            return 123;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction != KVM_EXIT_IO_OUT)
            continue; /* reads see whatever is in the buffer */
        switch (run->io.port) {
        case 0x80:
            if (port80++ == 0)
                first80 = now_ns();
            break;
        case 0xe9:
            if (runs == 1)
                step("first KVM_RUN to 1st exit");
            fwrite(data, 1, 1, stdout);
            fflush(stdout);
            break;
        case 0xb0: {
            if (port80 && !loop_ns) {
                loop_ns = now_ns() - first80;
                loop_exits = port80;
            }
            uint32_t nr;
            memcpy(&nr, data, 4);
            struct kvm_regs regs;
            if (sync_regs)
                regs = run->s.regs.regs;
            else if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
                die("KVM_GET_REGS");
            if (nr == 0) {
                fflush(stdout);
                if (loop_exits)
                    fprintf(stderr, "rawkvm: host-side %lu exits in %lu ns\n",
                            (unsigned long)loop_exits, (unsigned long)loop_ns);
                if (timing) {
                    /* Tear down explicitly, to see what exit_group would otherwise do. */
                    step(NULL);
                    close(vcpu);
                    munmap(run, run_size);
                    step("close vCPU");
                    close(vm);
                    step("close VM (destroy)");
                    munmap(mem, MEM_SIZE);
                    step("munmap guest RAM");
                }
                return (int)(regs.rdi & 0xff);
            } else if (nr == 1) {
                FILE *out = regs.rdi == 2 ? stderr : stdout;
                if (regs.rsi >= PAYLOAD_ADDR && regs.rdx <= MEM_SIZE &&
                    regs.rsi <= MEM_SIZE - regs.rdx) {
                    fwrite(mem + regs.rsi, 1, regs.rdx, out);
                    fflush(out);
                    regs.rax = regs.rdx;
                } else {
                    regs.rax = (uint64_t)-14;
                }
            } else if (nr == 3) {
                regs.rax = now_ns() - vm_start;
            } else {
                regs.rax = (uint64_t)-38;
            }
            if (sync_regs) {
                run->s.regs.regs.rax = regs.rax;
                run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
            } else if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) {
                die("KVM_SET_REGS");
            }
            break;
        }
        default:
            break;
        }
    }
}
