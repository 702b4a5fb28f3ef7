/* Ground truth for per-thread and per-stack accounting.
 *
 * Four workers; worker k allocates k MiB, half in 4 KiB blocks from
 * alloc_small() and half in 64 KiB blocks from alloc_large(), then frees
 * every other block of each kind, so k/2 MiB stays live. Workers touch no
 * other heap memory (no stdio), so their per-thread totals are exactly what
 * this file counts.
 *
 * usage: threads OUT [--wait] [--hold-ms N]
 *   OUT        ground truth (JSON), written once every worker is done
 *   --wait     attach mode: write OUT.ready (our pid) with the workers
 *              parked, allocate only after SIGUSR1; after OUT is written,
 *              wait for a second SIGUSR1, then free everything, run a
 *              self-checking malloc workload and exit 0 (proves the
 *              process still works once the tracer is gone)
 *   --hold-ms  launch mode: keep the workers alive N ms after OUT is written
 *              so a sampling tracer sees them (and their names) alive
 */
#include "common.h"

#include <stdint.h>
#include <time.h>

#define WORKERS 4
#define MIB (1024 * 1024)
#define SMALL_SIZE (4 * 1024)
#define LARGE_SIZE (64 * 1024)
#define MAX_SMALL (WORKERS * MIB / 2 / SMALL_SIZE)
#define MAX_LARGE (WORKERS * MIB / 2 / LARGE_SIZE)

struct worker {
    int k;
    pthread_t thread;
    long tid;
    char name[16];
    struct tally total;
    struct tally small, large;
    void *small_blocks[MAX_SMALL];
    void *large_blocks[MAX_LARGE];
};

static struct worker workers[WORKERS];
static pthread_barrier_t parked, start, done, finish;
static int wait_mode;

/* Each allocating function does work after malloc returns, so the call can
 * never become a tail jump and the function stays the malloc caller. */
__attribute__((noinline)) void *alloc_small(struct worker *w)
{
    void *p = malloc(SMALL_SIZE);
    if (!p)
        die("malloc");
    memset(p, w->k, SMALL_SIZE);
    tally_alloc(&w->small, SMALL_SIZE);
    return p;
}

__attribute__((noinline)) void *alloc_large(struct worker *w)
{
    void *p = malloc(LARGE_SIZE);
    if (!p)
        die("malloc");
    memset(p, w->k, LARGE_SIZE);
    tally_alloc(&w->large, LARGE_SIZE);
    return p;
}

__attribute__((noinline)) void release(void **slot)
{
    free(*slot);
    *slot = NULL;
}

static void check_block(const struct worker *w, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i += 512)
        if (p[i] != (unsigned char)w->k) {
            fprintf(stderr, "worker%d: heap block corrupted\n", w->k);
            exit(3);
        }
}

/* After the tracer detached: the heap must still be intact and usable. */
static void workload_after_trace(struct worker *w)
{
    int n_small = w->k * MIB / 2 / SMALL_SIZE, n_large = w->k * MIB / 2 / LARGE_SIZE;
    for (int i = 0; i < n_small; i++)
        if (w->small_blocks[i]) {
            check_block(w, w->small_blocks[i], SMALL_SIZE);
            free(w->small_blocks[i]);
        }
    for (int i = 0; i < n_large; i++)
        if (w->large_blocks[i]) {
            check_block(w, w->large_blocks[i], LARGE_SIZE);
            free(w->large_blocks[i]);
        }
    for (int i = 1; i <= 2000; i++) {
        size_t n = (size_t)(i * 37 % 9000) + 1;
        unsigned char *p = calloc(1, n);
        if (!p)
            die("calloc");
        p[n - 1] = 0x5a;
        p = realloc(p, n * 2);
        if (!p || p[n - 1] != 0x5a || p[0] != 0) {
            fprintf(stderr, "worker%d: realloc lost data\n", w->k);
            exit(3);
        }
        free(p);
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    int n_small = w->k * MIB / 2 / SMALL_SIZE, n_large = w->k * MIB / 2 / LARGE_SIZE;

    w->tid = current_tid();
    snprintf(w->name, sizeof w->name, "worker%d", w->k);
    pthread_setname_np(pthread_self(), w->name);
    pthread_barrier_wait(&parked);
    pthread_barrier_wait(&start);

    for (int i = 0; i < n_small; i++)
        w->small_blocks[i] = alloc_small(w);
    for (int i = 0; i < n_large; i++)
        w->large_blocks[i] = alloc_large(w);
    for (int i = 1; i < n_small; i += 2) {
        release(&w->small_blocks[i]);
        tally_free(&w->small, SMALL_SIZE);
    }
    for (int i = 1; i < n_large; i += 2) {
        release(&w->large_blocks[i]);
        tally_free(&w->large, LARGE_SIZE);
    }
    w->total.alloc_bytes = w->small.alloc_bytes + w->large.alloc_bytes;
    w->total.free_bytes = w->small.free_bytes + w->large.free_bytes;
    w->total.alloc_count = w->small.alloc_count + w->large.alloc_count;
    w->total.free_count = w->small.free_count + w->large.free_count;

    pthread_barrier_wait(&done);
    pthread_barrier_wait(&finish);
    if (wait_mode)
        workload_after_trace(w);
    return NULL;
}

static void write_truth(const char *path)
{
    char tmp[4096];
    struct tally small = {0}, large = {0};
    FILE *f = open_truth(path, tmp, sizeof tmp);

    fprintf(f, "{\"pid\": %d, \"threads\": [", (int)getpid());
    for (int i = 0; i < WORKERS; i++) {
        struct worker *w = &workers[i];
        fprintf(f, "%s\n  {\"tid\": %ld, \"name\": \"%s\", ", i ? "," : "", w->tid, w->name);
        tally_json(f, &w->total);
        fprintf(f, "}");
        small.alloc_bytes += w->small.alloc_bytes;
        small.free_bytes += w->small.free_bytes;
        small.alloc_count += w->small.alloc_count;
        small.free_count += w->small.free_count;
        large.alloc_bytes += w->large.alloc_bytes;
        large.free_bytes += w->large.free_bytes;
        large.alloc_count += w->large.alloc_count;
        large.free_count += w->large.free_count;
    }
    fprintf(f, "],\n \"functions\": {\n  \"alloc_small\": {");
    tally_json(f, &small);
    fprintf(f, "},\n  \"alloc_large\": {");
    tally_json(f, &large);
    fprintf(f, "}}}\n");
    publish_file(f, tmp, path);
}

static void write_ready(const char *path)
{
    char ready[4096], tmp[4200];
    snprintf(ready, sizeof ready, "%s.ready", path);
    FILE *f = open_truth(ready, tmp, sizeof tmp);
    fprintf(f, "%d\n", (int)getpid());
    publish_file(f, tmp, ready);
}

int main(int argc, char **argv)
{
    long hold_ms = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT [--wait] [--hold-ms N]\n", argv[0]);
        return 64;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0)
            wait_mode = 1;
        else if (strcmp(argv[i], "--hold-ms") == 0 && i + 1 < argc)
            hold_ms = atol(argv[++i]);
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 64;
        }
    }

    block_sigusr1();
    pthread_barrier_init(&parked, NULL, WORKERS + 1);
    pthread_barrier_init(&start, NULL, WORKERS + 1);
    pthread_barrier_init(&done, NULL, WORKERS + 1);
    pthread_barrier_init(&finish, NULL, WORKERS + 1);
    for (int i = 0; i < WORKERS; i++) {
        workers[i].k = i + 1;
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0)
            die("pthread_create");
    }

    pthread_barrier_wait(&parked);
    if (wait_mode) {
        write_ready(argv[1]);
        wait_sigusr1();
    }
    pthread_barrier_wait(&start);
    pthread_barrier_wait(&done);
    write_truth(argv[1]);
    if (wait_mode)
        wait_sigusr1();
    if (hold_ms > 0) {
        struct timespec ts = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    pthread_barrier_wait(&finish);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(workers[i].thread, NULL);
    return 0;
}
