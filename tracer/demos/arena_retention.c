/* memtrace reproduction "arena-retention": glibc keeps what threads freed.
 *
 * N threads ("arena-1".."arena-N") each allocate --mib MiB in small blocks
 * (1-32 KiB, below the mmap threshold, so they come from the thread's own
 * arena, whose heaps are at most 64 MiB each), then free 90 % of them. The
 * 10 % that survive are every tenth block, plus the last, so each one pins
 * the pages around it and the top of every heap: free() cannot give the
 * memory back, and RSS stays near its peak although the program holds a
 * tenth of it. malloc_trim(0) (--trim) walks every arena and returns the
 * whole free pages inside it (madvise), so RSS drops. --arena-max N caps the
 * number of arenas (mallopt(M_ARENA_MAX)), as MALLOC_ARENA_MAX=N would.
 *
 * The threads stay alive to the end, as in a thread pool, so the tracer can
 * charge what is left to each of them.
 *
 * Usage: arena-retention [--threads N] [--mib N] [--trim] [--arena-max N]
 *                        [--hold SECONDS] [--pause]
 */
#include "demo_support.c"

#include <malloc.h>
#include <stdint.h>
#include <sys/mman.h>

#define MIN_BLOCK (1 * KIB)
#define MAX_BLOCK (32 * KIB)
#define KEEP_EVERY 10

struct worker {
    char name[16];
    pid_t tid;
    uint64_t rng;
    void **ptr; /* mmap'd, so bookkeeping never touches the heap */
    size_t *size;
    size_t count, capacity;
    /* Ground truth, read by main after a barrier. */
    size_t live_bytes, live_blocks;
};

enum step { STEP_ALLOCATE, STEP_FREE, STEP_EXIT };

static struct worker *workers;
static int nthreads = 8;
static size_t bytes_per_thread = 100 * MIB;
static pthread_barrier_t barrier;
static volatile enum step step;

static void *map_array(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static NOINLINE void *inflate_block(struct worker *w, size_t size)
{
    void *block = malloc(size);
    if (block) {
        /* Touch every page: untouched memory would not show in RSS. */
        memset(block, 0x5a, size);
        w->live_bytes += size;
        w->live_blocks++;
    }
    return block;
}

static NOINLINE void fill_arena(struct worker *w)
{
    while (w->live_bytes < bytes_per_thread && w->count < w->capacity) {
        uint64_t x = w->rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w->rng = x;
        size_t size = MIN_BLOCK + x % (MAX_BLOCK - MIN_BLOCK + 1);
        void *block = inflate_block(w, size);
        if (!block)
            die("malloc");
        w->ptr[w->count] = block;
        w->size[w->count] = size;
        w->count++;
    }
}

/* Which blocks survive matters, not the order of the frees: one survivor
 * every KEEP_EVERY blocks leaves no whole free region for free() to hand
 * back, only holes of a few pages each. */
static NOINLINE void free_most(struct worker *w)
{
    for (size_t i = 0; i + 1 < w->count; i++) {
        if (i % KEEP_EVERY == KEEP_EVERY - 1)
            continue;
        free(w->ptr[i]);
        w->ptr[i] = NULL;
        w->live_bytes -= w->size[i];
        w->live_blocks--;
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;

    pthread_setname_np(pthread_self(), w->name);
    w->tid = gettid();
    for (;;) {
        pthread_barrier_wait(&barrier);
        switch (step) {
        case STEP_ALLOCATE:
            fill_arena(w);
            break;
        case STEP_FREE:
            free_most(w);
            break;
        case STEP_EXIT:
            return NULL;
        }
        pthread_barrier_wait(&barrier);
    }
}

static void run_step(enum step s)
{
    step = s;
    pthread_barrier_wait(&barrier); /* go */
    if (s != STEP_EXIT)
        pthread_barrier_wait(&barrier); /* all done */
}

/* Arenas in use, counted from malloc_info's XML (one <heap nr=...> each). */
static int count_arenas(void)
{
    static char xml[1 << 20];
    FILE *out = fmemopen(xml, sizeof xml - 1, "w");
    int arenas = 0;

    if (!out)
        return -1;
    malloc_info(0, out);
    fclose(out);
    xml[sizeof xml - 1] = '\0';
    for (char *p = xml; (p = strstr(p, "<heap nr=")) != NULL; p++)
        arenas++;
    return arenas;
}

static size_t report(const char *when)
{
    size_t live = 0, blocks = 0;
    unsigned long rss, anon;

    for (int i = 0; i < nthreads; i++) {
        const struct worker *w = &workers[i];
        say("truth %s: thread=%s tid=%d live_bytes=%zu live_blocks=%zu", when,
            w->name, (int)w->tid, w->live_bytes, w->live_blocks);
        live += w->live_bytes;
        blocks += w->live_blocks;
    }
    read_rss(&rss, &anon);
    struct mallinfo2 mi = mallinfo2();
    say("truth %s: total live_bytes=%zu live_blocks=%zu rss_bytes=%lu "
        "rss_anon_bytes=%lu heap_system_bytes=%zu heap_in_use_bytes=%zu "
        "heap_free_bytes=%zu arenas=%d",
        when, live, blocks, rss, anon, mi.arena, mi.uordblks, mi.fordblks,
        count_arenas());
    say("%s: RSS %.1f MiB for %.1f MiB live", when, rss / (double)MIB,
        live / (double)MIB);
    return rss;
}

static const char usage[] =
    "usage: arena-retention [--threads N] [--mib N] [--trim] [--arena-max N]\n"
    "                       [--hold SECONDS] [--pause]\n"
    "Threads fill their glibc arenas with 1-32 KiB blocks and free 90 %;\n"
    "RSS stays high until malloc_trim. Ground truth goes to stderr.\n"
    "  --threads N     allocating threads (default 8)\n"
    "  --mib N         MiB each thread allocates (default 100)\n"
    "  --trim          call malloc_trim(0) after the frees\n"
    "  --arena-max N   mallopt(M_ARENA_MAX, N) before any thread allocates\n"
    "  --hold S        seconds to stay alive at the end (default 1)\n"
    "  --pause         wait for Enter or SIGUSR1 before each phase\n";

int main(int argc, char **argv)
{
    int trim = 0, pause = 0, arena_max = 0;
    double hold = 1.0;
    pthread_t *ids;

    demo_name = "arena-retention";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads"))
            nthreads = (int)number_arg(argc, argv, &i, 1, 4096);
        else if (!strcmp(argv[i], "--mib"))
            bytes_per_thread = (size_t)(number_arg(argc, argv, &i, 1, 1 << 20) * MIB);
        else if (!strcmp(argv[i], "--trim"))
            trim = 1;
        else if (!strcmp(argv[i], "--arena-max"))
            arena_max = (int)number_arg(argc, argv, &i, 1, 1 << 16);
        else if (!strcmp(argv[i], "--hold"))
            hold = number_arg(argc, argv, &i, 0, 86400);
        else if (!strcmp(argv[i], "--pause"))
            pause = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        } else {
            say("unknown option %s\n%s", argv[i], usage);
            return 2;
        }
    }
    if (arena_max && mallopt(M_ARENA_MAX, arena_max) != 1) {
        say("error: mallopt(M_ARENA_MAX, %d) failed", arena_max);
        return 1;
    }

    workers = map_array((size_t)nthreads * sizeof *workers);
    ids = map_array((size_t)nthreads * sizeof *ids);
    for (int i = 0; i < nthreads; i++) {
        struct worker *w = &workers[i];
        snprintf(w->name, sizeof w->name, "arena-%hu", (unsigned short)(i + 1));
        w->rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1);
        w->capacity = bytes_per_thread / MIN_BLOCK + 1;
        w->ptr = map_array(w->capacity * sizeof *w->ptr);
        w->size = map_array(w->capacity * sizeof *w->size);
    }
    if (pause)
        pause_setup();
    pthread_barrier_init(&barrier, NULL, (unsigned)nthreads + 1);
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&ids[i], NULL, worker_main, &workers[i]) != 0)
            die("pthread_create");

    say("pid %d: %d threads x %.0f MiB in %lu-%lu KiB blocks, keep 1 in %d, "
        "trim %s, arena max %d (0: glibc's default)", (int)getpid(), nthreads,
        bytes_per_thread / (double)MIB, MIN_BLOCK / KIB, MAX_BLOCK / KIB,
        KEEP_EVERY, trim ? "yes" : "no", arena_max);
    report("start");

    phase("allocate", "every thread fills its arena with small blocks");
    run_step(STEP_ALLOCATE);
    unsigned long peak = report("allocate");

    phase("free", "every thread frees 90 % of its blocks, 1 in 10 survives");
    run_step(STEP_FREE);
    unsigned long after_free = report("free");
    say("free: RSS kept %.0f %% of its peak although 90 %% was freed",
        100.0 * after_free / peak);

    if (trim) {
        phase("trim", "malloc_trim(0) returns free pages of every arena");
        int released = malloc_trim(0);
        unsigned long after_trim = report("trim");
        say("truth trim: malloc_trim_returned=%d", released);
        say("trim: RSS fell %.1f MiB, to %.0f %% of its peak",
            ((double)after_free - (double)after_trim) / MIB,
            100.0 * after_trim / peak);
    }

    phase("hold", "threads alive and idle, memory as it is");
    nap((long)(hold * 1e6));
    run_step(STEP_EXIT);
    for (int i = 0; i < nthreads; i++)
        pthread_join(ids[i], NULL);
    say("done");
    return 0;
}
