/* memtrace demo "threads": named threads, distinct call paths, a leak.
 *
 * Four threads named "parser", "cache", "worker-1" and "worker-2" allocate
 * from their own noinline functions, so each (thread, stack) row of the
 * tracer has a clear owner. Over ~15 s of phases they grow, free most of
 * what they hold, and the workers keep a slowly growing leak. At the end of
 * each phase the program prints its own ground truth: the bytes it asked
 * malloc for and has not freed, per thread.
 *
 * Its bookkeeping arrays come from mmap, not malloc, so the heap the tracer
 * sees is the ground truth plus glibc's own few blocks.
 *
 * Usage: threads [--pause] [--duration SECONDS] [--scale K]
 */
#include "demo_support.c"

#include <stdint.h>
#include <sys/mman.h>

enum phase { PH_START, PH_GROW, PH_SHRINK, PH_STEADY, PH_TEARDOWN, PH_COUNT };

static const struct {
    const char *name;
    double share; /* of --duration */
    const char *what;
} phases[PH_COUNT] = {
    {"start", 0.10, "threads start and take a small baseline"},
    {"grow", 0.30, "parser and cache fill up; workers churn and leak slowly"},
    {"shrink", 0.20, "parser frees 90 % of its tokens, cache evicts 90 %"},
    {"steady", 0.30, "only the workers run: churn balanced, leak growing"},
    {"teardown", 0.10, "parser and cache free everything; the leak stays"},
};

enum role { ROLE_PARSER, ROLE_CACHE, ROLE_WORKER };

/* A thread's blocks: pointers and sizes in mmap'd arrays. */
struct blocks {
    void **ptr;
    size_t *size;
    size_t count, capacity;
};

struct thread_state {
    char name[16];
    enum role role;
    pid_t tid;
    uint64_t rng;
    struct blocks held;   /* freed by later phases */
    struct blocks leaked; /* never freed */
    /* Ground truth, written by the thread, read by main between phases
     * (the barrier orders the two). */
    size_t live_bytes, leaked_bytes;
    unsigned long allocs, frees;
};

#define NTHREADS 4
static struct thread_state threads[NTHREADS];
static pthread_barrier_t barrier;
static volatile enum phase current;
static volatile int phase_over;
static struct timespec phase_began;
static double phase_seconds;
static double scale = 1.0;

/* ---- small helpers ------------------------------------------------------ */

static void *map_array(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static void blocks_init(struct blocks *b, size_t capacity)
{
    b->ptr = map_array(capacity * sizeof(void *));
    b->size = map_array(capacity * sizeof(size_t));
    b->count = 0;
    b->capacity = capacity;
}

static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static size_t between(struct thread_state *t, size_t lo, size_t hi)
{
    return lo + next_random(&t->rng) % (hi - lo + 1);
}

/* How far into the current phase we are, from 0 to 1. */
static double progress(void)
{
    double p = seconds_since(&phase_began) / phase_seconds;
    return p > 1.0 ? 1.0 : p;
}

static void remember(struct thread_state *t, struct blocks *b, void *p,
                     size_t size)
{
    if (b->count == b->capacity) {
        say("error: %s: bookkeeping full", t->name);
        exit(1);
    }
    b->ptr[b->count] = p;
    b->size[b->count] = size;
    b->count++;
    t->allocs++;
}

static void release(struct thread_state *t, struct blocks *b, size_t i)
{
    free(b->ptr[i]);
    t->live_bytes -= b->size[i];
    t->frees++;
    b->count--;
    b->ptr[i] = b->ptr[b->count];
    b->size[i] = b->size[b->count];
}

/* ---- the call paths the tracer should show ------------------------------ */
/* Each touches its block after malloc, which also keeps the compiler from
 * turning the call into a tail jump that would hide the caller. */

static NOINLINE char *tokenize_line(struct thread_state *t, size_t size)
{
    char *token = malloc(size);
    if (token) {
        memset(token, 't', size);
        t->live_bytes += size;
    }
    return token;
}

static NOINLINE void parse_document(struct thread_state *t, size_t goal)
{
    while (t->live_bytes < goal && !phase_over) {
        size_t size = between(t, 32, 512);
        char *token = tokenize_line(t, size);
        if (token)
            remember(t, &t->held, token, size);
    }
}

static NOINLINE void *cache_store(struct thread_state *t, size_t size)
{
    void *entry = malloc(size);
    if (entry) {
        memset(entry, 'c', size);
        t->live_bytes += size;
    }
    return entry;
}

static NOINLINE void fill_cache(struct thread_state *t, size_t goal)
{
    while (t->live_bytes < goal && !phase_over) {
        size_t size = between(t, 4096, 65536);
        void *entry = cache_store(t, size);
        if (entry)
            remember(t, &t->held, entry, size);
    }
}

/* Free blocks picked at random, as a real eviction or parse would, until
 * only `keep` bytes are held. Random order leaves holes all over the heap. */
static NOINLINE void drop_to(struct thread_state *t, size_t keep)
{
    while (t->live_bytes > keep && t->held.count > 0)
        release(t, &t->held, next_random(&t->rng) % t->held.count);
}

static NOINLINE void handle_request(struct thread_state *t)
{
    size_t size = between(t, 1024, 16384);
    char *scratch = malloc(size);
    if (!scratch)
        return;
    memset(scratch, 'w', size);
    t->allocs++;
    free(scratch);
    t->frees++;
}

/* The leak: an audit record appended to a list nobody ever trims. */
static NOINLINE void audit_log_append(struct thread_state *t)
{
    size_t size = (size_t)(between(t, 200, 1000) * scale);
    char *record = malloc(size);
    if (!record)
        return;
    memset(record, 'a', size);
    t->live_bytes += size;
    t->leaked_bytes += size;
    remember(t, &t->leaked, record, size);
}

/* ---- threads ------------------------------------------------------------ */

static size_t peak_goal(const struct thread_state *t)
{
    return (size_t)((t->role == ROLE_PARSER ? 8 : 48) * MIB * scale);
}

static void run_phase(struct thread_state *t, enum phase phase)
{
    size_t peak = peak_goal(t), start = 0;
    unsigned long tick = 0;

    if (phase == PH_SHRINK)
        start = t->live_bytes;
    while (!phase_over) {
        double p = progress();
        if (t->role == ROLE_WORKER) {
            if (phase != PH_TEARDOWN) {
                handle_request(t);
                if (tick++ % 20 == 0)
                    audit_log_append(t);
            }
            nap(1000);
            continue;
        }
        switch (phase) {
        case PH_START:
            if (t->role == ROLE_PARSER)
                parse_document(t, peak / 20);
            else
                fill_cache(t, peak / 20);
            break;
        case PH_GROW:
            if (t->role == ROLE_PARSER)
                parse_document(t, peak / 20 + (size_t)(p * (peak - peak / 20)));
            else
                fill_cache(t, peak / 20 + (size_t)(p * (peak - peak / 20)));
            break;
        case PH_SHRINK:
            /* Ramp down to 10 % of what was held, over the phase. */
            drop_to(t, start - (size_t)(p * 0.9 * start));
            break;
        case PH_STEADY:
            break;
        case PH_TEARDOWN:
            drop_to(t, 0);
            break;
        default:
            break;
        }
        nap(5000);
    }
}

static void *thread_main(void *arg)
{
    struct thread_state *t = arg;
    pthread_setname_np(pthread_self(), t->name);
    t->tid = gettid();
    for (;;) {
        pthread_barrier_wait(&barrier); /* phase begins */
        if (current == PH_COUNT)
            return NULL;
        run_phase(t, current);
        pthread_barrier_wait(&barrier); /* phase over: main reports */
    }
}

/* ---- main ----------------------------------------------------------------- */

static void report(enum phase ph)
{
    size_t live = 0, leaked = 0;

    for (int i = 0; i < NTHREADS; i++) {
        const struct thread_state *t = &threads[i];
        say("truth %s: thread=%s tid=%d live_bytes=%zu live_blocks=%zu "
            "leaked_bytes=%zu allocs=%lu frees=%lu",
            phases[ph].name, t->name, (int)t->tid, t->live_bytes,
            t->held.count + t->leaked.count, t->leaked_bytes, t->allocs,
            t->frees);
        live += t->live_bytes;
        leaked += t->leaked_bytes;
    }
    say("truth %s: total live_bytes=%zu leaked_bytes=%zu", phases[ph].name,
        live, leaked);
}

static const char usage[] =
    "usage: threads [--pause] [--duration SECONDS] [--scale K]\n"
    "Named threads (parser, cache, worker-1, worker-2) grow, free most and\n"
    "leak slowly; the ground truth goes to stderr after each phase.\n"
    "  --pause        wait for Enter or SIGUSR1 before each phase\n"
    "  --duration S   total run time in seconds (default 15)\n"
    "  --scale K      multiply every size by K (default 1)\n";

int main(int argc, char **argv)
{
    static const char *names[NTHREADS] = {"parser", "cache", "worker-1",
                                          "worker-2"};
    static const enum role roles[NTHREADS] = {ROLE_PARSER, ROLE_CACHE,
                                              ROLE_WORKER, ROLE_WORKER};
    double duration = 15.0;
    int pause = 0;
    pthread_t ids[NTHREADS];

    demo_name = "threads";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pause")) {
            pause = 1;
        } else if (!strcmp(argv[i], "--duration")) {
            duration = number_arg(argc, argv, &i, 0.1, 86400);
        } else if (!strcmp(argv[i], "--scale")) {
            scale = number_arg(argc, argv, &i, 0.01, 100);
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        } else {
            say("unknown option %s\n%s", argv[i], usage);
            return 2;
        }
    }

    for (int i = 0; i < NTHREADS; i++) {
        struct thread_state *t = &threads[i];
        snprintf(t->name, sizeof t->name, "%s", names[i]);
        t->role = roles[i];
        t->rng = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1);
        /* Room for the peak goal in the smallest blocks. */
        blocks_init(&t->held, peak_goal(t) / 32 + 1024);
        blocks_init(&t->leaked, 1u << 20);
    }
    if (pause)
        pause_setup();
    pthread_barrier_init(&barrier, NULL, NTHREADS + 1);
    for (int i = 0; i < NTHREADS; i++)
        pthread_create(&ids[i], NULL, thread_main, &threads[i]);

    say("pid %d: %d threads, %.1f s, scale %.2f", (int)getpid(), NTHREADS,
        duration, scale);
    for (enum phase ph = PH_START; ph < PH_COUNT; ph++) {
        phase(phases[ph].name, phases[ph].what);
        phase_seconds = duration * phases[ph].share;
        phase_over = 0;
        current = ph;
        clock_gettime(CLOCK_MONOTONIC, &phase_began);
        pthread_barrier_wait(&barrier);
        nap((long)(phase_seconds * 1e6));
        phase_over = 1;
        pthread_barrier_wait(&barrier);
        report(ph);
    }
    current = PH_COUNT;
    pthread_barrier_wait(&barrier);
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(ids[i], NULL);
    say("done");
    return 0;
}
