/* Allocates from deep frames from its start on, in code built without
 * frame pointers (build.py: -O2 -fomit-frame-pointer), for the exec test
 * of tests/integration/test_unwind_cache.py: launched as `sh -c 'sleep
 * 0.3; exec exec_deep'`, its image comes with an exec memtrace sees on the
 * way, not with the launch it holds at the first instruction. Every block
 * is kept, and allocated by descend, DEPTH + 1 frames of it below main. */
#include <stdlib.h>
#include <unistd.h>

#define STEP __attribute__((noipa))
#define DEPTH 12
#define ROUNDS 150
#define PER_ROUND 10

static volatile unsigned long sink;

STEP static unsigned long descend(int depth, size_t size)
{
    if (depth == 0) {
        char *block = malloc(size);
        block[0] = 1;
        sink += (unsigned long)block;
        return sink;
    }
    unsigned long r = descend(depth - 1, size) * 3;
    return r + sink;
}

int main(void)
{
    /* ~160 ms of allocations, evenly spread from the first one. */
    for (int i = 0; i < ROUNDS; i++) {
        for (int j = 0; j < PER_ROUND; j++)
            sink += descend(DEPTH, 1000 + 8 * j);
        usleep(1000);
    }
    return 0;
}
