/* Many distinct live allocation stacks that churn: bench/scale.py's target.
 *
 *   scale_target STACKS SECONDS [RATE [RAMP_S [DEPTH]]]
 *
 * Stack i is a path through 16 functions called via a table, one per base-16
 * digit of i (5 digits: up to 1,048,576 stacks), under DEPTH plain frames.
 * Each stack holds one block live. RATE times a second one block is freed
 * and allocated again from the same stack with another size, so its
 * counters change. The number of stacks in use grows linearly over RAMP_S
 * seconds (0: all at once), like a service warming up, then stays. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define DIGITS 5

typedef void *(*step_fn)(int level, long path, size_t size);
static step_fn steps[16];

static void *leaf(long path, size_t size)
{
    void *p = malloc(size);
    if (!p) {
        perror("malloc");
        exit(1);
    }
    *(volatile char *)p = (char)path;
    return p;
}

/* noinline and a use of the result after the call: no inlining and no
 * tail call, so every level is a frame of its own. */
#define STEP(n)                                                                \
    __attribute__((noinline)) static void *step_##n(int level, long path,      \
                                                    size_t size)               \
    {                                                                          \
        void *p = level == DIGITS                                              \
                      ? leaf(path, size)                                       \
                      : steps[(path >> (4 * level)) & 15](level + 1, path, size); \
        __asm__ volatile("" : : "r"(p) : "memory");                            \
        return p;                                                              \
    }
STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
STEP(8) STEP(9) STEP(10) STEP(11) STEP(12) STEP(13) STEP(14) STEP(15)

__attribute__((noinline)) static void *nest(int depth, long path, size_t size)
{
    void *p = depth > 0 ? nest(depth - 1, path, size) : steps[path & 15](1, path, size);
    __asm__ volatile("" : : "r"(p) : "memory");
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned long rng = 88172645463325252UL;
static unsigned long next_random(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s STACKS SECONDS [RATE [RAMP_S [DEPTH]]]\n", argv[0]);
        return 2;
    }
    long stacks = atol(argv[1]);
    double seconds = atof(argv[2]);
    double rate = argc > 3 ? atof(argv[3]) : 20000;
    double ramp_s = argc > 4 ? atof(argv[4]) : 0;
    int depth = argc > 5 ? atoi(argv[5]) : 8;
    if (stacks < 1 || stacks > (1L << (4 * DIGITS))) {
        fprintf(stderr, "STACKS: 1 to %ld\n", 1L << (4 * DIGITS));
        return 2;
    }
    step_fn table[16] = {step_0, step_1, step_2, step_3, step_4, step_5, step_6, step_7,
                         step_8, step_9, step_10, step_11, step_12, step_13, step_14, step_15};
    for (int i = 0; i < 16; i++)
        steps[i] = table[i];
    /* mmapped: the only malloc calls are the stacks' own. */
    void **blocks = mmap(NULL, stacks * sizeof(void *), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (blocks == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    double start = now_s(), end = start + seconds;
    long active = 0;
    double done = 0;
    for (double t = start; t < end; t = now_s()) {
        long want = ramp_s > 0 && t - start < ramp_s ? (long)(stacks * (t - start) / ramp_s) : stacks;
        /* Churn in 1 ms steps at RATE a second. */
        double target = (t - start) * rate;
        for (;;) {
            long i;
            if (active < want) {
                i = active++;
            } else if (done < target && active > 0) {
                i = next_random() % active;
                free(blocks[i]);
                done++;
            } else {
                break;
            }
            /* One call site for the first block and the later ones: one
             * stack per path. */
            blocks[i] = nest(depth, i, 16 + (next_random() & 255));
        }
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    return 0;
}
