/* bench/tlbchurn.c — an L1 load for bench/net-rounds (NET_ROUNDS_HOG=mm): two threads of one
 * process that map, touch and unmap 1 MiB without pause. An munmap while the other thread runs
 * on the other CPU makes the kernel shoot down that CPU's TLB entries (an IPI, and a flush in
 * the emulated CPU): the cross-CPU memory-management traffic that extra processes bring to L1
 * and that a busy loop does not. Runs until killed. */
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>

#define CHUNK (1 << 20)

static void *churn(void *arg)
{
    (void)arg;
    for (;;) {
        char *p = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            continue;
        for (size_t i = 0; i < CHUNK; i += 4096)
            p[i] = 1;
        munmap(p, CHUNK);
    }
    return NULL;
}

int main(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, churn, NULL) != 0)
        return 1;
    churn(NULL);
    return 0;
}
