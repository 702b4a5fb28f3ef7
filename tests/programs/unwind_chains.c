/* Known call chains in code built without frame pointers (build.py:
 * -O2 -fomit-frame-pointer), for the unwinder (tests/integration/
 * test_unwind.py): each chain allocates blocks of its own size and keeps
 * them, and the program writes what it did to argv[1] as JSON.
 *
 * noipa keeps every function a function of its own (no clone, no inlining,
 * no tail call across it), and the work after each call keeps the caller's
 * frame live across it. The frames differ in size and in what they save:
 * the unwinder must follow each one's CFI, as rbp holds data, not frames. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STEP __attribute__((noipa))

static volatile unsigned long sink;

STEP static void *leaf_alloc(size_t size)
{
    void *p = malloc(size);
    memset(p, 1, 16);
    sink += (unsigned long)p;
    return p;
}

STEP static unsigned long chain_a3(int n, size_t size)
{
    unsigned long acc = 0;
    for (int i = 0; i < n; i++)
        acc += (unsigned long)leaf_alloc(size) ^ (unsigned long)i;
    return acc + sink;
}

STEP static unsigned long chain_a2(int n, size_t size)
{
    char buf[200];
    memset(buf, n, sizeof buf);
    unsigned long r = chain_a3(n, size);
    return r + (unsigned long)buf[n % 200];
}

STEP static unsigned long chain_a1(int n, size_t size)
{
    unsigned long r = chain_a2(n, size) * 3;
    return r + sink;
}

STEP static unsigned long chain_b2(int n, size_t size)
{
    unsigned long acc = 0;
    for (int i = 0; i < n; i++)
        acc += (unsigned long)leaf_alloc(size);
    return acc + sink;
}

/* A large frame, and rbp used as a plain register around the call. */
STEP static unsigned long chain_b1(int n, size_t size)
{
    volatile char big[5000];
    big[n % 5000] = 1;
    unsigned long r = chain_b2(n, size);
    return r + big[n % 5000];
}

STEP static unsigned long recurse(int depth, int n, size_t size)
{
    if (depth == 0)
        return chain_b2(n, size) + sink;
    unsigned long r = recurse(depth - 1, n, size) * 7;
    return r + sink;
}

STEP static unsigned long chain_t1(int n, size_t size)
{
    unsigned long r = chain_a3(n, size);
    return r ^ sink;
}

static void *worker(void *arg)
{
    (void)arg;
    sink += chain_t1(40, 1300);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: unwind_chains OUT.json\n");
        return 64;
    }
    /* memtrace loads libc's unwind table when it sees libc mapped, a few
     * ms after: the chains start well after that. */
    usleep(400 * 1000);
    FILE *out = fopen(argv[1], "w");
    if (!out)
        return 1;
    sink += chain_a1(100, 1000);
    sink += chain_b1(50, 3000);
    sink += recurse(20, 10, 7000);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    pthread_join(t, NULL);
    fprintf(out,
            "{\"chains\": ["
            "{\"frames\": [\"leaf_alloc\", \"chain_a3\", \"chain_a2\", \"chain_a1\", \"main\"],"
            " \"alloc_bytes\": %d, \"alloc_count\": %d},"
            "{\"frames\": [\"leaf_alloc\", \"chain_b2\", \"chain_b1\", \"main\"],"
            " \"alloc_bytes\": %d, \"alloc_count\": %d},"
            "{\"frames\": [\"leaf_alloc\", \"chain_b2\"%s, \"main\"],"
            " \"alloc_bytes\": %d, \"alloc_count\": %d},"
            "{\"frames\": [\"leaf_alloc\", \"chain_a3\", \"chain_t1\", \"worker\"],"
            " \"alloc_bytes\": %d, \"alloc_count\": %d}]}\n",
            100 * 1000, 100, 50 * 3000, 50,
            ", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\""
            ", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\""
            ", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\", \"recurse\"",
            10 * 7000, 10, 40 * 1300, 40);
    fclose(out);
    return 0;
}
