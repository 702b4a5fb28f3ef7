/* Heaps in the states a running service leaves them in, each with its
 * ground truth written as JSON to OUT (published by rename).
 *
 * usage: heapstates OUT MODE
 *   existing   100 MiB live and 100 MiB freed in the main arena (every other
 *              16 KiB block), plus 2 large blocks of 8 MiB, all written;
 *              then waits for SIGTERM. For attaching after the fact.
 *   exitfree   300 MiB in 64 KiB blocks, written; after 1.5 s frees 90 %
 *              (the last block kept, so the top is not trimmed) and exits
 *              0.2 s later.
 *   untouched  4 large blocks of 64 MiB never written, 8 MiB written in
 *              small blocks; exits after 1.5 s.
 *   exec       400 KiB live in old_image_alloc, then execs itself as
 *              `heapstates OUT exec-child`, which keeps 100 KiB live in
 *              new_image_alloc for 1.5 s and exits.
 */
#include "common.h"

#include <time.h>

#define MiB (1024L * 1024)

static void nap(double s)
{
    struct timespec t = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&t, NULL);
}

__attribute__((noinline)) static char *keep_block(size_t size, int touch)
{
    char *p = malloc(size);
    if (!p)
        die("malloc");
    if (touch)
        memset(p, 0x5a, size);
    return p;
}

__attribute__((noinline)) static char *old_image_alloc(size_t size) { return keep_block(size, 1); }
__attribute__((noinline)) static char *new_image_alloc(size_t size) { return keep_block(size, 1); }

static void write_truth(const char *path, const char *fmt, long a, long b, long c)
{
    char tmp[4096];
    FILE *f = open_truth(path, tmp, sizeof(tmp));
    fprintf(f, fmt, a, b, c);
    publish_file(f, tmp, path);
}

static void wait_term(void)
{
    sigset_t set;
    int sig;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigwait(&set, &sig);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 64;
    const char *out = argv[1], *mode = argv[2];
    if (strcmp(mode, "existing") == 0) {
        enum { BLOCK = 16384, PAIRS = 100 * MiB / BLOCK };
        static char *blocks[2 * PAIRS];
        for (long i = 0; i < 2 * PAIRS; i++)
            blocks[i] = keep_block(BLOCK, 1);
        for (long i = 0; i < 2 * PAIRS; i += 2)
            free(blocks[i]);
        keep_block(8 * MiB, 1);
        keep_block(8 * MiB, 1);
        write_truth(out, "{\"live_bytes\": %ld, \"freed_bytes\": %ld, \"large_bytes\": %ld}",
                    PAIRS * (long)BLOCK + 16 * MiB, PAIRS * (long)BLOCK, 16 * MiB);
        wait_term();
        return 0;
    }
    if (strcmp(mode, "exitfree") == 0) {
        enum { BLOCK = 65536, COUNT = 300 * MiB / BLOCK };
        static char *blocks[COUNT];
        long live = 0;
        for (long i = 0; i < COUNT; i++)
            blocks[i] = keep_block(BLOCK, 1);
        nap(1.5);
        for (long i = 0; i < COUNT; i++) {
            if (i % 10 == 9)
                live += BLOCK;
            else
                free(blocks[i]);
        }
        write_truth(out, "{\"peak_live_bytes\": %ld, \"live_bytes\": %ld, \"freed_bytes\": %ld}",
                    (long)COUNT * BLOCK, live, (long)COUNT * BLOCK - live);
        nap(0.2);
        return 0;
    }
    if (strcmp(mode, "untouched") == 0) {
        for (int i = 0; i < 4; i++)
            keep_block(64 * MiB, 0);
        for (int i = 0; i < 128; i++)
            keep_block(65536, 1);
        write_truth(out, "{\"untouched_bytes\": %ld, \"touched_bytes\": %ld%.0ld}",
                    256 * MiB, 8 * MiB, 0);
        nap(1.5);
        return 0;
    }
    if (strcmp(mode, "exec") == 0) {
        for (int i = 0; i < 100; i++)
            old_image_alloc(4096);
        char *child[] = {argv[0], (char *)out, "exec-child", NULL};
        execv("/proc/self/exe", child);
        die("execv");
    }
    if (strcmp(mode, "exec-child") == 0) {
        for (int i = 0; i < 25; i++)
            new_image_alloc(4096);
        write_truth(out, "{\"old_live_bytes\": %ld, \"new_live_bytes\": %ld%.0ld}",
                    100 * 4096L, 25 * 4096L, 0);
        nap(1.5);
        return 0;
    }
    return 64;
}
