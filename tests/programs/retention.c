/* Ground truth for arena retention: threads that each fill their own glibc
 * arena with small blocks and free 90 % of them, in a fragmenting order.
 *
 * Workers run one after another, each while the earlier ones are alive and
 * parked, so glibc gives each a new arena (none is on its free list). Worker
 * i allocates --mib MiB in blocks of 1-32 KiB (sizes from a fixed seed, so
 * every run does the same), touches them, then frees all but every 10th
 * block in a shuffled order: the survivors pin the freed holes, so free()
 * gives almost nothing back. Workers touch no other heap memory (no stdio),
 * so each arena's live bytes are exactly the requested sizes of its
 * survivors. The pointer arrays are mmap'd, outside every arena.
 *
 * Each worker finds its arena the way glibc does: a chunk with the
 * NON_MAIN_ARENA bit lies in a 64 MiB-aligned heap whose heap_info starts
 * with the arena's address; its size and mprotect_size follow. The
 * program's own view of what each arena holds in memory is mincore() over
 * its heaps (the whole 64 MiB reservation).
 *
 * usage: retention OUT [--threads N] [--mib M] [--chunks N] [--trim] [--hold-ms MS] [--wait]
 *   OUT        ground truth (JSON), written once every worker is done
 *   --chunks   then each worker also leaves N/2 small free chunks (see
 *              scatter_chunks): an arena that takes long to read
 *   --trim     then run malloc_trim(0), measuring anonymous RSS (statm
 *              resident - shared) right before and right after
 *   --hold-ms  stay alive MS ms after OUT is written (launch mode: a sampling
 *              tracer sees the final state), then exit 0
 *   --wait     attach mode: write OUT.ready (our pid) and start the workers
 *              only after SIGUSR1; after OUT, wait for a second SIGUSR1,
 *              then exit 0
 */
#include "common.h"

#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

#define MAX_WORKERS 16
#define MAX_HEAPS 8
#define HEAP_MAX_SIZE (64UL << 20) /* 2 * DEFAULT_MMAP_THRESHOLD_MAX on 64-bit */
#define MIN_BLOCK 1024
#define MAX_BLOCK (32 * 1024)
#define KEEP_EVERY 10
#define NON_MAIN_ARENA 0x4

struct worker {
    int index;
    pthread_t thread;
    long tid;
    char name[16];
    size_t target, chunks;
    uint64_t seed;
    struct tally tally;
    uintptr_t arena; /* 0: the chunk was main_arena's */
    int foreign_blocks; /* survivors outside `arena`: should stay 0 */
    uintptr_t heaps[MAX_HEAPS];
    size_t heap_size[MAX_HEAPS], heap_mprotect_size[MAX_HEAPS]; /* from heap_info */
    int heap_count;
    size_t resident_bytes, resident_after_trim_bytes;
};

static struct worker workers[MAX_WORKERS];
static pthread_mutex_t hold = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t step_done = PTHREAD_COND_INITIALIZER;
static int workers_done;

static uint64_t next_random(uint64_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return *state >> 33;
}

static void *map_array(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static uintptr_t heap_of(const void *p) { return (uintptr_t)p & ~(HEAP_MAX_SIZE - 1); }

static uintptr_t arena_of(const void *p)
{
    if (!(((const size_t *)p)[-1] & NON_MAIN_ARENA))
        return 0;
    return *(const uintptr_t *)heap_of(p);
}

static void note_heap(struct worker *w, uintptr_t heap)
{
    for (int i = 0; i < w->heap_count; i++)
        if (w->heaps[i] == heap)
            return;
    if (w->heap_count < MAX_HEAPS)
        w->heaps[w->heap_count++] = heap;
}

/* noinline, with work after malloc returns: it stays the malloc caller. */
__attribute__((noinline)) void *retain_alloc(struct worker *w, size_t size)
{
    void *p = malloc(size);
    if (!p)
        die("malloc");
    memset(p, 0x5a, size);
    tally_alloc(&w->tally, size);
    return p;
}

__attribute__((noinline)) void retain_free(struct worker *w, void *p, size_t size)
{
    free(p);
    tally_free(&w->tally, size);
}

static void fill_and_fragment(struct worker *w)
{
    size_t cap = w->target / MIN_BLOCK + 2, n = 0, requested = 0;
    char **blocks = map_array(cap * sizeof *blocks);
    size_t *sizes = map_array(cap * sizeof *sizes);
    size_t *order = map_array(cap * sizeof *order);

    while (requested < w->target) {
        size_t size = MIN_BLOCK + next_random(&w->seed) % (MAX_BLOCK - MIN_BLOCK + 1);
        blocks[n] = retain_alloc(w, size);
        sizes[n] = size;
        requested += size;
        n++;
    }
    /* Survivors: every KEEP_EVERY-th block and the last (it pins the top). */
    size_t freeing = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (i % KEEP_EVERY)
            order[freeing++] = i;
    for (size_t i = freeing; i > 1; i--) {
        size_t j = next_random(&w->seed) % i, tmp = order[i - 1];
        order[i - 1] = order[j];
        order[j] = tmp;
    }
    for (size_t i = 0; i < freeing; i++) {
        retain_free(w, blocks[order[i]], sizes[order[i]]);
        blocks[order[i]] = NULL;
    }
    w->arena = arena_of(blocks[0]);
    for (size_t i = 0; i < n; i++) {
        if (!blocks[i])
            continue;
        if (arena_of(blocks[i]) != w->arena)
            w->foreign_blocks++;
        if (w->arena)
            note_heap(w, heap_of(blocks[i]));
    }
    munmap(blocks, cap * sizeof *blocks);
    munmap(sizes, cap * sizeof *sizes);
    munmap(order, cap * sizeof *order);
}

/* Then --chunks N: N blocks of 256-1023 bytes (past the tcache and the
 * fastbins once each size's tcache is full), every other one freed, so the
 * arena's bins hold ~N/2 free chunks that cannot coalesce: slow to walk. */
static void scatter_chunks(struct worker *w, size_t count)
{
    if (!count)
        return;
    char **blocks = map_array(count * sizeof *blocks);
    size_t *sizes = map_array(count * sizeof *sizes);
    for (size_t i = 0; i < count; i++) {
        sizes[i] = 256 + next_random(&w->seed) % 768;
        blocks[i] = retain_alloc(w, sizes[i]);
    }
    for (size_t i = 0; i < count; i += 2)
        retain_free(w, blocks[i], sizes[i]);
    munmap(blocks, count * sizeof *blocks);
    munmap(sizes, count * sizeof *sizes);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;

    w->tid = current_tid();
    pthread_setname_np(pthread_self(), w->name);
    fill_and_fragment(w);
    scatter_chunks(w, w->chunks);
    pthread_mutex_lock(&step_lock);
    workers_done++;
    pthread_cond_signal(&step_done);
    pthread_mutex_unlock(&step_lock);
    /* Parked until exit: a live thread keeps its arena off the free list. */
    pthread_mutex_lock(&hold);
    pthread_mutex_unlock(&hold);
    return NULL;
}

/* Resident bytes of [start, start + len) by mincore: the program's own view,
 * independent of /proc/PID/smaps. */
static size_t resident_bytes(uintptr_t start, size_t len)
{
    static unsigned char vec[HEAP_MAX_SIZE / 4096];
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = len / page, count = 0;
    if (pages > sizeof vec || mincore((void *)start, len, vec) != 0)
        die("mincore");
    for (size_t i = 0; i < pages; i++)
        count += vec[i] & 1;
    return count * page;
}

/* glibc's heap_info starts: ar_ptr, prev, size, mprotect_size. */
static void read_heap_info(struct worker *w)
{
    for (int i = 0; i < w->heap_count; i++) {
        const size_t *info = (const size_t *)w->heaps[i];
        w->heap_size[i] = info[2];
        w->heap_mprotect_size[i] = info[3];
    }
}

static size_t arena_resident_bytes(const struct worker *w)
{
    size_t total = 0;
    for (int i = 0; i < w->heap_count; i++)
        total += resident_bytes(w->heaps[i], HEAP_MAX_SIZE);
    return total;
}

/* Anonymous RSS: statm's resident minus shared (file and shmem) pages. */
static long rss_anon_bytes(void)
{
    char buf[128];
    int fd = open("/proc/self/statm", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        die("read statm");
    buf[n] = 0;
    long size, resident, shared;
    if (sscanf(buf, "%ld %ld %ld", &size, &resident, &shared) != 3)
        die("parse statm");
    return (resident - shared) * sysconf(_SC_PAGESIZE);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: retention OUT [--threads N] [--mib M] [--chunks N] [--trim] "
                        "[--hold-ms MS] [--wait]\n");
        return 2;
    }
    const char *out = argv[1];
    int threads = 4, trim = 0, wait_mode = 0;
    long mib = 40, hold_ms = 0, chunks = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = atol(argv[++i]);
        else if (!strcmp(argv[i], "--chunks") && i + 1 < argc)
            chunks = atol(argv[++i]);
        else if (!strcmp(argv[i], "--hold-ms") && i + 1 < argc)
            hold_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--trim"))
            trim = 1;
        else if (!strcmp(argv[i], "--wait"))
            wait_mode = 1;
        else {
            fprintf(stderr, "retention: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (threads < 1 || threads > MAX_WORKERS || mib < 1 || mib + chunks / 1024 > 56) {
        fprintf(stderr, "retention: THREADS must be 1..%d and MIB 1..56 with the chunks "
                        "(one heap each)\n", MAX_WORKERS);
        return 2;
    }
    block_sigusr1();
    if (wait_mode) {
        char tmp[4096], ready[4096];
        snprintf(ready, sizeof ready, "%s.ready", out);
        FILE *f = open_truth(ready, tmp, sizeof tmp);
        fprintf(f, "%d\n", getpid());
        publish_file(f, tmp, ready);
        wait_sigusr1();
    }

    pthread_mutex_lock(&hold);
    for (int i = 0; i < threads; i++) {
        struct worker *w = &workers[i];
        w->index = i;
        w->target = (size_t)mib << 20;
        w->chunks = chunks > 0 ? (size_t)chunks : 0;
        w->seed = 1000 + i;
        snprintf(w->name, sizeof w->name, "retain-%d", i);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
            die("pthread_create");
        /* One at a time: worker i works while 0..i-1 are parked. */
        pthread_mutex_lock(&step_lock);
        while (workers_done <= i)
            pthread_cond_wait(&step_done, &step_lock);
        pthread_mutex_unlock(&step_lock);
    }
    for (int i = 0; i < threads; i++) {
        read_heap_info(&workers[i]);
        workers[i].resident_bytes = arena_resident_bytes(&workers[i]);
    }

    long rss_before = rss_anon_bytes(), rss_after = rss_before;
    int trim_result = -1;
    if (trim) {
        trim_result = malloc_trim(0);
        rss_after = rss_anon_bytes();
    }
    for (int i = 0; i < threads; i++)
        workers[i].resident_after_trim_bytes = arena_resident_bytes(&workers[i]);

    char tmp[4096];
    FILE *f = open_truth(out, tmp, sizeof tmp);
    fprintf(f, "{\"pid\": %d, \"page_size\": %ld, \"heap_max_size\": %lu, \"mib\": %ld,\n",
            getpid(), sysconf(_SC_PAGESIZE), HEAP_MAX_SIZE, mib);
    fprintf(f, " \"trim\": {\"called\": %s, \"result\": %d, \"rss_anon_before_bytes\": %ld, "
               "\"rss_anon_after_bytes\": %ld},\n",
            trim ? "true" : "false", trim_result, rss_before, rss_after);
    fprintf(f, " \"threads\": [\n");
    for (int i = 0; i < threads; i++) {
        const struct worker *w = &workers[i];
        fprintf(f, "  {\"tid\": %ld, \"name\": \"%s\", \"arena\": \"0x%lx\", ", w->tid, w->name,
                (unsigned long)w->arena);
        tally_json(f, &w->tally);
        fprintf(f, ", \"foreign_blocks\": %d, \"resident_bytes\": %zu, "
                   "\"resident_after_trim_bytes\": %zu, \"heaps\": [",
                w->foreign_blocks, w->resident_bytes, w->resident_after_trim_bytes);
        for (int h = 0; h < w->heap_count; h++)
            fprintf(f, "%s{\"address\": \"0x%lx\", \"size\": %zu, \"mprotect_size\": %zu}",
                    h ? ", " : "", (unsigned long)w->heaps[h], w->heap_size[h],
                    w->heap_mprotect_size[h]);
        fprintf(f, "]}%s\n", i + 1 < threads ? "," : "");
    }
    fprintf(f, " ]}\n");
    publish_file(f, tmp, out);

    if (wait_mode)
        wait_sigusr1();
    else
        sleep_ms(hold_ms);
    /* No exit handlers: nothing may touch the arenas after the last sample. */
    _exit(0);
}
