/* A busy target for attach tests: it never stops calling malloc and free
 * from one call site, so every attach lands in the middle of its calls.
 *
 * usage: busy OUT (--every-ms | --hot) [SIZE]
 *   --every-ms  one malloc + free every millisecond
 *   --hot       malloc + free in a tight loop
 * Writes OUT.ready once running. Each SIGUSR1 appends the number of
 * malloc calls made so far to OUT, one line each, flushed; SIGTERM ends it.
 */
#include "common.h"

#include <stdatomic.h>
#include <time.h>

static atomic_llong calls;
static volatile int every_ms;

__attribute__((noinline)) static void busy_alloc(size_t size)
{
    char *p = malloc(size);
    if (!p)
        die("malloc");
    p[0] = 1;
    atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    free(p);
}

static void *worker(void *arg)
{
    size_t size = (size_t)arg;
    struct timespec ms = {0, 1000000};
    for (;;) {
        busy_alloc(size);
        if (every_ms)
            nanosleep(&ms, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 64;
    every_ms = strcmp(argv[2], "--every-ms") == 0;
    size_t size = argc > 3 ? strtoul(argv[3], NULL, 10) : 256;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, (void *)size) != 0)
        die("pthread_create");
    FILE *out = fopen(argv[1], "w");
    if (!out)
        die("fopen");
    char ready[4096];
    snprintf(ready, sizeof(ready), "%s.ready", argv[1]);
    FILE *r = fopen(ready, "w");
    if (!r)
        die("fopen ready");
    fclose(r);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0)
            die("sigwait");
        if (sig != SIGUSR1)
            return 0;
        fprintf(out, "%lld\n", (long long)atomic_load(&calls));
        fflush(out);
    }
}
