/* Holds N blocks of 32 B live, then exits: bench/overhead.py checks that
 * memtrace tracks a million live allocations without a drop.
 *
 *   live_blocks N HOLD_MS
 *
 * The array of pointers is mmapped, so the only malloc calls are keep()'s. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define BLOCK_SIZE 32

__attribute__((noinline)) void *keep(void)
{
    void *p = malloc(BLOCK_SIZE);
    if (!p) {
        perror("malloc");
        exit(1);
    }
    *(volatile char *)p = 1;
    return p;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    long hold_ms = argc > 2 ? atol(argv[2]) : 1500;
    void **blocks = mmap(NULL, n * sizeof(void *), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (blocks == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (long i = 0; i < n; i++)
        blocks[i] = keep();
    struct timespec hold = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
    nanosleep(&hold, NULL);
    return 0;
}
