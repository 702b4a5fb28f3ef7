/* Threads that come and go, as in a service's pool: COUNT threads, one at a
 * time, each allocating 10 blocks of 1 KiB from thread_alloc, freeing 9 and
 * keeping one, then exiting.
 *
 * usage: churn OUT COUNT [--hold-ms N]
 * OUT gets {"threads": COUNT, "live_bytes": ..., "alloc_count": ...}.
 */
#include "common.h"

#include <time.h>

__attribute__((noinline)) static void *thread_alloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        die("malloc");
    memset(p, 1, n);
    return p;
}

static void *worker(void *arg)
{
    void *blocks[10];
    for (int i = 0; i < 10; i++)
        blocks[i] = thread_alloc(1024);
    for (int i = 1; i < 10; i++)
        free(blocks[i]);
    return blocks[0];
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 64;
    long count = strtol(argv[2], NULL, 10);
    int hold_ms = argc > 4 ? atoi(argv[4]) : 0;
    for (long i = 0; i < count; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0)
            die("pthread_create");
        pthread_join(t, NULL);
        struct timespec pause = {0, 5000000};
        nanosleep(&pause, NULL);
    }
    char tmp[4096];
    FILE *f = open_truth(argv[1], tmp, sizeof(tmp));
    fprintf(f, "{\"threads\": %ld, \"live_bytes\": %ld, \"alloc_count\": %ld}", count, count * 1024,
            count * 10);
    publish_file(f, tmp, argv[1]);
    struct timespec hold = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
    nanosleep(&hold, NULL);
    return 0;
}
